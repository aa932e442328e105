"""Copying a byte range file to file in the kernel, and hashing it back from the page cache.

Tensors a merge leaves unchanged go from the base to the output without passing through Python
buffers: `os.copy_file_range` (in-kernel, or a reflink on filesystems that share extents),
falling back to `sendfile`, then to `pread`/`write` where neither works (other filesystems,
older kernels). Their bytes still have to be hashed; `hash_span` reads them back in chunks, which
the page cache serves right after the copy.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

CHUNK = 8 << 20
HASH_CHUNK = 1 << 20  # the reads a `SpanHasher` hashes back: as fast as 8 MiB here, and kept per thread
MAX_CALL = 1 << 30  # bytes per copy call: the kernel caps a call near 2 GiB anyway
# errno values that mean "this copy call cannot do this pair of files": try the next one
_TRY_NEXT = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM}


class Span:
    """`size` bytes at `offset` of the open file `fd`."""

    __slots__ = ("fd", "offset", "size")

    def __init__(self, fd: int, offset: int, size: int) -> None:
        self.fd, self.offset, self.size = fd, offset, size


def copy_span(span: Span, out_fd: int) -> None:
    """Append `span` at `out_fd`'s current position: copy_file_range, else sendfile, else read/write."""
    done = 0
    for copy in (_copy_file_range, _sendfile, _read_write):
        try:
            while done < span.size:
                got = copy(span.fd, out_fd, span.offset + done, span.size - done)
                if got == 0:
                    raise OSError(errno.EIO, "input file ended while copying a tensor (was it truncated?)")
                done += got
            return
        except OSError as exc:
            if exc.errno not in _TRY_NEXT or copy is _read_write:
                raise


def _copy_file_range(src: int, dst: int, offset: int, count: int) -> int:
    if not hasattr(os, "copy_file_range"):
        raise OSError(errno.ENOSYS, "no copy_file_range")
    return os.copy_file_range(src, dst, min(count, MAX_CALL), offset)


def _sendfile(src: int, dst: int, offset: int, count: int) -> int:
    if not hasattr(os, "sendfile"):
        raise OSError(errno.ENOSYS, "no sendfile")
    return os.sendfile(dst, src, offset, min(count, MAX_CALL))


def _read_write(src: int, dst: int, offset: int, count: int) -> int:
    data = os.pread(src, min(count, CHUNK), offset)
    view = memoryview(data)
    while view:
        view = view[os.write(dst, view) :]
    return len(data)


def hash_span(update: Callable[[memoryview], object], span: Span, buf: memoryview | None = None) -> None:
    """Feed `span`'s bytes to `update` (a hash's `update`), read in chunks into `buf` (or a new buffer)."""
    if buf is None:
        buf = memoryview(bytearray(min(CHUNK, span.size)))
    done = 0
    while done < span.size:
        got = os.preadv(span.fd, [buf[: min(len(buf), span.size - done)]], span.offset + done)
        if got == 0:
            raise OSError(errno.EIO, "input file ended while hashing a copied tensor (was it truncated?)")
        update(buf[:got])
        done += got


class SpanHasher:
    """A hash consumer that takes byte chunks and `Span`s alike, for one thread.

    Its read buffer (`HASH_CHUNK`) is kept from span to span: a fresh 8 MiB buffer per copied
    tensor was zero-filled and page-faulted each time (perf: ~6 % of an SD1.5 merge's CPU samples);
    kept, an 8 MiB one per writer thread added 16 MiB to the peak RSS (SDXL x4: 517 → 493 MiB).
    """

    def __init__(self, update: Callable[[memoryview], object]) -> None:
        self.update = update
        self._buf: memoryview | None = None

    def __call__(self, chunk) -> None:
        if not isinstance(chunk, Span):
            self.update(chunk)
            return
        want = min(HASH_CHUNK, chunk.size)
        if self._buf is None or len(self._buf) < want:
            self._buf = memoryview(bytearray(want))
        hash_span(self.update, chunk, self._buf)


WRITEBACK_BYTES = 64 << 20  # the output's dirty bytes handed to the disk at a time
_SYNC_FILE_RANGE_WRITE = 2


def _libc_sync_file_range():
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError, TypeError):  # not Linux: the final fsync does all the work
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


class Writeback:
    """Starts the kernel's writeback of an output behind the writer, every `WRITEBACK_BYTES`.

    The kernel otherwise leaves a fresh output's pages dirty until the final fsync (background
    writeback starts at 10 % of RAM), so the bake would end waiting for the whole file to reach
    the disk (perf: ~1 s of an SD1.5 merge in `fsync`). Handed over as it is written, the disk
    works while we compute, and the fsync has only the tail left. A hint: errors are ignored.
    """

    _call = None

    def __init__(self, fd: int, every: int | None = None) -> None:
        self.fd, self.every, self.done = fd, every or WRITEBACK_BYTES, 0
        if Writeback._call is None:
            Writeback._call = _libc_sync_file_range() or False

    def advance(self, end: int) -> None:
        """The file's bytes before offset `end` are written: start writing back the new ones."""
        if end - self.done < self.every or not Writeback._call:
            return
        Writeback._call(self.fd, self.done, end - self.done, _SYNC_FILE_RANGE_WRITE)
        self.done = end
