import pytest

from pipeline.config import ConfigError, apply_override, load_config
from tests.conftest import TINY


def test_tiny_config_loads_with_defaults():
    cfg = load_config(TINY)
    assert cfg.harvest.model == "tiny-gpt2"
    assert [s.name for s in cfg.train.saes] == ["topk", "topk-tok", "topk-s1", "topk-small"]
    assert cfg.train.saes[1].tokenized and not cfg.train.saes[0].tokenized
    assert cfg.cache_dir == cfg.harvest.cache_dir  # train.cache_dir defaults to harvest.cache_dir


def test_overrides_parse_toml_literals_and_index_lists():
    cfg = load_config(TINY, ["harvest.n_tokens=1234", "train.lr=3e-4", "harvest.hooks=[\"blocks.0.hook_resid_pre\"]",
                             "train.saes.1.k=4", "train.cache_dir=/elsewhere", "harvest.prepend_bos=false"])
    assert cfg.harvest.n_tokens == 1234 and cfg.train.lr == 3e-4
    assert cfg.harvest.hooks == ["blocks.0.hook_resid_pre"]
    assert cfg.train.saes[1].k == 4 and cfg.train.saes[0].k == 8
    assert cfg.cache_dir == "/elsewhere"
    assert cfg.harvest.prepend_bos is False


@pytest.mark.parametrize("override, message", [
    ("harvest.nonsense=1", "unknown key"),
    ("harvest.dtype=float8", "harvest.dtype"),
    ("harvest.n_tokens=abc", "should be int"),
    ("train.saes.0.architecture=relu9", "unknown"),
    ("train.saes.0.alpha=1.5", "alpha"),
    ("train.buffer_tokens=10", "shuffle buffer"),
    ("train.saes.7.k=3", "list"),
    ("analyze.analyses=[\"nope\"]", "unknown entries"),
    ("bogus.key=1", "unknown section"),
])
def test_bad_values_are_refused_with_the_key_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, [override])


def test_override_without_equals_is_refused():
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_override({}, "harvest.n_tokens")


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")


def test_ce_every_must_fall_on_log_steps():
    with pytest.raises(ConfigError, match="multiple of train.log_every"):
        load_config(TINY, ["train.ce_every=7"])
