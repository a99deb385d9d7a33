"""Text sources → fixed-length token windows.

A source is a Hugging Face dataset name (streamed), local files (text, jsonl/json, parquet, csv: a
file, a folder or a glob) or ``python3-doc``: the reST sources of the Python documentation from the
Debian package ``python3-doc``. All of them go through ``datasets.load_dataset``; plain text files
are read one document per file (``sample_by="document"``).

Packing (cache format v1): documents are tokenized without special tokens, joined with one
separator token after each document, and cut into consecutive windows of ``context_size`` tokens,
each starting with BOS when ``prepend_bos`` (the BOS is not part of the packed stream).
"""

from __future__ import annotations

import glob
import hashlib
import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PYTHON3_DOC = "python3-doc"
PYTHON3_DOC_GLOB = "/usr/share/doc/python3*/html/_sources"
_BUILDERS = {".txt": "text", ".rst": "text", ".md": "text", ".json": "json", ".jsonl": "json",
             ".parquet": "parquet", ".csv": "csv"}


class DatasetLoadError(RuntimeError):
    """A text source could not be opened; the message says what to do."""


@dataclass
class TextSource:
    """A resolved text source. ``files`` is empty for hub datasets."""

    name: str
    builder: str
    files: list[str]
    config: str | None = None
    split: str = "train"
    revision: str | None = None
    """Hub dataset revision (branch, tag or commit)."""
    text_column: str = "text"
    seed: int = 0
    """Local files are read in a seeded random order (-1: sorted order)."""

    def describe(self) -> dict:
        """JSON-able description for the cache attributes."""
        d = {"name": self.name, "builder": self.builder, "config": self.config, "split": self.split,
             "revision": self.revision,
             "text_column": self.text_column, "seed": self.seed, "n_files": len(self.files)}
        if self.files:
            d["files"] = self.files if len(self.files) <= 16 else self.files[:8] + ["..."]
            d["bytes"] = sum(os.path.getsize(f) for f in self.files)
            h = hashlib.sha256()
            for f in sorted(self.files):
                with open(f, "rb") as fh:
                    h.update(hashlib.sha256(fh.read()).digest())
            d["sha256"] = h.hexdigest()
        return d


def _python3_doc_files() -> list[str]:
    roots = sorted({os.path.realpath(p) for p in glob.glob(PYTHON3_DOC_GLOB)})
    files = sorted({os.path.realpath(f) for r in roots for f in glob.glob(os.path.join(r, "**", "*.txt"),
                                                                          recursive=True)})
    if not files:
        raise DatasetLoadError(
            "dataset 'python3-doc' needs the Debian package python3-doc "
            f"(nothing under {PYTHON3_DOC_GLOB}): run `apt-get install -y python3-doc`")
    return files


def _local_files(spec: str) -> list[str] | None:
    p = Path(spec).expanduser()
    if p.is_file():
        return [str(p)]
    if p.is_dir():
        return sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix in _BUILDERS)
    if any(c in spec for c in "*?["):
        return sorted(f for f in glob.glob(os.path.expanduser(spec), recursive=True) if os.path.isfile(f))
    return None


def resolve_source(name: str, config: str | None = None, split: str = "train", text_column: str = "text",
                   seed: int = 0, revision: str | None = None) -> TextSource:
    """Resolve a dataset spec to a :class:`TextSource` without reading it.

    Raises DatasetLoadError for an empty glob, mixed/unknown file types, a missing python3-doc,
    or a hub name while huggingface.co is unreachable and the dataset is not cached.
    """
    if name == PYTHON3_DOC:
        return TextSource(name, "text", _python3_doc_files(), split="train", seed=seed)
    files = _local_files(name)
    if files is not None:
        if not files:
            raise DatasetLoadError(f"dataset {name!r}: no files found (supported: {sorted(_BUILDERS)})")
        kinds = {_BUILDERS.get(Path(f).suffix) for f in files}
        if None in kinds or len(kinds) != 1:
            raise DatasetLoadError(
                f"dataset {name!r}: files must all be one kind of {sorted(_BUILDERS)}; found suffixes "
                f"{sorted({Path(f).suffix for f in files})}")
        return TextSource(name, kinds.pop(), files, split="train", text_column=text_column, seed=seed)
    if name.startswith(("/", ".", "~")):
        raise DatasetLoadError(f"dataset {name!r}: no such file or folder")
    from pipeline.models import hub_reachable, offline_message

    if not hub_reachable():
        raise DatasetLoadError(offline_message("dataset", name))
    return TextSource(name, "hub", [], config=config, split=split, text_column=text_column, seed=seed,
                      revision=revision)


def iter_texts(src: TextSource) -> Iterator[str]:
    """Stream the documents of a source as strings, in a deterministic order."""
    import datasets

    datasets.disable_progress_bars()
    if src.builder == "hub":
        ds = datasets.load_dataset(src.name, src.config, split=src.split, streaming=True, revision=src.revision)
        column = src.text_column
    else:
        files = list(src.files)
        if src.seed >= 0:
            random.Random(src.seed).shuffle(files)
        kwargs = {"sample_by": "document"} if src.builder == "text" else {}
        ds = datasets.load_dataset(src.builder, data_files=files, split="train", streaming=True, **kwargs)
        column = "text" if src.builder == "text" else src.text_column
    for row in _rows(ds, src):
        if column not in row:
            raise DatasetLoadError(f"dataset {src.name!r} has no column {column!r}; columns: {sorted(row)}. "
                                   "Set harvest.text_column.")
        text = row[column]
        if text:
            yield text


def _rows(ds, src: TextSource) -> Iterator[dict]:
    """The rows of ``ds``; a file that is not UTF-8 text (or not valid for its builder) raises DatasetLoadError
    naming the dataset instead of a decoding traceback from inside ``datasets``."""
    it = iter(ds)
    while True:
        try:
            row = next(it)
        except StopIteration:
            return
        except Exception as e:  # datasets wraps the builder's error (often a UnicodeDecodeError) in its own
            cause, chain = e, []
            while cause is not None and len(chain) < 8:
                chain.append(cause)
                cause = cause.__cause__ or cause.__context__
            if not any(isinstance(c, (UnicodeDecodeError, ValueError, TypeError)) for c in chain) or \
                    src.builder == "hub":
                raise
            raise DatasetLoadError(f"dataset {src.name!r} could not be read as {src.builder} "
                                   f"({type(chain[-1]).__name__}: {str(chain[-1])[:120]}): is it a UTF-8 "
                                   f"{src.builder} file?") from e
        yield row


def token_windows(texts: Iterable[str], tokenizer, context_size: int, prepend_bos: bool, bos_token_id: int,
                  sep_token_id: int, doc_batch: int = 32) -> Iterator[np.ndarray]:
    """Yield int32 windows of shape [context_size] packed from ``texts`` (see module doc).

    The stream ends with the last full window; a trailing partial window is dropped.
    """
    body = context_size - (1 if prepend_bos else 0)
    pending: list[np.ndarray] = []
    n_pending = 0
    batch: list[str] = []

    def flush(docs: list[str]) -> None:
        nonlocal n_pending
        ids = tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]
        for seq in ids:
            arr = np.empty(len(seq) + 1, dtype=np.int32)
            arr[:-1] = seq
            arr[-1] = sep_token_id
            pending.append(arr)
            n_pending += len(arr)

    def windows() -> Iterator[np.ndarray]:
        nonlocal pending, n_pending
        if n_pending < body:
            return
        stream = np.concatenate(pending)
        n_full = len(stream) // body
        for i in range(n_full):
            chunk = stream[i * body:(i + 1) * body]
            if prepend_bos:
                out = np.empty(context_size, dtype=np.int32)
                out[0] = bos_token_id
                out[1:] = chunk
                yield out
            else:
                yield chunk.copy()
        rest = stream[n_full * body:]
        pending, n_pending = [rest], len(rest)

    for text in texts:
        batch.append(text)
        if len(batch) >= doc_batch:
            flush(batch)
            batch = []
            yield from windows()
    if batch:
        flush(batch)
        yield from windows()
