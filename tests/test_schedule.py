"""Learning-rate schedules (pipeline.training.lr_lambda) and the [train] schedule settings."""

import math

import pytest
import torch

from pipeline.config import ConfigError, TrainConfig
from pipeline.saes import ARCHITECTURES, SAEParams
from pipeline.training import MultiTrainer, TrainOptions, lr_lambda


def test_wsd_is_warmup_then_constant_then_linear_decay_over_the_last_fraction():
    total, warm, frac, final = 100, 10, 0.2, 0.1
    f = lr_lambda(warm, total, final, "wsd", frac)
    # warm-up: (step + 1) / warmup
    assert [f(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    # stable phase: exactly 1 from the end of the warm-up up to the decay start (step 80)
    assert all(f(s) == 1.0 for s in range(9, 81))
    # decay: final + (1 - final) * (total - step) / 20 over the last 20 steps
    for s in (81, 90, 99, 100):
        assert f(s) == pytest.approx(final + (1 - final) * (total - s) / 20)
    assert f(99) < f(90) < f(81) < 1.0
    assert f(100) == pytest.approx(final)


def test_constant_and_cosine_schedules():
    c = lr_lambda(4, 50, 0.0, "constant")
    assert [c(s) for s in (0, 3, 25, 49)] == pytest.approx([0.25, 1.0, 1.0, 1.0])
    cos = lr_lambda(0, 50, 0.2, "cosine")
    for s in (0, 10, 25, 49, 50):
        assert cos(s) == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * s / 50)))
    with pytest.raises(ValueError, match="schedule"):
        lr_lambda(0, 10, 0.0, "linear")
    with pytest.raises(ValueError, match="decay_frac"):
        lr_lambda(0, 10, 0.0, "wsd", 0.0)


def test_trainer_applies_the_schedule_to_every_optimizer_step():
    """The Adam lr used at step s is lr * f(s) for the SAE and lookup_lr * f(s) for its lookup."""
    torch.manual_seed(0)
    params = SAEParams(architecture="topk", d_model=8, d_sae=16, k=2, tokenized=True, d_vocab=5)
    sae = ARCHITECTURES["topk"](params)
    opts = TrainOptions(total_steps=10, warmup_steps=2, lr_schedule="wsd", lr_decay_frac=0.5, lr_final_frac=0.0)
    tr = MultiTrainer({"s": (sae, 1e-3, 0.1)}, opts)
    f = lr_lambda(2, 10, 0.0, "wsd", 0.5)
    seen = []
    for _ in range(10):
        m = tr.members[0]
        seen.append((m.optimizers[0].param_groups[0]["lr"], m.optimizers[1].param_groups[0]["lr"]))
        tr.step(torch.randn(32, 8), torch.randint(0, 5, (32,)), log=False)
    assert [a for a, _ in seen] == pytest.approx([1e-3 * f(s) for s in range(10)])
    assert [b for _, b in seen] == pytest.approx([0.1 * f(s) for s in range(10)])
    assert seen[4][0] == pytest.approx(1e-3) and seen[9][0] == pytest.approx(1e-3 / 5)


def test_train_config_schedule_defaults_and_validation():
    t = TrainConfig()
    assert (t.lr_schedule, t.lr_decay_frac, t.grad_clip, t.b_dec_init) == ("wsd", 0.2, 1.0, "geometric_median")
    t.validate()
    for key, bad in (("lr_schedule", "step"), ("lr_decay_frac", 0.0), ("lr_decay_frac", 1.5)):
        t = TrainConfig(**{key: bad})
        with pytest.raises(ConfigError, match=key):
            t.validate()
