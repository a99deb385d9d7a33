import json

import numpy as np
import torch

from pipeline.cache import Cache
from pipeline.metrics import nmse
from pipeline.reader import load_tokens
from pipeline.saes import load_sae
from stages import train
from tests.conftest import make_config


def test_train_writes_saes_whose_nmse_falls_and_lookup_trains(tiny_cache, tmp_path):
    cfg, cache = tiny_cache
    cfg = make_config(tmp_path, f"harvest.cache_dir={cfg.harvest.cache_dir}", f"harvest.model={cache.meta['model']}",
                      "train.n_epochs=3", "train.log_every=2", "train.batch_size=256", "train.buffer_tokens=2048",
                      "train.holdout_frac=0.2")
    summary = train.run(cfg)
    res = {r["name"]: r for r in summary["results"]}
    assert set(res) == {"topk", "topk-tok"}
    for name in res:
        log = [json.loads(line) for line in open(tmp_path / "saes" / name / "metrics.jsonl")]
        assert log[-1]["heldout_nmse"] < 0.8 * log[0]["heldout_nmse"]  # NMSE falls during training
        assert log[-1]["tokens"] == summary["results"][0]["tokens_seen"]
        assert abs(np.mean([r["l0"] for r in log]) - 8) < 0.5

    # The saved SAE takes raw activations (scale folded) and reproduces the held-out NMSE.
    hook = cache.hooks[0]
    tok = load_sae(tmp_path / "saes" / "topk-tok")
    held = tok.params.extra["heldout_chunks"]
    x, t = load_tokens(cache, hook, held, 65_536)
    with torch.no_grad():
        assert abs(float(nmse(x, tok(x, t).x_hat)) - res["topk-tok"]["nmse"]) < 1e-3

    # The lookup starts at alpha * unigram and moves during training.
    scale = tok.params.extra["input_scale_folded"]
    init = 0.5 * cache.unigram(hook)  # in raw units: (alpha * c * unigram) / c
    seen = torch.unique(torch.from_numpy(cache.tokens()[:, 1:]).long())
    delta = (tok.W_lookup[seen] - init[seen]).norm(dim=1)
    assert (delta > 1e-3 * init[seen].norm(dim=1).mean()).float().mean() > 0.5
    unseen = torch.ones(cache.meta["d_vocab"], dtype=torch.bool)
    unseen[torch.from_numpy(cache.tokens()).long().unique()] = False
    if unseen.any():  # rows of tokens never seen get no gradient
        torch.testing.assert_close(tok.W_lookup[unseen], init[unseen], rtol=1e-4, atol=1e-5)
    assert scale > 0
    assert (tmp_path / "saes" / "training_curves.png").stat().st_size > 1000


def test_initial_lookup_is_alpha_unigram(tiny_cache, tmp_path, monkeypatch):
    """Zero training steps' worth of lr: the saved lookup equals alpha * unigram exactly."""
    cfg, cache = tiny_cache
    cfg = make_config(tmp_path, f"harvest.cache_dir={cfg.harvest.cache_dir}", "train.saes.1.alpha=0.3",
                      "train.saes.1.lookup_lr_scale=1e-30", "train.lr=1e-30", "train.n_epochs=0.1",
                      "train.batch_size=256", "train.buffer_tokens=2048")
    train.run(cfg)
    tok = load_sae(tmp_path / "saes" / "topk-tok")
    torch.testing.assert_close(tok.W_lookup, 0.3 * Cache.open(cfg.cache_dir).unigram(cache.hooks[0]),
                               rtol=1e-5, atol=1e-6)
