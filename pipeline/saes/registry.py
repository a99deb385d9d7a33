"""Architecture name (``cfg.json``'s ``architecture``) → SAE class. One line per architecture."""

from __future__ import annotations

from pipeline.saes.base import SAE
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
