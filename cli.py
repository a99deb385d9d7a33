"""tsae command line: ``python cli.py {harvest,train,analyze,run} CONFIG [--set section.key=value ...]``."""

from __future__ import annotations

import logging
import os
import sys
import warnings

import click

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")



def _user_errors() -> tuple[type[BaseException], ...]:
    from pipeline.cache import CacheError
    from pipeline.config import ConfigError
    from pipeline.corpus import DatasetLoadError
    from pipeline.models import ModelLoadError

    return (CacheError, ConfigError, DatasetLoadError, ModelLoadError)


def _load(config: str, overrides: tuple[str, ...]):
    from pipeline.config import load_config

    return load_config(config, overrides)


def _quiet_libraries() -> None:
    for name in ("transformers", "transformer_lens", "datasets", "huggingface_hub", "root"):
        logging.getLogger(name if name != "root" else None).setLevel(logging.ERROR)
    logging.getLogger("pipeline").setLevel(logging.INFO)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # pragma: no cover - logging cosmetics only
        pass


def _guard(fn):
    """Run a stage; our own errors print their message and exit with status 2."""
    def wrapper(*args, **kwargs):
        _quiet_libraries()
        try:
            return fn(*args, **kwargs)
        except _user_errors() as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


set_option = click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                          help="Override a config value (repeatable), e.g. --set harvest.n_tokens=50000")
config_arg = click.argument("config", type=click.Path(dir_okay=False))


@click.group()
def main() -> None:
    """tsae: sparse autoencoders (plain and tokenized) on language-model activations."""


@main.command()
@config_arg
@set_option
@_guard
def harvest(config: str, overrides: tuple[str, ...]) -> None:
    """Run the model over the corpus and write the Zarr activation cache."""
    from stages import harvest as stage

    cfg = _load(config, overrides)
    s = stage.run(cfg)
    speed = f"; {s['new_tokens']:,} new tokens at {s['tokens_per_s']:,.0f} tokens/s" if s.get("new_tokens") else ""
    click.echo(f"cache: {s['path']} ({s['n_seq']} sequences, {s['tokens']:,} tokens{speed})")


@main.command()
@config_arg
@set_option
@_guard
def train(config: str, overrides: tuple[str, ...]) -> None:
    """Train every SAE in [[train.saes]] from the cache, sharing batches."""
    from stages import train as stage

    cfg = _load(config, overrides)
    s = stage.run(cfg)
    click.echo(stage.format_table(s["results"]))
    click.echo(f"SAEs: {s['out_dir']}")


@main.command()
@config_arg
@set_option
@_guard
def analyze(config: str, overrides: tuple[str, ...]) -> None:
    """n-gram statistics, MSE by token frequency and unigram feature counts, with plots."""
    from stages import analyze as stage

    cfg = _load(config, overrides)
    s = stage.run(cfg)
    click.echo(f"analysis: {s['out_dir']} (summary: {s['summary']})")


@main.command()
@config_arg
@set_option
@_guard
def run(config: str, overrides: tuple[str, ...]) -> None:
    """harvest → train → analyze in one go, then print the summary table."""
    import time

    from stages import analyze, harvest, train

    cfg = _load(config, overrides)
    times = {}
    t = time.perf_counter()
    h = harvest.run(cfg)
    times["harvest"] = time.perf_counter() - t
    t = time.perf_counter()
    tr = train.run(cfg)
    times["train"] = time.perf_counter() - t
    t = time.perf_counter()
    an = analyze.run(cfg)
    times["analyze"] = time.perf_counter() - t
    click.echo("")
    click.echo(f"cache:    {h['path']}  ({h['tokens']:,} tokens; harvest {h['tokens_per_s']:,.0f} tokens/s)")
    click.echo(f"SAEs:     {tr['out_dir']}")
    click.echo(f"analysis: {an['out_dir']}  (summary: {an['summary']})")
    click.echo("wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))
    click.echo("")
    click.echo(train.format_table(tr["results"], an.get("unigram_fraction")))


if __name__ == "__main__":
    main()
