"""Optional experiment logging to Weights & Biases (``train.wandb = true``): the metrics training writes to
``metrics.jsonl`` and ``eval.json``, under ``<SAE name>/<metric>`` keys, one wandb run per ``train`` run.

wandb is an optional extra (``pip install 'tsae[wandb]'``), imported only when asked for. Without a
network set ``WANDB_MODE=offline``: the run is written under ``WANDB_DIR`` (default ``./wandb``) and can
be uploaded later with ``wandb sync``.
"""

from __future__ import annotations

import math
from typing import Any


class TrackingError(RuntimeError):
    """The tracker asked for cannot be used (package missing); the message says what to install."""


def _numbers(row: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(float(v))}


class WandbLogger:
    """One wandb run: :meth:`log` per log step, :meth:`summary` with the final evaluation, :meth:`finish`.

    project / name / config: passed to ``wandb.init`` (config: the run's ``[train]`` settings, a dict).
    Raises TrackingError when wandb is not installed.
    """

    def __init__(self, project: str, name: str | None, config: dict[str, Any], directory: str | None = None):
        try:
            import wandb
        except ImportError as e:
            raise TrackingError("train.wandb = true needs the wandb package: pip install 'tsae[wandb]' "
                                "(or set train.wandb = false)") from e
        self._wandb = wandb
        self.run = wandb.init(project=project, name=name, config=config, dir=directory)

    def log(self, step: int, rows: dict[str, dict[str, Any]]) -> None:
        """Log {SAE name: metrics row} at training step ``step`` as ``<name>/<metric>`` (numbers only)."""
        flat = {f"{n}/{k}": v for n, row in rows.items() for k, v in _numbers(row).items() if k != "step"}
        self.run.log(flat, step=step)

    def summary(self, results: list[dict[str, Any]]) -> None:
        """The final held-out evaluation of every SAE (``eval.json``) as ``<name>/final_<metric>`` summary values."""
        for r in results:
            for k, v in _numbers(r).items():
                self.run.summary[f"{r['name']}/final_{k}"] = v

    def finish(self) -> None:
        self.run.finish()
