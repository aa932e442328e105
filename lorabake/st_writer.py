"""Write a safetensors file whose header is declared up front, atomically.

The writer knows every (name, dtype, shape) and the metadata before the first byte, writes the
header, then accepts tensors strictly in the declared order and size. Bytes go to a file created
exclusively beside the target, which appears at the target only when complete, never replacing
anything without `force` (see `outfile`). Any exception, KeyboardInterrupt included, removes it.
SHA-256 of the whole file and of the data section are computed while writing.

With `background_bytes > 0`, `write` only validates and queues: one thread writes and hashes
the file, another hashes the data section, so both hashes (~1.2 GB/s each on one core) and the
write overlap the caller's compute. Queued bytes stay within the budget (one larger chunk goes
alone); an error in a worker is raised by the next `write` or by `commit`.
"""

from __future__ import annotations

import errno
import hashlib
import os
import queue
import shutil
import struct
import threading
from collections.abc import Callable, Iterable

import torch

from lorabake import dtypes, file_copy
from lorabake.errors import OutputError, WriterProtocolError
from lorabake.outfile import TMP_MARKER, OutputFile, check_output_path  # noqa: F401 - re-exported
from lorabake.st_header import encode_header


class SafetensorsWriter:
    """Use as a context manager; call `write` for each declared tensor in order."""

    def __init__(
        self,
        target: str | os.PathLike,
        entries: list[tuple[str, str, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
        *,
        inputs: Iterable[str] = (),
        sources: Iterable[object] = (),
        force: bool = False,
        check_space: bool = True,
        background_bytes: int = 0,
    ) -> None:
        """`sources`: the open readers this output is made from; at commit each must still be
        the file it was when read (`verify_unchanged`), else nothing is written."""
        self.target = os.fspath(target)
        self._sources = list(sources)
        check_output_path(self.target, inputs=inputs, force=force)
        names = [e[0] for e in entries]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise WriterProtocolError("declared twice", path=self.target, tensor=dup)
        for name, tag, _shape in entries:
            if tag not in dtypes.BY_TAG:
                raise WriterProtocolError(f"unknown dtype {tag!r}", path=self.target, tensor=name)
        self.entries = [(n, t, tuple(s)) for n, t, s in entries]
        self.header_bytes, self.spans = encode_header(self.entries, metadata)
        self.data_size = self.spans[-1][1] if self.spans else 0
        self.total_size = 8 + len(self.header_bytes) + self.data_size
        if check_space:
            folder = os.path.dirname(os.path.abspath(self.target))
            free = shutil.disk_usage(folder).free
            if free < self.total_size:
                raise OutputError(
                    f"not enough free space: the output needs {self.total_size} bytes, "
                    f"{free} are free",
                    path=folder,
                )
        self._out = OutputFile(self.target, force=force)
        self._next = 0
        self._part = 0  # bytes of the current tensor given to `write_part` so far
        self._file = None
        self._sha_file = hashlib.sha256()
        self._sha_data = hashlib.sha256()
        self._hash_file = file_copy.SpanHasher(self._sha_file.update)  # on the thread that writes
        self._hash_data = file_copy.SpanHasher(self._sha_data.update)  # on its own thread
        self.sha256: str | None = None
        self.data_sha256: str | None = None
        self._background_bytes = background_bytes
        self._pipe: _Pipe | None = None

    def __enter__(self) -> SafetensorsWriter:
        self._open()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def _open(self) -> None:
        try:
            self._file = self._out.create()
            prefix = struct.pack("<Q", len(self.header_bytes)) + self.header_bytes
            self._raw_write(prefix, data=False)
            self._end = len(prefix)  # bytes handed to the file so far (by `_write_and_hash`)
            self._writeback = file_copy.Writeback(self._file.fileno())
            if self._background_bytes > 0:
                self._pipe = _Pipe(self._background_bytes, [self._write_and_hash, self._hash_data])
        except BaseException:
            self.abort()
            raise

    def _write_and_hash(self, chunk: bytes | bytearray | memoryview | file_copy.Span) -> None:
        span = chunk if isinstance(chunk, file_copy.Span) else None
        try:
            if span is not None:
                self._file.flush()
                file_copy.copy_span(span, self._file.fileno())
                self._end += span.size
            else:
                self._file.write(chunk)
                self._end += chunk.nbytes if isinstance(chunk, memoryview) else len(chunk)
        except OSError as exc:
            raise _os_error(exc, self.target) from None
        self._writeback.advance(self._end)
        self._hash_file(chunk)

    def _raw_write(self, chunk: bytes | bytearray | memoryview, *, data: bool) -> None:
        try:
            self._file.write(chunk)
        except OSError as exc:
            raise _os_error(exc, self.target) from None
        self._sha_file.update(chunk)
        if data:
            self._sha_data.update(chunk)

    @property
    def next_name(self) -> str | None:
        return self.entries[self._next][0] if self._next < len(self.entries) else None

    def write(self, name: str, data: torch.Tensor | bytes | bytearray | memoryview) -> None:
        """Append tensor `name`, which must be the next declared one, with its declared layout."""
        if self._file is None:
            raise WriterProtocolError("writer is not open", path=self.target, tensor=name)
        if self._part:
            raise WriterProtocolError("a tensor begun with write_part is not complete", path=self.target, tensor=name)
        if self._next >= len(self.entries):
            raise WriterProtocolError("more tensors than declared", path=self.target, tensor=name)
        exp_name, tag, shape = self.entries[self._next]
        if name != exp_name:
            raise WriterProtocolError(
                f"out of order: expected {exp_name!r} next", path=self.target, tensor=name
            )
        if isinstance(data, torch.Tensor):
            if dtypes.tag_of(data.dtype) != tag:
                raise WriterProtocolError(
                    f"dtype {dtypes.tag_of(data.dtype)} differs from the declared {tag}",
                    path=self.target,
                    tensor=name,
                )
            if tuple(data.shape) != shape:
                raise WriterProtocolError(
                    f"shape {list(data.shape)} differs from the declared {list(shape)}",
                    path=self.target,
                    tensor=name,
                )
            data = tensor_bytes(data)
        start, end = self.spans[self._next]
        size = data.nbytes if isinstance(data, memoryview) else len(data)
        if size != end - start:
            raise WriterProtocolError(
                f"{size} bytes given, {end - start} declared", path=self.target, tensor=name
            )
        self._send(data, size)
        self._next += 1

    def write_part(self, name: str, data: torch.Tensor | bytes | bytearray | memoryview) -> None:
        """Append the next bytes of tensor `name` (in pieces, e.g. row windows): once they add up
        to its declared size the next tensor follows. Contiguous tensors are taken as raw bytes."""
        if self._file is None or self._next >= len(self.entries) or self.entries[self._next][0] != name:
            raise WriterProtocolError(f"out of order: expected {self.next_name!r} next", path=self.target, tensor=name)
        if isinstance(data, torch.Tensor):
            tag = self.entries[self._next][1]
            if dtypes.tag_of(data.dtype) != tag:
                raise WriterProtocolError(
                    f"dtype {dtypes.tag_of(data.dtype)} differs from the declared {tag}", path=self.target, tensor=name
                )
            data = tensor_bytes(data)
        start, end = self.spans[self._next]
        size = data.nbytes if isinstance(data, memoryview) else len(data)
        if self._part + size > end - start:
            raise WriterProtocolError(
                f"{self._part + size} bytes given, {end - start} declared", path=self.target, tensor=name
            )
        self._send(data, size)
        self._part += size
        if self._part == end - start:
            self._part = 0
            self._next += 1

    def _send(self, data, size: int) -> None:
        if self._pipe is not None:
            self._pipe.put(data, size)
        else:
            self._raw_write(data, data=True)

    def copy_from(self, name: str, fd: int, offset: int) -> None:
        """Append tensor `name` as the bytes at `offset` of the open file `fd`, copied by the kernel.

        `os.copy_file_range` (falling back to `sendfile`, then read/write), so unchanged bytes
        never pass through Python; both hashes read them back from the page cache on their
        threads. `fd` must stay open until `commit`.
        """
        if self._file is None or self._part or self._next >= len(self.entries) or self.entries[self._next][0] != name:
            expected = self.next_name
            raise WriterProtocolError(f"out of order: expected {expected!r} next", path=self.target, tensor=name)
        start, end = self.spans[self._next]
        span = file_copy.Span(fd, offset, end - start)
        if self._pipe is not None:
            self._pipe.put(span, 0)  # holds no memory
        else:
            self._write_and_hash(span)
            self._hash_data(span)
        self._next += 1

    def commit(self) -> None:
        """Check completeness, then fsync and make the file appear at the target (`OutputFile.commit`)."""
        if self._file is None:
            return
        try:
            if self._next != len(self.entries):
                raise WriterProtocolError(
                    f"closed after {self._next} of {len(self.entries)} declared tensors",
                    path=self.target,
                    tensor=self.entries[self._next][0],
                )
            if self._pipe is not None:
                pipe, self._pipe = self._pipe, None
                pipe.close()
            try:
                self._file.flush()
                self._file.close()  # the descriptor stays open with `_out`
                self._file = None
            except OSError as exc:
                raise _os_error(exc, self.target) from None
            for source in self._sources:
                source.verify_unchanged()
            self._out.commit()
        except BaseException:
            self.abort()
            raise
        self.sha256 = self._sha_file.hexdigest()
        self.data_sha256 = self._sha_data.hexdigest()

    def abort(self) -> None:
        """Remove the temporary file; nothing appears at the target."""
        if self._pipe is not None:
            pipe, self._pipe = self._pipe, None
            pipe.cancel()
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
        self._out.discard()


class _Pipe:
    """Hands each chunk, in order, to every consumer on a thread of its own, within a byte budget."""

    def __init__(self, budget: int, consumers: list[Callable[[memoryview], object]]) -> None:
        self.budget = budget
        self.cv = threading.Condition()
        self.in_flight = 0
        self.error: BaseException | None = None
        self.cancelled = False
        self.queues: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in consumers]
        self.threads = [
            threading.Thread(target=self._run, args=(q, fn), name=f"lorabake-writer-{i}", daemon=True)
            for i, (q, fn) in enumerate(zip(self.queues, consumers))
        ]
        for t in self.threads:
            t.start()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def put(self, chunk, size: int) -> None:
        with self.cv:
            self.cv.wait_for(lambda: self.error is not None or self.in_flight == 0 or self.in_flight + size <= self.budget)
            self._raise()
            self.in_flight += size
        item = [chunk, size, len(self.queues)]  # chunk keeps its tensor/buffer alive until all are done
        for q in self.queues:
            q.put(item)

    def _run(self, q: queue.SimpleQueue, fn: Callable) -> None:
        while True:
            item = q.get()
            if item is None:
                return
            if self.error is None and not self.cancelled:
                try:
                    fn(item[0])
                except BaseException as exc:  # re-raised on the caller's thread
                    with self.cv:
                        self.error = self.error or exc
            with self.cv:
                item[2] -= 1
                if item[2] == 0:
                    item[0] = None
                    self.in_flight -= item[1]
                self.cv.notify_all()

    def _join(self) -> None:
        for q in self.queues:
            q.put(None)
        for t in self.threads:
            t.join()

    def close(self) -> None:
        """Wait until every consumer has taken every chunk; raise the first error."""
        self._join()
        self._raise()

    def cancel(self) -> None:
        self.cancelled = True
        self._join()


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """Little-endian bytes of a CPU tensor without a copy when it is already contiguous."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _os_error(exc: OSError, target: str) -> OutputError:
    if exc.errno == errno.ENOSPC:
        return OutputError("disk full while writing the output", path=target)
    return OutputError(f"cannot write the output: {exc.strerror or exc}", path=target)

