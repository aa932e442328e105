"""Reading a checkpoint's bytes ahead of the bake, on a thread, within a byte budget.

The bake asks for pieces (tensor, first byte, byte count) in the order it will use them: whole
tensors, or row windows of a large one. A reader thread stays ahead while the pieces it has read
but not yet handed over fit in the budget (one piece larger than the budget is still read, alone),
so the disk or the page-cache copy overlaps the compute.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence

Piece = tuple[str, int, int]  # (tensor name, first byte within the tensor, byte count)


def read_ahead(
    reader, pieces: Sequence[Piece], budget: int, take: Callable[[int], memoryview]
) -> Iterator[tuple[str, int, memoryview]]:
    """Yield (name, first byte, bytes) for each piece, in order; `take(n)` gives each buffer.

    `reader` is a `SafetensorsReader` (its `read_into`). Errors on the thread are raised here.
    """
    done = object()
    slots = threading.Condition()
    in_flight = [0]
    out: queue.Queue = queue.Queue()
    stop = threading.Event()

    def work() -> None:
        try:
            for name, start, size in pieces:
                with slots:
                    slots.wait_for(lambda size=size: stop.is_set() or in_flight[0] == 0 or in_flight[0] + size <= budget)
                    if stop.is_set():
                        return
                    in_flight[0] += size
                view = take(size)
                reader.read_into(name, view, start)
                out.put((name, start, view))
            out.put(done)
        except BaseException as exc:  # handed to the consumer, re-raised there
            out.put(exc)

    thread = threading.Thread(target=work, name="lorabake-readahead", daemon=True)
    thread.start()
    try:
        while True:
            item = out.get()
            if item is done:
                break
            if isinstance(item, BaseException):
                raise item
            with slots:
                in_flight[0] -= len(item[2])
                slots.notify_all()
            yield item
    finally:
        stop.set()
        with slots:
            slots.notify_all()
        thread.join()
