"""Run a language model with SAE reconstructions spliced in at their hook points.

Inside ``with splice_saes(lm, saes):`` every forward of the model (``lm.bridge(tokens)``,
``run_with_hooks``, ``run_with_cache``, ``generate`` …) replaces the activation x at each SAE's hook
(``sae.params.hook``, or the key of a ``{hook: sae}`` mapping) by x̂ = ``sae.reconstruct(x, tokens)``;
tokenized SAEs get the token ids of the current forward, read from the model's embedding input, so
string inputs work too. On exit the model is as before. This is SAELens' ``HookedSAETransformer.saes()``
/ ``run_with_saes`` for a transformer_lens ``TransformerBridge``, without the error term.

Conventions are those of the CE evaluation (:mod:`pipeline.evaluation`), so a spliced
``bridge(tokens, return_type="loss")`` equals its ``ce_spliced`` on the same tokens:

* the SAE runs in float32 on its own device; x̂ is cast back to the activation's dtype and device;
* ``exclude_bos=True`` keeps the clean activation at position 0 of every sequence whose first token is
  BOS (SAEs are trained without BOS positions); the BOS id is ``lm.bos_token_id`` for a
  :class:`pipeline.models.LM` (which may differ from the tokenizer's, e.g. SmolLM2 uses <|endoftext|>),
  else ``bos_token_id`` or the bridge tokenizer's BOS.

Hooks are plain PyTorch forward hooks on the hook points (removed on exit), so they coexist with
transformer_lens' own hooks and survive its ``reset_hooks``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor

from pipeline.saes.base import SAE


def _bridge(model: Any) -> Any:
    """The TransformerBridge of an :class:`pipeline.models.LM` or the bridge itself."""
    return getattr(model, "bridge", model)


def _by_hook(saes: SAE | Iterable[SAE] | Mapping[str, SAE]) -> list[tuple[str, SAE]]:
    if isinstance(saes, SAE):
        saes = [saes]
    pairs = list(saes.items()) if isinstance(saes, Mapping) else [(s.params.hook, s) for s in saes]
    for hook, sae in pairs:
        if not isinstance(sae, SAE):
            raise TypeError(f"expected tsae SAEs (pipeline.saes.SAE), got {type(sae).__name__}")
        if not hook:
            raise ValueError("an SAE has no hook point recorded (params.hook is empty): pass {hook: sae} instead")
    hooks = [h for h, _ in pairs]
    dup = sorted({h for h in hooks if hooks.count(h) > 1})
    if dup:
        raise ValueError(f"more than one SAE at {dup}: splice one SAE per hook point")
    return pairs


@contextmanager
def splice_saes(model: Any, saes: SAE | Iterable[SAE] | Mapping[str, SAE], *, exclude_bos: bool = True,
                bos_token_id: int | None = None) -> Iterator[Any]:
    """Context manager: the model's forwards use each SAE's reconstruction at its hook point (module doc).

    model: a :class:`pipeline.models.LM` or a transformer_lens ``TransformerBridge``. saes: one SAE, a
    list of SAEs (each at ``sae.params.hook``) or ``{hook: sae}``; at most one per hook. Activations at a
    hook are [batch, pos, d_model]; the SAE sees them flattened with the matching token ids (int64).
    Yields the bridge. Raises ValueError for an unknown hook point, an SAE whose d_model differs from the
    activation's, or two SAEs at one hook; RuntimeError when a forward reaches a tokenized SAE's hook
    without passing through the embedding (e.g. ``start_at_layer``), so its token ids are unknown.
    """
    bridge = _bridge(model)
    pairs = _by_hook(saes)
    bos = getattr(model, "bos_token_id", None) if bos_token_id is None else bos_token_id
    if bos is None and getattr(bridge, "tokenizer", None) is not None:
        bos = bridge.tokenizer.bos_token_id
    state: dict[str, Tensor | None] = {"tokens": None}

    def grab_tokens(module: Any, args: tuple, kwargs: dict) -> None:
        ids = args[0] if args else kwargs.get("input_ids", kwargs.get("input"))
        state["tokens"] = ids if isinstance(ids, Tensor) and not ids.is_floating_point() else None

    def splice(hook: str, sae: SAE):
        def fn(module: Any, inputs: Any, act: Tensor) -> Tensor:
            if act.shape[-1] != sae.params.d_model:
                raise ValueError(f"{hook}: activation d_model {act.shape[-1]} != SAE d_model {sae.params.d_model}")
            toks = state["tokens"]
            if sae.W_lookup is not None or exclude_bos:
                if toks is None or tuple(toks.shape) != tuple(act.shape[:-1]):
                    if sae.W_lookup is not None:
                        raise RuntimeError(f"{hook}: the tokenized SAE needs this forward's token ids, which were "
                                           "not seen at the embedding (start the forward from tokens)")
                    toks = None
            dev = sae.W_dec.device
            x = act.to(dev, torch.float32)
            t = toks.to(dev, torch.int64) if toks is not None and sae.W_lookup is not None else None
            with torch.autocast(dev.type, enabled=False):
                x_hat = sae.reconstruct(x, t).to(act.device, act.dtype)
            if exclude_bos and toks is not None and bos is not None and act.dim() == 3:
                keep = torch.zeros(act.shape[:-1], dtype=torch.bool, device=act.device)
                keep[:, 0] = toks[:, 0].to(act.device) == bos
                x_hat = torch.where(keep[..., None], act, x_hat)
            return x_hat
        return fn

    points = {}
    for hook, _ in pairs:
        hp = bridge.hook_dict.get(hook) if hasattr(bridge, "hook_dict") else None
        if hp is None and hasattr(bridge, "get_hook_point"):
            hp = bridge.get_hook_point(hook)
        if hp is None:
            raise ValueError(f"{hook!r} is not a hook point of this model")
        points[hook] = hp
    with ExitStack() as stack:
        embed = getattr(bridge, "embed", None)
        if embed is not None:
            stack.callback(embed.register_forward_pre_hook(grab_tokens, with_kwargs=True).remove)
        for hook, sae in pairs:
            stack.callback(points[hook].register_forward_hook(splice(hook, sae)).remove)
        yield bridge


def run_with_saes(model: Any, tokens: Tensor | str | list[str], saes: SAE | Iterable[SAE] | Mapping[str, SAE],
                  *, exclude_bos: bool = True, bos_token_id: int | None = None, **forward_kwargs: Any) -> Any:
    """One forward of ``model`` on ``tokens`` with ``saes`` spliced in (:func:`splice_saes`); returns what the
    bridge's forward returns for ``forward_kwargs`` (logits [batch, pos, d_vocab] by default;
    ``return_type="loss"`` gives the mean next-token CE in nats, as :func:`pipeline.evaluation.ce_losses`)."""
    with torch.no_grad(), splice_saes(model, saes, exclude_bos=exclude_bos, bos_token_id=bos_token_id) as bridge:
        return bridge(tokens, **forward_kwargs)
