"""Architecture name (``cfg.json``'s ``architecture``) → SAE class (one line per architecture), and
:func:`load_sae`, which dispatches on it."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline.saes.base import CONFIG_FILE, SAE, TRAINING_BUFFERS, WEIGHTS_FILE, SAEParams
from pipeline.saes.batchtopk import BatchTopKSAE
from pipeline.saes.gated import GatedSAE
from pipeline.saes.jumprelu import JumpReLUSAE
from pipeline.saes.matryoshka import MatryoshkaBatchTopKSAE
from pipeline.saes.relu import ReLUSAE
from pipeline.saes.topk import TopKSAE

ARCHITECTURES: dict[str, type[SAE]] = {
    "relu": ReLUSAE,
    "gated": GatedSAE,
    "topk": TopKSAE,
    "batchtopk": BatchTopKSAE,
    "jumprelu": JumpReLUSAE,
    "matryoshka_batchtopk": MatryoshkaBatchTopKSAE,
}


def load_sae(folder: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE saved by :meth:`SAE.save` (a folder with ``cfg.json`` + ``sae.safetensors``) in eval mode.

    Dispatches on ``cfg.json``'s ``architecture`` through :data:`ARCHITECTURES`; parameters come back
    float32 on ``device``. Raises FileNotFoundError (missing files) or ValueError (unknown architecture,
    unknown cfg fields, or tensors that do not match the config).
    """
    folder = Path(folder)
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_FILE}: not a saved tsae SAE")
    params = SAEParams.from_dict(json.loads(cfg_path.read_text()))
    if params.architecture not in ARCHITECTURES:
        raise ValueError(f"{folder}: unknown architecture {params.architecture!r}; known: {sorted(ARCHITECTURES)}")
    sae = ARCHITECTURES[params.architecture](params)
    if not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{folder} has {CONFIG_FILE} but no {WEIGHTS_FILE}")
    state = load_file(folder / WEIGHTS_FILE)
    missing, unexpected = sae.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in TRAINING_BUFFERS]
    if missing or unexpected:
        raise ValueError(f"{folder / WEIGHTS_FILE}: missing tensors {missing}, unexpected {unexpected}")
    return sae.to(device).eval()
