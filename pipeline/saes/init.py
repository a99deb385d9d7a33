"""Deterministic random initialisation of SAEs: one init seed per SAE, rebuilt from ``cfg.json``.

Each SAE of a training run draws its random weights (``SAE.reset_parameters``: W_dec rows, W_enc = W_decᵀ)
from its own *init seed*, derived from the run's seed and the SAE's name by :func:`derive_init_seed`
(SHA-256, so it is stable across processes and Python versions, unlike ``hash()``). Two SAEs therefore
start from unrelated dictionaries unless the config pairs them on purpose (``init_like``), in which case
the twin takes its partner's init seed: with the same initialisation scheme and sizes their random
weights are identical, and a tokenized twin then differs only by its lookup and the α scaling applied by
:meth:`SAE.init_from_data` (data-dependent: W_lookup = α·unigram, W_enc ← (1 − α)·W_enc, b_dec).

The random part of the initialisation never depends on data, so analyses rebuild it from the recorded
seed (:func:`initial_sae`, :func:`initial_decoder`) to compare trained SAEs with where they started
(e.g. the matching statistics at initialisation). Directions are all they need: the data-dependent
steps rescale W_enc but never change W_dec or any direction.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from pipeline.saes.base import SAE, SAEParams


def derive_init_seed(seed: int, name: str) -> int:
    """The init seed of SAE ``name`` in a run seeded ``seed``: an int in [0, 2³²).

    The first 4 bytes (big-endian) of SHA-256 of ``"tsae-init:<seed>:<name>"``: stable across processes,
    machines and Python versions.
    """
    digest = hashlib.sha256(f"tsae-init:{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def same_init_scheme(a: str, b: str) -> bool:
    """Whether architectures ``a`` and ``b`` draw their random weights the same way (same ``reset_parameters``),
    so that equal init seeds and sizes give them identical initial W_dec and W_enc."""
    from pipeline.saes.registry import ARCHITECTURES

    return ARCHITECTURES[a].reset_parameters is ARCHITECTURES[b].reset_parameters


def initial_sae(params: SAEParams, init_seed: int) -> SAE:
    """A new SAE of ``params`` (on the CPU) with its random weights drawn from ``init_seed``.

    The global torch RNG is left as it was (``torch.random.fork_rng``). The data-dependent part of the
    initialisation (:meth:`SAE.init_from_data`) is not applied. Raises ValueError as :class:`SAE` does.
    """
    from pipeline.saes.registry import ARCHITECTURES

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(init_seed))
        return ARCHITECTURES[params.architecture](params)


def recorded_init_seed(params: SAEParams) -> int | None:
    """The init seed a saved SAE was trained from (``extra.train.init_seed``); for runs written before init
    seeds were recorded, ``extra.train.seed`` (they seeded the RNG with it before building each SAE); None when
    neither is recorded."""
    train = (params.extra or {}).get("train", {})
    for key in ("init_seed", "seed"):
        if train.get(key) is not None:
            return int(train[key])
    return None


def initial_decoder(sae: SAE) -> Tensor | None:
    """The decoder W_dec [d_sae, d_model] float32 (CPU) that ``sae`` started training from, rebuilt from its
    recorded init seed (:func:`recorded_init_seed`); None when no seed is recorded.

    In training units (before the input scale was folded in): equal to the saved SAE's initial W_dec up to
    one positive scalar, so every direction and cosine is exact. The initial encoder directions are the same
    (W_enc = W_decᵀ at init, up to a positive scale).
    """
    seed = recorded_init_seed(sae.params)
    if seed is None:
        return None
    # The lookup draws nothing from the RNG: rebuild without it (no [d_vocab, d_model] table to allocate).
    p = SAEParams.from_dict({**sae.params.__dict__, "extra": {}, "tokenized": False, "d_vocab": 0, "lookup_rows": 0,
                                "lookup_ngram": 1})
    return initial_sae(p, seed).W_dec.detach().float()
