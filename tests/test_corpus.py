import json

import numpy as np
import pytest

from pipeline.corpus import DatasetLoadError, iter_texts, resolve_source, token_windows
from tests.conftest import PYDOC


class CharTokenizer:
    """Each character is one token (its code point); enough to check packing by hand."""

    def __call__(self, docs, add_special_tokens=False, verbose=False):
        return {"input_ids": [[ord(c) for c in d] for d in docs]}


def test_windows_are_bos_plus_consecutive_slices_of_the_separated_stream():
    docs = ["abcde", "fg", "hijklmnop", "q"]
    wins = list(token_windows(docs, CharTokenizer(), context_size=4, prepend_bos=True, bos_token_id=1,
                              sep_token_id=0, doc_batch=2))
    stream = []
    for d in docs:
        stream += [ord(c) for c in d] + [0]
    assert all(w[0] == 1 and w.dtype == np.int32 and len(w) == 4 for w in wins)
    body = np.concatenate([w[1:] for w in wins]).tolist()
    assert body == stream[: len(body)] and len(stream) - len(body) < 3  # only a partial window is dropped


def test_windows_without_bos_cover_the_stream():
    docs = ["abc", "defgh"]
    wins = list(token_windows(docs, CharTokenizer(), 3, prepend_bos=False, bos_token_id=1, sep_token_id=0))
    assert np.concatenate(wins).tolist() == [97, 98, 99, 0, 100, 101, 102, 103, 104]


def test_local_jsonl_text_and_folder_sources(tmp_path):
    src = resolve_source(str(PYDOC), seed=-1)
    first = next(iter_texts(src))
    expected = json.loads(PYDOC.read_text().splitlines()[0])["text"]
    assert first == expected and src.builder == "json"
    (tmp_path / "a.txt").write_text("line one\nline two\n")
    (tmp_path / "b.txt").write_text("other doc")
    texts = sorted(iter_texts(resolve_source(str(tmp_path), seed=-1)))
    assert texts == ["line one\nline two\n", "other doc"]  # one document per text file


def test_parquet_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["first document", "second one"]}), tmp_path / "d.parquet")
    src = resolve_source(str(tmp_path / "d.parquet"), text_column="body")
    assert src.builder == "parquet" and list(iter_texts(src)) == ["first document", "second one"]


def test_seeded_file_order_is_deterministic(tmp_path):
    for i in range(6):
        (tmp_path / f"{i}.txt").write_text(f"doc {i}")
    a = list(iter_texts(resolve_source(str(tmp_path), seed=3)))
    b = list(iter_texts(resolve_source(str(tmp_path), seed=3)))
    assert a == b and sorted(a) == [f"doc {i}" for i in range(6)]


def test_missing_or_mixed_sources_fail_clearly(tmp_path):
    with pytest.raises(DatasetLoadError, match="no such file"):
        resolve_source(str(tmp_path / "missing.txt"))
    (tmp_path / "x.txt").write_text("a")
    (tmp_path / "y.parquet").write_bytes(b"")
    with pytest.raises(DatasetLoadError, match="one kind"):
        resolve_source(str(tmp_path))


def test_wrong_text_column_is_named(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DatasetLoadError, match="text_column"):
        list(iter_texts(resolve_source(str(p))))


def test_hub_dataset_offline_fails_fast(monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    with pytest.raises(DatasetLoadError, match="unreachable"):
        resolve_source("allenai/c4", "en")
    assert time.perf_counter() - t < 5
