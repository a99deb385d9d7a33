"""tsae's public Python API: a thin re-export of ``pipeline`` (the code lives there; nothing moves).

    import tsae
    sae = tsae.load_sae("runs/tiny/saes/topk-tok")          # cfg.json + sae.safetensors
    f = sae.encode(x)                                       # x [n, d_model] → latents [n, d_sae]
    x_hat = sae.reconstruct(x, tokens)                      # = sae.decode(f, tokens); tokens [n] int64
    lm = tsae.load_model("tiny-gpt2")                       # transformer_lens TransformerBridge inside
    with tsae.splice_saes(lm, [sae]):                       # SAEs replace their hook's activation
        loss = lm.bridge(token_ids, return_type="loss")

Importing it has no side effects (no environment or allocator changes; the ``tsae`` command does those).
"""

from pipeline import __version__
from pipeline.cache import Cache
from pipeline.evaluation import cache_tokens, ce_losses, load_cache_model, sae_reconstructor
from pipeline.export import export_saelens, tsae_lookup
from pipeline.models import LM, load_model
from pipeline.saes import ARCHITECTURES, SAE, ForwardOutput, SAEParams, SparseCode, load_sae
from pipeline.splice import run_with_saes, splice_saes

__all__ = [
    "ARCHITECTURES", "LM", "SAE", "Cache", "cache_tokens", "ForwardOutput", "SAEParams", "SparseCode", "__version__", "ce_losses",
    "export_saelens", "load_cache_model", "load_model", "load_sae", "run_with_saes", "sae_reconstructor",
    "splice_saes", "tsae_lookup",
]
