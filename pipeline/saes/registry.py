"""Architecture name (``cfg.json``'s ``architecture``) → SAE class. One line per architecture."""

from __future__ import annotations

from pipeline.saes.base import SAE
from pipeline.saes.topk import TopKSAE

ARCHITECTURES: dict[str, type[SAE]] = {
    "topk": TopKSAE,
}
