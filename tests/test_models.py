import time

import pytest

from pipeline.models import ModelLoadError, check_hooks, load_model, stop_layer


def test_stop_layer():
    assert stop_layer(["blocks.3.hook_resid_pre", "blocks.1.hook_resid_post"]) == 4
    assert stop_layer(["ln_final.hook_normalized"]) is None


def test_unknown_hook_is_refused(tiny_lm):
    with pytest.raises(ModelLoadError, match="blocks.9.hook_resid_pre"):
        check_hooks(tiny_lm, ["blocks.9.hook_resid_pre"])


def test_hub_model_offline_fails_within_seconds(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    with pytest.raises(ModelLoadError, match="embedded default"):
        load_model("no-such-org/no-such-model-xyz", "cpu")
    assert time.perf_counter() - t < 5


def test_tiny_models_are_deterministic_and_distinct(tiny_lm):
    again = load_model("tiny-gpt2", "cpu")
    a = dict(tiny_lm.bridge.named_parameters())
    b = dict(again.bridge.named_parameters())
    assert all((a[k] == b[k]).all() for k in a)
    llama = load_model("tiny-llama", "cpu")
    assert llama.d_model == tiny_lm.d_model == 64 and llama.d_vocab == tiny_lm.d_vocab
