"""The training loop's per-SAE options and logging (pipeline/training.py, stages/train.py Spec.options):
logged L0 vs the L0 penalty, JumpReLU's scale and threshold learning rate, ReLU/gated April-update defaults,
the dead-latent window."""

import copy
import math

import pytest
import torch

from pipeline import metrics as M
from pipeline.reader import load_tokens, split_chunks
from pipeline.saes import ARCHITECTURES, SAEParams
from pipeline.training import MemberOptions, MultiTrainer, TrainOptions, input_scale
from stages import train
from tests.conftest import make_config

ARCHS = ["relu", "gated", "topk", "batchtopk", "jumprelu", "matryoshka_batchtopk"]


def _data(cache, n=4096):
    """Scaled training tokens of the tiny cache (E‖x‖² = d_model, as the trainer sees them)."""
    tr, _ = split_chunks(cache, 0.2, 0)
    x, t = load_tokens(cache, cache.hooks[0], tr, n)
    return x * input_scale(x), t


def _specs(cache, tmp_path, *saes: str, steps: int = 50):
    """train.plan's specs (config → SAE params, so the config's unit-scale JumpReLU values are converted)."""
    tables = ", ".join("{" + s + "}" for s in saes)
    cfg = make_config(tmp_path, f"train.saes=[{tables}]")
    return cfg, train.plan(cfg, cache, cache.hooks[0])


def _trainer(cfg, specs, x, t, steps):
    members = {}
    for s in specs:
        torch.manual_seed(0)
        sae = ARCHITECTURES[s.params.architecture](s.params)
        sae.init_from_data(x[:1024], t[:1024])
        members[s.name] = (sae, s.lr, s.lr * s.cfg.lookup_lr_scale, s.options(cfg.train, steps))
    return MultiTrainer(members, TrainOptions(total_steps=steps, warmup_steps=1, lr_final_frac=1.0))


@pytest.mark.parametrize("arch", ARCHS)
def test_logged_l0_is_the_measured_l0_and_penalties_have_their_own_name(arch):
    """The step's ``l0`` is the batch's mean number of active latents for every architecture; JumpReLU's λ·L0
    loss term (which used to overwrite it) is logged as ``l0_penalty``."""
    torch.manual_seed(0)
    sae = ARCHITECTURES[arch](SAEParams(architecture=arch, d_model=8, d_sae=32, k=4, sparsity_coeff=0.5,
                                        bandwidth=0.5, init_threshold=0.3))
    x = torch.randn(64, 8) * 2
    trainer = MultiTrainer({"s": (sae, 1e-3, 1e-3)}, TrainOptions(total_steps=2))
    ref = copy.deepcopy(sae).train()
    with torch.no_grad():
        out = ref(x)
        measured = float(M.l0(out.latents))
    logged = trainer.step(x, torch.zeros(64, dtype=torch.long))["s"]
    assert logged["l0"] == pytest.approx(measured)
    if arch == "jumprelu":
        assert measured > 1 and logged["l0_penalty"] == pytest.approx(0.5 * measured, rel=1e-5)
    assert not set(out.terms) & set(MultiTrainer.METRICS)


def test_jumprelu_scale_threshold_lr_and_lambda(tiny_cache, tmp_path):
    """At the default (unit-scale) ε and θ₀ the SAE gets ε·√d_model; log θ has its own Adam group at the
    threshold lr; thresholds move measurably within 50 steps; and λ changes the learned L0."""
    _, cache = tiny_cache
    x, t = _data(cache)
    cfg, specs = _specs(cache, tmp_path, 'name="lo", architecture="jumprelu", expansion=2, sparsity_coeff=0.1',
                        'name="hi", architecture="jumprelu", expansion=2, sparsity_coeff=10.0')
    d = int(cache.meta["d_model"])
    for s in specs:
        assert s.params.bandwidth == pytest.approx(0.001 * math.sqrt(d))
        assert s.params.init_threshold == pytest.approx(0.001 * math.sqrt(d))
    steps = 50
    trainer = _trainer(cfg, specs, x, t, steps)
    m = trainer.members[0]
    groups = m.optimizers[0].param_groups
    assert [g["lr"] for g in groups] == [specs[0].lr, specs[0].options(cfg.train, steps).param_lr["log_threshold"]]
    assert groups[1]["params"][0] is m.sae.log_threshold
    before = {mm.name: mm.sae.log_threshold.detach().clone() for mm in trainer.members}
    for i in range(steps):
        s = (i * 512) % (len(x) - 512)
        trainer.step(x[s:s + 512], t[s:s + 512], log=False)
    moved = {mm.name: float((mm.sae.log_threshold.detach() - before[mm.name]).abs().mean())
             for mm in trainer.members}
    assert moved["lo"] > 0.5 and moved["hi"] > 0.5  # log θ: θ changed by a factor > e^0.5 on average
    held = trainer.evaluate(x, t)
    assert held["hi"]["l0"] < 0.7 * held["lo"]["l0"]


def test_relu_and_gated_get_april_update_clip_and_warmup_by_default(tiny_cache, tmp_path):
    _, cache = tiny_cache
    cfg, specs = _specs(cache, tmp_path, 'name="r", architecture="relu"', 'name="g", architecture="gated"',
                        'name="t", architecture="topk"', 'name="r2", architecture="relu", grad_clip=0.0, '
                        'sparsity_warmup_frac=0.0')
    opts = {s.name: s.options(cfg.train, 200) for s in specs}
    for n in ("r", "g"):
        assert (opts[n].grad_clip, opts[n].sparsity_warmup_steps) == (1.0, 10)  # clip 1, λ over 5% of steps
    assert (opts["t"].grad_clip, opts["t"].sparsity_warmup_steps) == (1.0, 0)  # train.grad_clip's default, 1
    assert (opts["r2"].grad_clip, opts["r2"].sparsity_warmup_steps) == (0.0, 0)  # the SAE's own setting wins
    cfg.train.grad_clip = 0.5
    assert train.Spec.options(specs[0], cfg.train, 200).grad_clip == 0.5  # an explicit train.grad_clip wins
    cfg.train.grad_clip = 0.0  # 0: each architecture's own default (topk: off; relu / gated: 1)
    assert [train.Spec.options(specs[i], cfg.train, 200).grad_clip for i in (0, 2)] == [1.0, 0.0]

    # the trainer applies them per SAE: λ ramps over the member's warm-up; the clip bounds the gradient norm
    x, t = _data(cache, 1024)
    trainer = _trainer(cfg, specs[:1], x, t, 200)
    trainer.members[0].grad_clip = 1e-3
    norms = []
    trainer.members[0].optimizers[0].register_step_pre_hook(lambda opt, args, kwargs: norms.append(math.sqrt(sum(
        float(p.grad.pow(2).sum()) for g in opt.param_groups for p in g["params"] if p.grad is not None))))
    trainer.step(x[:256], t[:256], log=False)
    assert trainer.members[0].sae.sparsity_scale == pytest.approx(1 / 10)
    assert norms[0] == pytest.approx(1e-3, rel=1e-3)


def test_param_lr_names_must_exist():
    sae = ARCHITECTURES["topk"](SAEParams(architecture="topk", d_model=4, d_sae=8, k=2))
    with pytest.raises(ValueError, match="log_threshold"):
        MultiTrainer({"s": (sae, 1e-3, 1e-3, MemberOptions(param_lr={"log_threshold": 1e-2}))},
                     TrainOptions(total_steps=1))


def test_dead_window_is_10m_when_the_run_is_long_enough_else_a_quarter_with_a_warning(capsys):
    assert train.dead_window(0, 50_000_000) == 10_000_000
    assert capsys.readouterr().err == ""
    assert train.dead_window(0, 268_288) == 67_072
    err = capsys.readouterr().err
    assert "silent for the last 67,072 training tokens" in err
    assert train.dead_window(20_000, 72_704) == 20_000  # an explicit setting is kept (and explained)
    assert train.dead_window(500_000, 72_704) == 500_000
    assert "no latent can be dead" in capsys.readouterr().err
