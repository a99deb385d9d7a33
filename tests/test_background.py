"""pipeline.background.iterate_ahead: order, errors at their item, and a clean stop when abandoned."""

import threading

import pytest

from pipeline.background import iterate_ahead


def test_items_in_order_made_on_another_thread():
    made_on = []

    def gen():
        for i in range(50):
            made_on.append(threading.current_thread().name)
            yield i

    assert list(iterate_ahead(gen(), 3, "tsae-test")) == list(range(50))
    assert set(made_on) == {"tsae-test"}


def test_an_error_is_raised_at_its_item():
    def gen():
        yield 1
        yield 2
        raise ValueError("bad item 3")

    it = iterate_ahead(gen(), 2)
    assert next(it) == 1 and next(it) == 2
    with pytest.raises(ValueError, match="bad item 3"):
        next(it)


def test_closing_stops_the_thread_and_closes_the_source():
    closed = threading.Event()

    def gen():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    it = iterate_ahead(gen(), 2, "tsae-test-close")
    assert [next(it) for _ in range(5)] == [0, 1, 2, 3, 4]
    it.close()
    assert closed.is_set()
    assert not any(t.name == "tsae-test-close" for t in threading.enumerate())
