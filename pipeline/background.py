"""Iterate a generator with the next items made ahead on a background thread.

Used by the reader (batches gathered and copied while the SAE step runs) and the harvest (tokenization while
the model runs). Pure threading: nothing here knows about tensors or devices.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def iterate_ahead(items: Iterable[T], depth: int, name: str = "tsae-ahead") -> Iterator[T]:
    """The items of ``items`` in order, with up to ``depth`` (≥ 1) made ahead on a daemon thread ``name``.

    An exception raised while making an item is re-raised here, at that item. Closing (or abandoning) the
    returned generator stops the thread and closes ``items`` if it is a generator; every item is made on the
    background thread, so thread-local state entered inside ``items`` (e.g. a CUDA stream context) applies
    to all of them.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for x in items:
                if not put(("item", x)):
                    return
            put(("end", None))
        except BaseException as e:  # noqa: BLE001  (handed to the consumer)
            put(("error", e))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    th = threading.Thread(target=produce, name=name, daemon=True)
    th.start()
    try:
        while True:
            kind, x = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise x
            yield x
    finally:
        stop.set()
        th.join()
