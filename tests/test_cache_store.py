"""Issue 3: fingerprint, root addressing, locking, crash safety, readers during writes, verify, dtypes, URLs."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

import cli
from pipeline.cache import FINGERPRINT_FIELDS, Cache, CacheError, CacheWriter, WriterLock, fingerprint
from pipeline.models import load_model, run_hooks
from pipeline.reader import ActivationReader, n_chunks
from stages import harvest, resolve_cache
from tests.conftest import PYDOC, ROOT, TINY, make_config


def _meta(**kw):
    m = {"format_version": 1, "model": "m", "hooks": ["h"], "context_size": 2, "d_model": 3, "d_vocab": 5,
         "prepend_bos": False, "bos_token_id": 0, "sep_token_id": 0, "dataset": {}, "dtype": "float32",
         "n_seq_target": 8, "seq_chunk": 2}
    return {**m, **kw}


def test_fingerprint_is_stored_with_its_fields_and_addresses_the_cache(tmp_path):
    cfg = make_config(tmp_path, "harvest.cache_dir=", f"harvest.cache_root={tmp_path / 'root'}", "harvest.n_tokens=1280")
    path = harvest.run(cfg)["path"]
    c = Cache.open(path)
    assert c.meta["fingerprint_fields"] == list(FINGERPRINT_FIELDS)
    assert c.fingerprint == fingerprint(c.meta) and path.endswith(c.fingerprint)
    assert c.meta["model_weights"].startswith("sha256:") and c.meta["tokenizer"].startswith("sha256:")
    assert len(c.meta["dataset"]["sha256"]) == 64
    assert resolve_cache(cfg) == path  # train/analyze find it by the same request
    other = make_config(tmp_path, "harvest.cache_dir=", f"harvest.cache_root={tmp_path / 'root'}",
                        "harvest.n_tokens=1280", "harvest.data_seed=7")
    assert harvest.run(other)["path"] != path  # another data order is another cache
    with pytest.raises(CacheError, match="cli.py harvest"):
        resolve_cache(make_config(tmp_path, "harvest.cache_dir=", f"harvest.cache_root={tmp_path / 'empty'}"))


def test_subset_of_hooks_reuses_the_cache_without_model_work(tmp_path, monkeypatch):
    two = make_config(tmp_path, 'harvest.hooks=["blocks.0.hook_resid_pre", "blocks.1.hook_resid_post"]',
                      "harvest.n_tokens=1280")
    harvest.run(two)
    calls = []
    monkeypatch.setattr(harvest, "run_hooks", lambda *a, **k: calls.append(1))
    one = make_config(tmp_path, 'harvest.hooks=["blocks.1.hook_resid_post"]', "harvest.n_tokens=1280")
    assert harvest.run(one)["n_seq"] == 20 and not calls
    with pytest.raises(CacheError, match="blocks.1.hook_mlp_out"):
        harvest.run(make_config(tmp_path, 'harvest.hooks=["blocks.1.hook_mlp_out"]', "harvest.n_tokens=1280"))


def test_second_writer_is_refused_and_stale_locks_are_taken_over(tmp_path):
    w = CacheWriter(str(tmp_path / "c"), _meta())
    with pytest.raises(CacheError, match="being written by pid"):
        CacheWriter(str(tmp_path / "c"), _meta())
    w.close()
    CacheWriter(str(tmp_path / "c"), _meta()).close()  # released: a new writer may open it
    # A lock left by a dead process on this host is stale.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = WriterLock(str(tmp_path / "c"))
    info = dict(lock.mine, pid=int(dead.stdout), heartbeat=time.time())
    (tmp_path / "c" / ".tsae-writer.lock").write_text(json.dumps(info))
    CacheWriter(str(tmp_path / "c"), _meta()).close()


def test_reader_during_a_write_sees_only_committed_rows(tmp_path):
    path = str(tmp_path / "c")
    w = CacheWriter(path, _meta(n_seq_target=8, seq_chunk=2))
    for i in range(3):
        w.append(np.full((1, 2), i, np.int32), {"h": torch.full((1, 2, 3), float(i))})
    w.flush()  # rows 0..2 durable, row 3 of chunk 1 not yet written
    r = Cache.open(path)
    assert r.n_seq == 3 and n_chunks(r) == 2
    batches = list(ActivationReader(r, "h", [0, 1], batch_size=2, buffer_tokens=4, exclude_bos=False))
    toks = torch.cat([b.tokens for b in batches]).sort().values.tolist()
    assert toks == [0, 0, 1, 1, 2, 2]  # never a row >= n_seq
    for i in range(3, 8):
        w.append(np.full((1, 2), i, np.int32), {"h": torch.full((1, 2, 3), float(i))})
    w.finish()
    r.refresh()
    assert r.n_seq == 8 and r.tokens()[:, 0].tolist() == list(range(8))


def test_bfloat16_is_stored_losslessly(tmp_path):
    cfg = make_config(tmp_path, "harvest.dtype=bfloat16", "harvest.n_tokens=640")
    harvest.run(cfg)
    g = zarr.open_group(str(tmp_path / "cache"), mode="r")
    hook = cfg.harvest.hooks[0]
    assert g[f"acts/{hook}"].dtype == np.uint16 and g.attrs["tsae"]["dtype"] == "bfloat16"
    c = Cache.open(str(tmp_path / "cache"))
    # The fresh forward runs where the harvest ran (harvest.device "auto": CUDA when there is one), in the
    # harvest's batches: a CPU forward of a CUDA harvest, or one whole-cache batch, differs in rounding (other
    # kernels), which says nothing about storage. Then every stored bit must be the forward's.
    lm = load_model("tiny-gpt2", cfg.harvest.device)
    toks = torch.from_numpy(c.tokens()).long()
    fresh = torch.cat([run_hooks(lm, toks[row:row + len(b)].to(lm.device), [hook])[hook].to(torch.bfloat16).cpu()
                       for row, b in harvest.chunk_batches(iter(c.tokens()), 0, c.n_seq, c.seq_chunk,
                                                           cfg.harvest.batch_size)])
    assert torch.equal(c.acts_torch(hook, dtype=torch.bfloat16), fresh)


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_fsspec_urls(tmp_path, scheme):
    url = f"memory://tsae-test/{tmp_path.name}" if scheme == "memory" else f"file://{tmp_path / 'c'}"
    cfg = make_config(tmp_path, f"harvest.cache_dir={url}", "harvest.n_tokens=640")
    harvest.run(cfg)
    c = Cache.open(url)
    assert c.n_seq == 10 and c.meta["complete"]
    lm = load_model("tiny-gpt2", "cpu")
    hook = c.hooks[0]
    fresh = run_hooks(lm, torch.from_numpy(c.tokens()).long(), [hook])[hook]
    np.testing.assert_allclose(c.acts(hook), fresh.numpy(), rtol=1e-5, atol=1e-5)


def test_verify_catches_a_corrupted_chunk(tmp_path):
    cfg = make_config(tmp_path, "harvest.n_tokens=1280", "harvest.seq_chunk=4")
    harvest.run(cfg)
    path = str(tmp_path / "cache")
    runner = CliRunner()
    r = runner.invoke(cli.main, ["cache", "verify", path, "--samples", "20"])
    assert r.exit_code == 0 and "ok: " in r.output and "BAD" not in r.output, r.output
    g = zarr.open_group(path, mode="r+")
    hook = cfg.harvest.hooks[0]
    a = g[f"acts/{hook}"]
    a[8:12] = a[8:12] * 1.5  # chunk 2: plausible but wrong
    r = runner.invoke(cli.main, ["cache", "verify", path, "--samples", "20"])
    assert r.exit_code == 1 and "chunk 2" in r.output and "bad chunk(s): [2]" in r.output, r.output
    bad = a[0:4]
    bad[1, 2, 3] = np.nan
    a[0:4] = bad  # chunk 0: NaN, found by the scan alone
    r = runner.invoke(cli.main, ["cache", "verify", path, "--no-recompute"])
    assert r.exit_code == 1 and "chunk 0 (rows 0..3)" in r.output and "NaN" in r.output


def test_cache_ls_info_rm(tmp_path):
    root = tmp_path / "root"
    cfg = make_config(tmp_path, "harvest.cache_dir=", f"harvest.cache_root={root}", "harvest.n_tokens=640")
    path = harvest.run(cfg)["path"]
    runner = CliRunner()
    r = runner.invoke(cli.main, ["cache", "ls", str(root)])
    assert r.exit_code == 0 and path in r.output and "complete" in r.output and "640" in r.output
    r = runner.invoke(cli.main, ["cache", "info", path])
    assert r.exit_code == 0 and '"fingerprint"' in r.output
    r = runner.invoke(cli.main, ["cache", "rm", path])
    assert r.exit_code == 0 and not os.path.exists(path)
    r = runner.invoke(cli.main, ["cache", "rm", str(tmp_path)])
    assert r.exit_code == 2 and "no activation cache" in r.output


def _harvest_cmd(tmp, n_tokens=12800):
    return [sys.executable, str(ROOT / "cli.py"), "harvest", str(TINY), "--set", f"harvest.cache_dir={tmp}",
            "--set", f"harvest.dataset={PYDOC}", "--set", f"harvest.n_tokens={n_tokens}",
            "--set", "harvest.seq_chunk=4", "--set", "harvest.batch_size=2"]


def test_sigkill_at_random_points_then_resume_equals_an_uninterrupted_run(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    ref = tmp_path / "ref"
    subprocess.run(_harvest_cmd(ref), check=True, env=env, capture_output=True)
    crashed = tmp_path / "crashed"
    rng = np.random.default_rng(0)
    kills = 0
    for target in sorted(rng.integers(10, 190, size=3)):
        p = subprocess.Popen(_harvest_cmd(crashed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while p.poll() is None and time.time() < deadline:
            try:
                if zarr.open_group(str(crashed), mode="r").attrs["tsae"]["n_seq"] >= target:
                    break
            except Exception:
                pass
            time.sleep(0.005)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
    assert kills >= 2
    assert Cache.open(str(crashed)).n_seq < 200  # it really was interrupted
    subprocess.run(_harvest_cmd(crashed), check=True, env=env, capture_output=True)
    a, b = Cache.open(str(ref)), Cache.open(str(crashed))
    hook = a.hooks[0]
    assert a.n_seq == b.n_seq == 200 and b.meta["complete"]
    np.testing.assert_array_equal(a.tokens(), b.tokens())
    np.testing.assert_array_equal(a.acts(hook), b.acts(hook))  # bitwise equal on CPU
    np.testing.assert_array_equal(a.unigram(hook).numpy(), b.unigram(hook).numpy())
    n_chunks = -(-200 // b.seq_chunk)  # every chunk has its checksum
    assert a.meta["checksums"] == b.meta["checksums"] and len(b.meta["checksums"]["tokens"]) == n_chunks


def test_two_worker_dask_harvest_equals_one_process(tmp_path):
    one = make_config(tmp_path / "one", "harvest.n_tokens=3200", "harvest.seq_chunk=4", "harvest.batch_size=3")
    harvest.run(one)
    two = make_config(tmp_path / "two", "harvest.n_tokens=3200", "harvest.seq_chunk=4", "harvest.batch_size=3",
                      "harvest.workers=2")
    harvest.run(two)
    a, b = Cache.open(one.harvest.cache_dir), Cache.open(two.harvest.cache_dir)
    hook = a.hooks[0]
    assert a.n_seq == b.n_seq == 50 and b.meta["complete"] and a.fingerprint == b.fingerprint
    np.testing.assert_array_equal(a.tokens(), b.tokens())
    np.testing.assert_array_equal(a.acts(hook), b.acts(hook))
    np.testing.assert_array_equal(a.unigram(hook).numpy(), b.unigram(hook).numpy())


@pytest.fixture
def s3_server(monkeypatch):
    """A real S3-compatible server (moto) on a free loopback port, with the env pointing s3fs at it."""
    import socket

    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for k, v in dict(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1",
                     AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}").items():
        monkeypatch.setenv(k, v)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("tsae-bucket")
    yield "s3://tsae-bucket"
    server.stop()


def test_s3_cache_on_a_local_moto_server(tmp_path, s3_server):
    url = f"{s3_server}/cache"
    cfg = make_config(tmp_path, f"harvest.cache_dir={url}", "harvest.n_tokens=1280", "harvest.seq_chunk=4")
    harvest.run(cfg)
    local = make_config(tmp_path, "harvest.n_tokens=1280", "harvest.seq_chunk=4")
    harvest.run(local)
    a, b = Cache.open(url), Cache.open(local.harvest.cache_dir)
    hook = a.hooks[0]
    assert a.n_seq == 20 and a.meta["complete"] and a.fingerprint == b.fingerprint
    np.testing.assert_array_equal(a.acts(hook), b.acts(hook))
    tr = list(ActivationReader(a, hook, [0, 1, 2], batch_size=64, buffer_tokens=256))
    assert sum(len(x.tokens) for x in tr) == 12 * 63
    with pytest.raises(CacheError, match="differing fields"):
        harvest.run(make_config(tmp_path, f"harvest.cache_dir={url}", "harvest.n_tokens=1280", "harvest.data_seed=3"))
