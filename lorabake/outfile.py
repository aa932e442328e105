"""The output file: created exclusively beside its target, committed without replacing anything unasked.

The output path is the only path ever written:
* Bytes go to an anonymous file in the output's folder (`O_TMPFILE`, Linux), or where the
  filesystem has none, to `.<name>.lorabake-tmp-<pid>-<random>` created with
  `O_CREAT | O_EXCL | O_NOFOLLOW`: a symlink or file planted at a guessed name is never written
  through, and a failed or killed run leaves no named debris behind (named files: only SIGKILL).
* Without `force`, the commit cannot replace anything: `linkat` of the anonymous file, or for a
  named one `renameat2(RENAME_NOREPLACE)` (Linux) / `renamex_np(RENAME_EXCL)` (macOS), else
  link-then-unlink. Whatever appeared at the target meanwhile (another bake, a dangling symlink)
  makes it fail, so of two concurrent bakes to one path the second fails.
* With `force`, only a regular file or a symlink is replaced (the link itself, by rename: never
  the file it points to), never a directory, device, FIFO or socket.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import stat
import sys
from collections.abc import Iterable

from lorabake import interrupts
from lorabake.errors import LorabakeError, OutputError

TMP_MARKER = ".lorabake-tmp-"
_NOT_SUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EISDIR, errno.EPERM)
_KIND = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
         (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _kind(mode: int) -> str | None:
    """What a non-replaceable file is, in words; None for a regular file or a symlink."""
    return next((what for test, what in _KIND if test(mode)), None)


def check_output_path(target: str, *, inputs: Iterable[str] = (), force: bool = False) -> None:
    """Refuse an output that is (any file of) an input, exists (without force), is not a regular
    file or symlink (with force), or has no writable folder."""
    from lorabake.st_reader import model_files  # the reader knows what files a model is made of

    target_abs = os.path.abspath(target)
    for src in inputs:
        try:
            files = model_files(src)
        except LorabakeError:  # a broken input: the reader reports it; guard the path itself
            files = [src]
        for f in [src, *files]:
            if _same(f, target_abs):
                raise OutputError("output path is one of the inputs", path=target, hint="choose another -o")
    try:
        st = os.lstat(target_abs)
    except (FileNotFoundError, NotADirectoryError):  # the folder checks below say why
        st = None
    except OSError as exc:
        raise OutputError(f"cannot check the output path: {exc.strerror}", path=target) from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise OutputError("output path is a directory", path=target)
        if not force:
            what = "output file exists" if stat.S_ISREG(st.st_mode) else f"output path exists ({_kind(st.st_mode) or 'a symlink'})"
            raise OutputError(what, path=target, hint="pass --force to overwrite it")
        kind = _kind(st.st_mode)
        if kind:
            raise OutputError(f"output path is {kind}; --force replaces only regular files and symlinks", path=target)
    folder = os.path.dirname(target_abs)
    if not os.path.isdir(folder):
        raise OutputError("output directory does not exist", path=folder)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError("output directory is not writable", path=folder)


def _same(a: str, b: str) -> bool:
    if os.path.abspath(a) == b or os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def temp_name(target: str) -> str:
    """`.<name>.lorabake-tmp-<pid>-<random>` in the target's folder, the name cut to fit NAME_MAX."""
    folder, base = os.path.split(os.path.abspath(target))
    tail = f"{TMP_MARKER}{os.getpid()}-{secrets.token_hex(8)}"
    try:
        name_max = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    room = name_max - 1 - len(os.fsencode(tail))
    while len(os.fsencode(base)) > room:
        base = base[:-1]
    return os.path.join(folder, f".{base}{tail}")


class OutputFile:
    """One output being written: `create()` gives a writable binary file; `commit()` or `discard()`."""

    def __init__(self, target: str, *, force: bool = False) -> None:
        self.target = target
        self.force = force
        self.temp: str | None = None  # the named temporary file, if there is one
        self._fd: int | None = None

    def create(self):
        folder = os.path.dirname(os.path.abspath(self.target))
        try:
            self._fd = _anonymous(folder)
            if self._fd is None:
                self._fd, self.temp = _exclusive(self.target)
            return open(self._fd, "wb", closefd=False)  # noqa: SIM115 - closed by the writer
        except OSError as exc:
            self.discard()
            raise _error(exc, self.target, "cannot create the output") from None

    def commit(self) -> None:
        """fsync the data, make it appear at the target (see the module docstring), fsync the folder."""
        try:
            os.fsync(self._fd)
            with interrupts.deferred():
                if self.temp is None:
                    self._link_anonymous()
                elif self.force:
                    _replace(self.temp, self.target)
                else:
                    _rename_noreplace(self.temp, self.target)
                self.temp = None
                interrupts.note_written(self.target)
        except FileExistsError:
            raise OutputError(
                "output path appeared while baking (another process wrote it?)",
                path=self.target,
                hint="pass --force to overwrite it",
            ) from None
        except OSError as exc:
            raise _error(exc, self.target, "cannot write the output") from None
        finally:
            self.discard()
        _fsync_dir(os.path.dirname(os.path.abspath(self.target)))

    def _link_anonymous(self) -> None:
        if not self.force:
            _name_fd(self._fd, self.target)  # EEXIST when anything is there
            return
        for _ in range(8):
            name = temp_name(self.target)
            try:
                _name_fd(self._fd, name)
                break
            except FileExistsError:
                continue
        else:
            raise FileExistsError(errno.EEXIST, "no free temporary name", self.target)
        self.temp = name
        _replace(name, self.target)

    def discard(self) -> None:
        """Close the file and remove the named temporary file, if any; idempotent."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)
            except OSError:
                pass
        if self.temp is not None:
            temp, self.temp = self.temp, None
            try:
                os.unlink(temp)
            except FileNotFoundError:
                pass


def _anonymous(folder: str) -> int | None:
    """An unnamed file in `folder`, linkable later through /proc; None where there is none."""
    flag = getattr(os, "O_TMPFILE", 0)
    if not flag or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        return os.open(folder, flag | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as exc:
        if exc.errno in _NOT_SUPPORTED:
            return None
        raise


def _exclusive(target: str) -> tuple[int, str]:
    """A new file at a fresh random name beside `target`: never an existing file or a symlink's target."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(7):  # a taken name (planted, or a leftover of a killed run) is skipped
        name = temp_name(target)
        try:
            return os.open(name, flags, 0o666), name
        except FileExistsError:
            continue
    name = temp_name(target)
    return os.open(name, flags, 0o666), name


def _name_fd(fd: int, path: str) -> None:
    """Give the anonymous file `fd` the name `path` (linkat through /proc with AT_SYMLINK_FOLLOW;
    plain link() would try to link the /proc symlink itself). EEXIST when `path` is taken."""
    proc_fds = os.open("/proc/self/fd", os.O_RDONLY)
    try:
        os.link(str(fd), path, src_dir_fd=proc_fds, follow_symlinks=True)
    finally:
        os.close(proc_fds)


def _replace(source: str, target: str) -> None:
    """rename() onto the target, which must be absent, a regular file or a symlink (the link itself)."""
    try:
        kind = _kind(os.lstat(target).st_mode)
    except FileNotFoundError:
        kind = None
    if kind:
        raise OutputError(f"output path is {kind}; --force replaces only regular files and symlinks", path=target)
    os.rename(source, target)


# Atomic no-replace renames by platform: (libc function, flag, call with (src, dst, flag)).
_AT_FDCWD = -100
_NOREPLACE = {
    "linux": ("renameat2", 1, lambda fn, s, d, f: fn(_AT_FDCWD, s, _AT_FDCWD, d, f)),  # RENAME_NOREPLACE
    "darwin": ("renamex_np", 4, lambda fn, s, d, f: fn(s, d, f)),  # RENAME_EXCL
}


def _rename_noreplace(source: str, target: str) -> None:
    row = _NOREPLACE.get(sys.platform)
    fn = None
    if row is not None:
        try:
            fn = getattr(ctypes.CDLL(None, use_errno=True), row[0], None)
        except OSError:
            fn = None
    if fn is not None:
        if row[2](fn, os.fsencode(source), os.fsencode(target), row[1]) == 0:
            return
        err = ctypes.get_errno()
        if err not in _NOT_SUPPORTED:
            raise OSError(err, os.strerror(err), target)
    try:
        os.link(source, target)  # fails with EEXIST when anything is there
    except OSError as exc:
        if exc.errno not in _NOT_SUPPORTED:
            raise
        # No hard links either (FAT, exFAT): the only gap left is between this check and the rename.
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), target) from None
        os.rename(source, target)
        return
    os.unlink(source)


def _error(exc: OSError, target: str, doing: str) -> OutputError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError("disk full while writing the output", path=target, hint="free some space or write elsewhere with -o")
    return OutputError(f"{doing}: {exc.strerror or exc}", path=target)


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
