"""The public API: ``import tsae``, ``SAE.reconstruct``, splicing SAEs into a TransformerBridge forward."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from pipeline.evaluation import ce_losses, sae_reconstructor
from pipeline.saes import ARCHITECTURES, SAEParams, load_sae
from pipeline.splice import run_with_saes, splice_saes

HOOK = "blocks.1.hook_resid_pre"


def _sae(lm, arch="topk", tokenized=False, seed=0, hook=HOOK):
    torch.manual_seed(seed)
    p = SAEParams(architecture=arch, d_model=lm.d_model, d_sae=4 * lm.d_model, k=8, tokenized=tokenized,
                  d_vocab=lm.d_vocab if tokenized else 0, hook=hook, model=lm.name)
    sae = ARCHITECTURES[arch](p)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
        if sae.W_lookup is not None:
            sae.W_lookup.normal_(0, 0.5)  # a lookup that matters: spliced without the right tokens, CE differs
    return sae.eval()


def _tokens(lm, n=4, ctx=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, lm.d_vocab, (n, ctx), generator=g)
    t[:2, 0] = lm.bos_token_id  # half the sequences start with BOS: its position stays clean
    return t


def test_import_tsae_has_no_side_effects():
    code = ("import os, sys; before = dict(os.environ); import tsae; "
            "assert dict(os.environ) == before, set(os.environ) ^ set(before); "
            "assert callable(tsae.load_sae) and callable(tsae.splice_saes) and callable(tsae.tsae_lookup); "
            "assert 'cli' not in sys.modules and 'stages' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, env={k: v for k, v in os.environ.items()
                                                                  if k != "THP_MEM_ALLOC_ENABLE"})


def test_import_graph_has_no_circle():
    """base.py imports neither the registry nor an architecture (which import base.py): no import circle."""
    import ast
    from pathlib import Path

    import pipeline.saes.base as base

    tree = ast.parse(Path(base.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    inside = sorted(m for m in imported if m.startswith("pipeline.saes"))
    assert inside == [], f"pipeline/saes/base.py imports {inside}"


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "relu", "jumprelu"])
def test_reconstruct_is_decode_of_encode(tiny_lm, arch):
    sae = _sae(tiny_lm, arch, tokenized=True)
    x = torch.randn(3, 5, tiny_lm.d_model)
    t = torch.randint(0, tiny_lm.d_vocab, (3, 5))
    with torch.no_grad():
        x_hat = sae.reconstruct(x, t)
        flat = sae.decode(sae.encode(x.reshape(-1, x.shape[-1])), t.reshape(-1)).reshape(x.shape)
        fwd = sae(x.reshape(-1, x.shape[-1]), t.reshape(-1)).x_hat.reshape(x.shape)
    assert x_hat.shape == x.shape
    torch.testing.assert_close(x_hat, flat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_hat, fwd, rtol=1e-5, atol=1e-5)  # sae(x) still returns ForwardOutput
    with pytest.raises(ValueError, match="token"):
        sae.reconstruct(x)  # tokenized without token ids
    with pytest.raises(ValueError, match="d_model"):
        sae.reconstruct(torch.randn(2, tiny_lm.d_model + 1), torch.zeros(2, dtype=torch.long))


def test_splice_loss_equals_ce_evaluation(tiny_lm):
    """The spliced forward's loss is the CE evaluation's ce_spliced, for a plain and a tokenized SAE."""
    toks = _tokens(tiny_lm)
    for sae in (_sae(tiny_lm), _sae(tiny_lm, tokenized=True, seed=1)):
        ref = ce_losses(tiny_lm, toks, HOOK, {"s": sae_reconstructor(sae)}, batch_size=len(toks), progress=False)
        loss = run_with_saes(tiny_lm, toks, sae, return_type="loss")
        assert math.isclose(float(loss), ref["per_sae"]["s"]["ce_spliced"], rel_tol=1e-5, abs_tol=1e-5)
        assert abs(float(loss) - ref["ce_clean"]) > 1e-3  # the splice did something
        with torch.no_grad():
            clean = tiny_lm.bridge(toks, return_type="loss")
        assert math.isclose(float(clean), ref["ce_clean"], rel_tol=1e-5)  # hooks removed on exit


def test_splice_feeds_current_tokens_to_tokenized_sae(tiny_lm):
    """A tokenized SAE sees this forward's ids: wrong ids (a shuffled lookup) would change the logits."""
    sae = _sae(tiny_lm, tokenized=True)
    toks = _tokens(tiny_lm, seed=3)
    captured = {}

    def grab(act, hook):
        captured["x"] = act.detach().clone()

    with torch.no_grad():
        tiny_lm.bridge.run_with_hooks(toks, fwd_hooks=[(HOOK, grab)])
        x_hat = sae.reconstruct(captured["x"], toks)
        x_hat[:, 0] = torch.where((toks[:, 0] == tiny_lm.bos_token_id)[:, None], captured["x"][:, 0], x_hat[:, 0])
        expected = tiny_lm.bridge.run_with_hooks(toks, fwd_hooks=[(HOOK, lambda a, hook: x_hat)])
        with splice_saes(tiny_lm, {HOOK: sae}) as bridge:
            got = bridge(toks)
            again = tiny_lm.bridge.run_with_hooks(toks, fwd_hooks=[])  # TL's own hook reset keeps the splice
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, expected, rtol=1e-4, atol=1e-4)


def test_splice_two_hooks_and_errors(tiny_lm):
    a, b = _sae(tiny_lm, hook="blocks.0.hook_resid_pre"), _sae(tiny_lm, tokenized=True, seed=2)
    toks = _tokens(tiny_lm)
    with torch.no_grad():
        both = run_with_saes(tiny_lm, toks, [a, b], return_type="loss")
        only_a = run_with_saes(tiny_lm, toks, [a], return_type="loss")
        only_b = run_with_saes(tiny_lm, toks, [b], return_type="loss")
    assert float(both) not in (float(only_a), float(only_b))
    with pytest.raises(ValueError, match="more than one SAE"):
        with splice_saes(tiny_lm, [a, _sae(tiny_lm, hook="blocks.0.hook_resid_pre", seed=5)]):
            pass
    with pytest.raises(ValueError, match="not a hook point"):
        with splice_saes(tiny_lm, {"blocks.9.nope": a}):
            pass


def test_load_sae_roundtrip_and_group_readable(tiny_lm, tmp_path):
    sae = _sae(tiny_lm, tokenized=True)
    old = os.umask(0o022)
    try:
        sae.save(tmp_path / "s")
    finally:
        os.umask(old)
    assert (tmp_path / "s" / "sae.safetensors").stat().st_mode & 0o777 == 0o644
    back = load_sae(tmp_path / "s")
    x, t = torch.randn(4, tiny_lm.d_model), torch.randint(0, tiny_lm.d_vocab, (4,))
    with torch.no_grad():
        torch.testing.assert_close(back.reconstruct(x, t), sae.reconstruct(x, t))
    with pytest.raises(FileNotFoundError):
        load_sae(tmp_path)


def test_export_metadata_and_tsae_lookup(tmp_path, capsys):
    """SAELens metadata is complete and a tokenized export's lookup loader restores tsae's reconstruction."""
    import json

    from pipeline.export import export_command, tsae_lookup
    from tests.test_export import D, V, random_sae

    sae = random_sae("topk", tokenized=True, rows=7)
    sae.params.model = "SmolLM2-135M-Instruct"
    sae.params.extra = {"cache_meta": {"context_size": 256, "prepend_bos": True, "dataset": {"name": "python3-doc"}}}
    sae.save(tmp_path / "saes" / "tok")
    random_sae("relu").save(tmp_path / "saes" / "plain")
    export_command(tmp_path / "saes", tmp_path / "out")
    printed = capsys.readouterr().out
    assert "tok" in printed and "OUTSIDE SAELens' decode()" in printed
    assert printed.count("OUTSIDE") == 1  # the plain SAE's export says nothing about a lookup
    meta = json.loads((tmp_path / "out" / "tok" / "cfg.json").read_text())["metadata"]
    assert meta["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (meta["context_size"], meta["prepend_bos"], meta["dataset_path"]) == (256, True, "python3-doc")
    assert meta["tsae"]["lookup"]["file"] == "tsae_lookup.safetensors" and "tsae_lookup" in meta["tsae"]["lookup"]["loader"]
    assert (tmp_path / "out" / "tok" / "sae_weights.safetensors").stat().st_mode & 0o040  # group-readable
    lookup = tsae_lookup(tmp_path / "out" / "tok")
    x, t = torch.randn(6, D), torch.randint(0, V, (6,))
    with torch.no_grad():
        sae_part = sae.decode_sae(sae.encode(x)) + sae.b_dec  # no lookup term: what SAELens computes
        torch.testing.assert_close(sae_part + lookup(t), sae.reconstruct(x, t))
    with pytest.raises(FileNotFoundError):
        tsae_lookup(tmp_path / "out" / "plain")


def test_summary_table_full_names_and_ce_recovered():
    from stages.train import format_table

    long = "matryoshka_batchtopk-tok-4608-k32-s1"
    rows = [dict(name=long, architecture="matryoshka_batchtopk", tokenized=True, d_sae=4608, k=32, nmse=0.1234,
                 explained_variance=0.88, l0=31.9, dead_frac_heldout=0.01, ce_added=0.0512, ce_recovered=0.9731,
                 nmse_ci95=[0.1201, 0.1275]),
            dict(name="relu", architecture="relu", tokenized=False, d_sae=64, k=None, sparsity_coeff=5.0, nmse=0.3,
                 explained_variance=0.7, l0=12.0, dead_frac_heldout=0.0)]
    out = format_table(rows)
    lines = out.splitlines()
    assert long in out and "matryoshka_batchtopk " in out and "CE recovered" in lines[1]
    assert "0.973" in out
    head, data = lines[1], lines[3:]
    col = head.index("NMSE [95% CI]") + len("NMSE [95% CI]")  # right-aligned columns end where their header ends
    assert data[0][:col].endswith("0.1234 [0.1201, 0.1275]") and data[1][:col].endswith("0.3000")
    assert data[1].rstrip().endswith("0.0%")  # no CE measured: blank CE cells, nothing misaligned after them


def test_cache_ls_looks_into_subfolders(tmp_path):
    from click.testing import CliRunner

    import cli
    from stages import harvest
    from tests.conftest import make_config

    cfg = make_config(tmp_path, f"harvest.cache_dir={tmp_path / 'runs' / 'exp1' / 'cache'}", "harvest.n_tokens=640")
    path = harvest.run(cfg)["path"]
    r = CliRunner().invoke(cli.main, ["cache", "ls", str(tmp_path / "runs")])
    assert r.exit_code == 0 and "exp1" in r.output and "complete" in r.output, r.output


def test_tsae_console_script_is_the_cli():
    """pyproject's [project.scripts] tsae resolves to cli.py's group with every command; `python -m tsae` too."""
    import importlib
    import shutil
    import tomllib
    from pathlib import Path

    from click.testing import CliRunner

    root = Path(__file__).resolve().parents[1]
    target = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]["tsae"]
    module, attr = target.split(":")
    main = getattr(importlib.import_module(module), attr)
    r = CliRunner().invoke(main, ["--help"], prog_name="tsae")
    assert r.exit_code == 0
    for cmd in ("harvest", "train", "analyze", "run", "export", "cache"):
        assert f"  {cmd} " in r.output, r.output
    out = subprocess.run([sys.executable, "-m", "tsae", "--help"], capture_output=True, text=True, cwd=root)
    assert out.returncode == 0 and "Usage: tsae" in out.stdout
    exe = shutil.which("tsae")
    if exe and Path(exe).resolve().parent == Path(sys.executable).resolve().parent:  # installed (make install)
        out = subprocess.run([exe, "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "harvest" in out.stdout


def test_wandb_logs_the_training_metrics(tiny_cache, tmp_path, monkeypatch):
    """train.wandb = true logs every metrics.jsonl row (as <name>/<metric>) and the final evaluation; checked
    through a fake wandb module that records the calls (no network, no wandb service process)."""
    import json
    import types

    from stages import train
    from tests.conftest import make_config

    calls = {"init": [], "log": [], "summary": {}, "finished": 0}

    class Run:
        summary = calls["summary"]

        def log(self, data, step):
            calls["log"].append((step, data))

        def finish(self):
            calls["finished"] += 1

    fake = types.SimpleNamespace(init=lambda **kw: calls["init"].append(kw) or Run())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg, cache = tiny_cache
    from pathlib import Path

    cache_dir = Path(cfg.harvest.cache_dir)
    monkeypatch.chdir(cache_dir.parent)  # a relative cache path in the config must become absolute in cfg.json
    cfg = make_config(tmp_path, f"harvest.cache_dir={cache_dir.name}", f"harvest.model={cache.meta['model']}",
                      "train.n_epochs=0.5", "train.ce_eval_seqs=0", "train.wandb=true", "train.wandb_project=p")
    summary = train.run(cfg, progress=False)
    saved = json.loads((tmp_path / "saes" / summary["results"][0]["name"] / "cfg.json").read_text())["extra"]
    assert saved["cache"] == str(cache_dir.resolve()) and saved["cache_meta"]["context_size"] == cache.context_size
    assert calls["init"][0]["project"] == "p" and calls["finished"] == 1
    for r in summary["results"]:
        rows = [json.loads(line) for line in open(tmp_path / "saes" / r["name"] / "metrics.jsonl")]
        logged = [(s, d) for s, d in calls["log"] if f"{r['name']}/nmse" in d]
        assert [s for s, _ in logged] == [row["step"] for row in rows]
        assert all(math.isclose(d[f"{r['name']}/heldout_nmse"], row["heldout_nmse"]) for (_, d), row in zip(logged, rows))
        assert math.isclose(calls["summary"][f"{r['name']}/final_nmse"], r["nmse"])


def test_wandb_missing_is_a_clear_error(tiny_cache, tmp_path, monkeypatch):
    from pipeline.tracking import TrackingError
    from stages import train
    from tests.conftest import make_config

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb → ImportError
    cfg, cache = tiny_cache
    cfg = make_config(tmp_path, f"harvest.cache_dir={cfg.harvest.cache_dir}", f"harvest.model={cache.meta['model']}",
                      "train.n_epochs=0.1", "train.ce_eval_seqs=0", "train.wandb=true")
    with pytest.raises(TrackingError, match="pip install"):
        train.run(cfg, progress=False)
