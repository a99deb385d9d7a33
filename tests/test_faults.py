"""Fault and bad-input trials (issue 16): every one ends with a one-line error naming what is wrong and an exit
status != 0 (or a correct result), never a traceback, and leaves files that existed before unchanged.

One small cache (tiny-gpt2, 64 sequences of 64 tokens in 16 chunks) and two SAEs are made once per module;
each test damages its own copy.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

import cli
from tests.conftest import PYDOC

HOOK = "blocks.1.hook_resid_pre"
ACTS = f"acts/{HOOK}"

CONFIG = f"""
[harvest]
model = "tiny-gpt2"
dataset = "{PYDOC}"
hooks = ["{HOOK}"]
context_size = 64
n_tokens = 4096
batch_size = 32
dtype = "float32"

[train]
batch_size = 256
buffer_tokens = 2048
n_epochs = 1
log_every = 2
ce_eval_seqs = 0

[[train.saes]]
name = "topk"
architecture = "topk"
expansion = 2
k = 4

[[train.saes]]
name = "topk-tok"
architecture = "topk"
tokenized = true
expansion = 2
k = 4

[analyze]
eval_tokens = 1000
analyses = ["mse_by_freq"]
"""


def invoke(*args) -> object:
    return CliRunner().invoke(cli.main, [str(a) for a in args])


def paths(tmp: Path, cache: Path | None = None, saes: Path | None = None) -> list[str]:
    """--set overrides pointing the config's outputs at ``tmp`` (or the given cache / SAE folders)."""
    return ["--set", f"harvest.cache_dir={cache or tmp / 'cache'}", "--set", f"train.out_dir={saes or tmp / 'saes'}",
            "--set", f"analyze.out_dir={tmp / 'analysis'}"]


def error_line(r, *needles: str) -> str:
    """Assert ``r`` failed with exactly one ``error:`` line containing ``needles`` and no traceback; return it."""
    assert r.exit_code not in (0, None), r.output
    assert isinstance(r.exception, SystemExit), repr(r.exception)  # not an uncaught exception
    assert "Traceback" not in r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.output
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


def snapshot(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``root``."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def chunk_file(cache: Path, name: str, c: int) -> Path:
    return cache / name / "c" / str(c) / ("0/0" if name.startswith("acts/") else "0")


@pytest.fixture(scope="module")
def made(tmp_path_factory, tsae_home):
    """(config file, cache folder, SAE folder): harvested and trained once, never modified by tests."""
    tmp = tmp_path_factory.mktemp("faults")
    cfg = tmp / "faults.toml"
    cfg.write_text(CONFIG)
    r = invoke("harvest", cfg, *paths(tmp))
    assert r.exit_code == 0, r.output
    r = invoke("train", cfg, *paths(tmp))
    assert r.exit_code == 0, r.output
    return cfg, tmp / "cache", tmp / "saes"


@pytest.fixture
def cache(made, tmp_path) -> Path:
    """A fresh copy of the module's cache."""
    dst = tmp_path / "cache"
    shutil.copytree(made[1], dst)
    return dst


def train_fails(made, tmp_path, cache, *needles):
    before = snapshot(cache)
    r = invoke("train", made[0], *paths(tmp_path, cache))
    line = error_line(r, *needles)
    assert not (tmp_path / "saes").exists() or not any((tmp_path / "saes").rglob("sae.safetensors"))
    assert snapshot(cache) == before
    return line


# -- damaged caches ----------------------------------------------------------------------------------------------

def test_the_harvest_records_a_checksum_per_chunk_and_verify_matches_them(cache):
    from pipeline.cache import Cache, chunk_checksum

    c = Cache.open(str(cache))
    sums = c.meta["checksums"]
    assert set(sums) == {"tokens", ACTS} and len(sums[ACTS]) == 16
    assert sums[ACTS]["3"] == chunk_checksum(c.acts(HOOK, 12, 16))  # rows of chunk 3, as stored
    r = invoke("cache", "verify", "--no-recompute", cache)
    assert r.exit_code == 0 and "32 checksum(s) matched" in r.output, r.output


@pytest.mark.parametrize("name", [ACTS, "tokens"])
def test_deleted_chunk_is_named_by_verify_and_train(made, tmp_path, cache, name):
    chunk_file(cache, name, 5).unlink()
    r = invoke("cache", "verify", "--no-recompute", cache)
    assert r.exit_code == 1 and f"chunk 5 (rows 20..23) of {name} is missing" in r.output, r.output
    assert "BAD" in r.output and "Traceback" not in r.output
    train_fails(made, tmp_path, cache, f"chunk 5 (rows 20..23) of {name} is missing", "cache verify")


def test_truncated_chunk_is_named_by_verify_and_train(made, tmp_path, cache):
    f = chunk_file(cache, ACTS, 7)
    f.write_bytes(f.read_bytes()[:100])
    r = invoke("cache", "verify", "--no-recompute", cache)
    assert r.exit_code == 1 and f"chunk 7 (rows 28..31) of {ACTS} does not decode" in r.output, r.output
    assert "Traceback" not in r.output
    train_fails(made, tmp_path, cache, "chunk 7", "does not decode", "cache verify")


def test_changed_bytes_that_still_decode_are_caught_by_the_checksum(cache):
    g = zarr.open_group(str(cache), mode="r+")
    rows = g[ACTS][8:12]
    rows[1, 3, 2] += 0.25  # a plausible value: only the checksum can tell
    g[ACTS][8:12] = rows
    r = invoke("cache", "verify", "--no-recompute", cache)
    assert r.exit_code == 1 and f"chunk 2 (rows 8..11) of {ACTS}: checksum" in r.output, r.output


def test_flipped_bytes_in_a_chunk_file(cache):
    f = chunk_file(cache, "tokens", 9)
    data = bytearray(f.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 4):
        data[i] ^= 0xFF
    f.write_bytes(bytes(data))
    r = invoke("cache", "verify", "--no-recompute", cache)
    assert r.exit_code == 1 and "chunk 9 (rows 36..39) of tokens" in r.output, r.output
    assert "Traceback" not in r.output


def test_old_cache_without_checksums_stays_verifiable(cache):
    g = zarr.open_group(str(cache), mode="r+")
    meta = dict(g.attrs["tsae"])
    del meta["checksums"]
    g.attrs["tsae"] = meta
    r = invoke("cache", "verify", "--no-recompute", cache)
    assert r.exit_code == 0 and "no per-chunk checksums" in r.output, r.output


def test_nan_in_a_chunk_stops_verify_and_train(made, tmp_path, cache):
    g = zarr.open_group(str(cache), mode="r+")
    rows = g[ACTS][0:4]
    rows[2, 10, 0] = np.nan
    g[ACTS][0:4] = rows
    r = invoke("cache", "verify", "--no-recompute", cache)
    assert r.exit_code == 1 and f"chunk 0 (rows 0..3) of {ACTS}: 1 NaN/inf" in r.output, r.output
    train_fails(made, tmp_path, cache, "NaN/inf", "cache verify")


@pytest.mark.parametrize("edit", ["context_size", "n_seq", "truncated"])
def test_edited_or_truncated_metadata(made, tmp_path, cache, edit):
    zj = cache / "zarr.json"
    if edit == "truncated":
        zj.write_bytes(zj.read_bytes()[:120])
        needle = "unreadable"
    else:
        doc = json.loads(zj.read_text())
        doc["attributes"]["tsae"][edit] = {"context_size": 32, "n_seq": 1000}[edit]
        zj.write_text(json.dumps(doc))
        needle = {"context_size": "context_size=32", "n_seq": "n_seq=1000 exceeds"}[edit]
    r = invoke("cache", "verify", cache)
    if edit == "truncated":
        error_line(r, needle, "zarr.json")
    else:
        assert r.exit_code == 1 and "BAD metadata" in r.output and needle in r.output, r.output
        assert "Traceback" not in r.output
    train_fails(made, tmp_path, cache, needle)


def test_debug_shows_the_traceback(cache):
    (cache / "zarr.json").write_text("{")
    r = CliRunner().invoke(cli.main, ["--debug", "cache", "info", str(cache)])
    from pipeline.cache import CacheError

    assert r.exit_code != 0 and isinstance(r.exception, CacheError)


def test_non_finite_loss_stops_training_naming_step_and_sae(made, tmp_path, monkeypatch):
    """A loss that turns NaN mid-run stops the run; the SAEs of an earlier run in the folder stay as they were."""
    from pipeline.training import MultiTrainer

    saes = tmp_path / "saes"
    shutil.copytree(made[2], saes)
    before = snapshot(saes)
    step = MultiTrainer.step

    def poisoned(self, x, tokens, log=True):
        if self.step_count == 2:
            x = x.clone()
            x[0, 0] = float("nan")
        return step(self, x, tokens, log)

    monkeypatch.setattr(MultiTrainer, "step", poisoned)
    r = invoke("train", made[0], *paths(tmp_path, made[1], saes), "--set", "train.resume=false")
    error_line(r, "step 4", "SAE topk", "cache verify")
    assert snapshot(saes) == before


# -- folders that are not ours -----------------------------------------------------------------------------------

def test_harvest_refuses_a_foreign_non_empty_folder(made, tmp_path):
    dest = tmp_path / "thesis"
    dest.mkdir()
    (dest / "thesis.txt").write_text("three years of work")
    r = invoke("harvest", made[0], *paths(tmp_path, dest))
    error_line(r, "not a tsae cache", "thesis.txt")
    assert snapshot(dest) == {"thesis.txt": hashlib.sha256(b"three years of work").hexdigest()}


def test_cache_rm_never_deletes_what_it_does_not_own(cache):
    (cache / "thesis.txt").write_text("three years of work")
    (cache / "acts" / "notes.md").write_text("mine")
    before = snapshot(cache)
    error_line(invoke("cache", "rm", cache), "not part of the cache", "thesis.txt", "--force")
    assert snapshot(cache) == before
    r = invoke("cache", "rm", "--dry-run", cache)
    assert r.exit_code != 0 and snapshot(cache) == before  # --dry-run alone does not override the refusal
    r = invoke("cache", "rm", "--dry-run", "--force", cache)
    assert r.exit_code == 0 and "would remove" in r.output and f"{cache}/zarr.json" in r.output, r.output
    assert "thesis.txt" not in r.output and snapshot(cache) == before
    r = invoke("cache", "rm", "--force", cache)
    assert r.exit_code == 0, r.output
    assert snapshot(cache) == {"thesis.txt": before["thesis.txt"], "acts/notes.md": before["acts/notes.md"]}


def test_cache_rm_removes_a_whole_cache_and_refuses_other_folders(cache, tmp_path):
    r = invoke("cache", "rm", cache)
    assert r.exit_code == 0 and not cache.exists(), r.output
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.txt").write_text("x")
    error_line(invoke("cache", "rm", other), "no activation cache")
    assert (other / "a.txt").read_text() == "x"


def test_read_only_complete_cache_is_reused_without_the_lock(made, tmp_path, cache, monkeypatch):
    import zarr.storage._local as local

    from pipeline import cache as cache_mod

    def refuse(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(cache))

    monkeypatch.setattr(local, "_put", refuse)  # every Zarr write
    monkeypatch.setattr(cache_mod.WriterLock, "_write", refuse)  # the writer lock
    before = snapshot(cache)
    r = invoke("harvest", made[0], *paths(tmp_path, cache))
    assert r.exit_code == 0 and "already complete" in r.output, r.output
    assert snapshot(cache) == before


def test_disk_full_during_harvest_is_one_line_and_resumable(made, tmp_path, monkeypatch):
    import zarr.storage._local as local

    put, calls = local._put, []

    def full(path, value, *a, **k):
        calls.append(path)
        if len(calls) > 12:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return put(path, value, *a, **k)

    monkeypatch.setattr(local, "_put", full)
    r = invoke("harvest", made[0], *paths(tmp_path))
    error_line(r, "No space left on device", "rerun")
    monkeypatch.setattr(local, "_put", put)
    r = invoke("harvest", made[0], *paths(tmp_path))
    assert r.exit_code == 0 and "resuming at sequence" in r.output, r.output
    r = invoke("cache", "verify", "--no-recompute", tmp_path / "cache")
    assert r.exit_code == 0 and "32 checksum(s) matched" in r.output, r.output


# -- bad settings and inputs: refused before anything is written ---------------------------------------------------

@pytest.mark.parametrize("sets, needles", [
    (["harvest.context_size=1000"], ["context_size=1000", "512 positions"]),
    (["harvest.dataset=EMPTY"], ["gives no window"]),
    (["harvest.dataset=BINARY"], ["UTF-8"]),
])
def test_bad_harvest_inputs_leave_nothing_behind(made, tmp_path, sets, needles):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)) * 64)
    sets = [s.replace("EMPTY", str(tmp_path / "empty.txt")).replace("BINARY", str(tmp_path / "binary.txt"))
            for s in sets]
    r = invoke("harvest", made[0], *paths(tmp_path), *[a for s in sets for a in ("--set", s)])
    error_line(r, *needles)
    assert not (tmp_path / "cache").exists()


def test_binary_config_file(tmp_path):
    cfg = tmp_path / "cfg.toml"
    cfg.write_bytes(b"\xff\xfe\x00binary" * 10)
    error_line(invoke("train", cfg), "not a UTF-8 text file")


@pytest.mark.parametrize("sets, needles", [
    (["train.saes.0.k=1000"], ["k=1000 exceeds d_sae=", "topk"]),
    (["train.saes.0.k=1000", "train.saes.0.architecture=batchtopk"], ["k=1000 exceeds d_sae="]),
    (["train.saes.0.k=100", "train.saes.0.d_sae=64"], ["train.saes.0.k=100 exceeds d_sae=64"]),
    (["train.saes.0.lr=-0.001"], ["lr=-0.001 must be > 0"]),
    (['train.saes.0.name="../../escaped"'], ["plain folder name"]),
    (['train.saes.0.name="a/b"'], ["plain folder name"]),
])
def test_bad_train_settings_are_refused_before_anything_is_written(made, tmp_path, sets, needles):
    before = snapshot(made[1])
    r = invoke("train", made[0], *paths(tmp_path, made[1]), *[a for s in sets for a in ("--set", s)])
    error_line(r, *needles)
    assert not (tmp_path / "saes").exists() and not (tmp_path.parent / "escaped").exists()
    assert snapshot(made[1]) == before


# -- analyze / export on damaged or foreign SAEs ------------------------------------------------------------------

@pytest.fixture
def saes(made, tmp_path) -> Path:
    dst = tmp_path / "saes"
    shutil.copytree(made[2], dst)
    return dst


def test_truncated_sae_is_named_and_the_healthy_one_still_processed(made, tmp_path, saes):
    w = saes / "topk" / "sae.safetensors"
    w.write_bytes(w.read_bytes()[:200])
    before = snapshot(saes)
    r = invoke("export", saes, tmp_path / "exported")
    error_line(r, "topk", "1 of 2 SAE(s) not exported")
    assert (tmp_path / "exported" / "topk-tok" / "cfg.json").is_file()
    assert not (tmp_path / "exported" / "topk").exists()
    r = invoke("analyze", made[0], *paths(tmp_path, made[1], saes))
    error_line(r, "SAE(s) could not be loaded", "topk:")
    res = json.loads((tmp_path / "analysis" / "results.json").read_text())
    assert res["saes"] == ["topk-tok"]
    assert snapshot(saes) == before


def test_analyze_refuses_saes_of_another_model_unless_told(made, tmp_path, saes):
    for d in saes.iterdir():
        if (d / "cfg.json").is_file():
            c = json.loads((d / "cfg.json").read_text())
            c["model"] = "tiny-llama"
            (d / "cfg.json").write_text(json.dumps(c))
    r = invoke("analyze", made[0], *paths(tmp_path, made[1], saes))
    error_line(r, "tiny-llama", "tiny-gpt2", "--allow-other-cache")
    assert not (tmp_path / "analysis").exists()
    r = invoke("analyze", made[0], *paths(tmp_path, made[1], saes), "--allow-other-cache")
    assert r.exit_code == 0, r.output


def test_analyze_refuses_saes_of_another_cache_fingerprint(made, tmp_path, saes):
    c = json.loads((saes / "topk" / "cfg.json").read_text())
    c["extra"]["cache_fingerprint"] = "0123456789ab"
    (saes / "topk" / "cfg.json").write_text(json.dumps(c))
    error_line(invoke("analyze", made[0], *paths(tmp_path, made[1], saes)), "fingerprint 0123456789ab")


def test_analyze_on_a_one_sequence_cache(made, tmp_path, saes):
    r = invoke("harvest", made[0], *paths(tmp_path, tmp_path / "one"), "--set", "harvest.n_tokens=64")
    assert r.exit_code == 0, r.output
    error_line(invoke("analyze", made[0], *paths(tmp_path, tmp_path / "one", saes)), "1 sequence(s)")
    assert not (tmp_path / "analysis").exists()
