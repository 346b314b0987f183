"""Folders replaced whole: build the new version beside the old one, swap it in atomically.

A crash at any moment leaves the complete old folder or the complete new one. The swap is one
``renameat2(RENAME_EXCHANGE)`` on Linux; elsewhere two renames, with the old folder kept under
a hidden name in between and put back by the next save or load if a crash came between them.
Writers to one folder take turns (``flock`` on the parent folder). New folders get the mode
``mkdir`` gives them under the process umask (0755 under umask 022), not ``mkdtemp``'s 0700.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
import stat
import sys
import threading
from collections.abc import Iterator

# Markers in the names of the hidden folders that a swap leaves beside its destination.
_NEW = ".deltatune-new-"
_OLD = ".deltatune-old"


def make_temp_dir(parent: str, prefix: str) -> str:
    """A new, empty folder with a random name in ``parent``, mode 0777 minus the umask (tempfile's
    mkdtemp would give 0700)."""
    os.makedirs(parent, exist_ok=True)
    for _ in range(100):
        path = os.path.join(parent, f"{prefix}{secrets.token_hex(6)}")
        try:
            os.mkdir(path, 0o777)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"Could not create a temporary folder in {parent!r}.")


def _umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no /proc: read it by setting it (briefly) and putting it back
    os.umask(mask)
    return mask


def use_default_mode(path: str) -> None:
    """Give a folder made by ``tempfile.mkdtemp`` (mode 0700) the mode ``mkdir`` would have given
    it: 0777 minus the umask."""
    os.chmod(path, 0o777 & ~_umask())


def _fsync_tree(root: str) -> None:
    """Flush every regular file and folder under ``root`` to disk (cheap for files already flushed)."""
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with contextlib.suppress(OSError):
                if stat.S_ISREG(os.lstat(path).st_mode):  # not links, pipes (a pipe would block), devices
                    _fsync_dir(path)
        _fsync_dir(folder)


def _fsync_dir(path: str) -> None:
    """Flush ``path`` (a file, or a folder: its renames) to disk; a no-op where it cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- folder swaps -----------------------------------------------------------------------
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2() -> object | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    return getattr(libc, "renameat2", None)


_RENAMEAT2 = _renameat2()


def exchange_paths(a: str, b: str) -> bool:
    """Swap what paths ``a`` and ``b`` name in one atomic step; False where the system or the
    filesystem cannot (then nothing changed)."""
    if _RENAMEAT2 is None:
        return False
    fn = _RENAMEAT2
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)  # type: ignore[operator]
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), a, None, b)


_PROCESS_LOCK = threading.RLock()  # threads of one process take turns too (flock is per process)
_HELD: dict[tuple[int, int], int] = {}


@contextlib.contextmanager
def folder_lock(parent: str) -> Iterator[None]:
    """Hold an exclusive lock on folder ``parent`` (``flock`` on the folder itself, so no lock file
    is left behind). Re-entrant within a process; a no-op where folders cannot be locked."""
    with _PROCESS_LOCK:
        st = os.stat(parent)
        key = (st.st_dev, st.st_ino)
        if _HELD.get(key):
            _HELD[key] += 1
            try:
                yield
            finally:
                _HELD[key] -= 1
            return
        fd = -1
        try:
            import fcntl

            fd = os.open(parent, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except (ImportError, OSError):
            if fd >= 0:
                os.close(fd)
            fd = -1
        _HELD[key] = 1
        try:
            yield
        finally:
            del _HELD[key]
            if fd >= 0:
                os.close(fd)  # closing releases the flock


def _carry_over(src: str, dst: str) -> None:
    """Put every entry of folder ``src`` that ``dst`` lacks into ``dst`` (in sub-folders both have,
    too): hard links where the filesystem has them (no copy), copies otherwise; symlinks as symlinks."""

    def link_or_copy(a: str, b: str) -> None:
        try:
            os.link(a, b, follow_symlinks=False)
        except OSError:
            shutil.copy2(a, b, follow_symlinks=False)

    for name in os.listdir(src):
        a, b = os.path.join(src, name), os.path.join(dst, name)
        if os.path.lexists(b):
            if os.path.isdir(a) and not os.path.islink(a) and os.path.isdir(b) and not os.path.islink(b):
                _carry_over(a, b)  # a sub-folder both have (another adapter's): keep its other files too
            continue
        if os.path.islink(a):
            os.symlink(os.readlink(a), b)
        elif os.path.isdir(a):
            shutil.copytree(a, b, symlinks=True, copy_function=link_or_copy)
        else:
            link_or_copy(a, b)


def old_path(path: str) -> str:
    parent, name = os.path.split(path)
    return os.path.join(parent, f".{name}{_OLD}")


def recover_folder(path: str) -> None:
    """Finish or undo a swap that a crash interrupted (call with the parent's lock held).

    Only systems without an atomic exchange swap with two renames (``path`` → hidden old name,
    new folder → ``path``); a crash between them leaves ``path`` missing and the old folder
    beside it, which is put back. Hidden temporary folders a crash left are deleted.
    """
    parent, name = os.path.split(path)
    old = old_path(path)
    if os.path.isdir(old):
        if os.path.lexists(path):
            shutil.rmtree(old, ignore_errors=True)  # the swap had finished: delete the old copy
        else:
            os.rename(old, path)
    prefix = f".{name}{_NEW}"
    for entry in os.listdir(parent):
        if entry.startswith(prefix):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _cwd_inside(path: str) -> str | None:
    """The current folder relative to ``path`` if it is ``path`` or inside it, else None."""
    try:
        cwd = os.getcwd()
    except OSError:
        return None
    real = os.path.realpath(path)
    if cwd == real or cwd.startswith(real + os.sep):
        return os.path.relpath(cwd, real)
    return None


@contextlib.contextmanager
def replace_folder(path: str, keep_others: bool = True) -> Iterator[str]:
    """Build a new version of folder ``path`` in the yielded temporary folder, then swap it in.

    ``keep_others``: entries of the old folder that the new one does not have (the user's own
    files, other adapters' sub-folders) are carried into the new one, so only what was written
    changes. Otherwise the new folder replaces the old one whole (``deltatune merge --overwrite``).

    At every moment ``path`` is the complete old folder or the complete new one: the swap is one
    ``renameat2(RENAME_EXCHANGE)``. Where the filesystem has no exchange, it is two renames with
    the old folder kept under a hidden name in between; the next save (or load) puts it back if
    a crash came between them. Concurrent writers to ``path`` take turns; the later one wins
    whole. If the body raises, ``path`` is untouched.
    """
    path = os.path.realpath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ValueError(f"{path!r} is a file, not a folder; pass a folder path.")
    with folder_lock(parent):
        recover_folder(path)
        tmp = make_temp_dir(parent, f".{os.path.basename(path)}{_NEW}")
        try:
            yield tmp
            existed = os.path.isdir(path)
            if existed:
                if keep_others:
                    _carry_over(path, tmp)
                os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))  # a re-save keeps the folder's mode
            _fsync_tree(tmp)  # on disk before it is swapped in (a power cut must not leave empty files)
            back = _cwd_inside(path)
            if not existed:
                os.rename(tmp, path)
            elif exchange_paths(tmp, path):
                pass  # ``tmp`` now holds the old folder
            else:
                os.rename(path, old_path(path))
                os.rename(tmp, path)
                os.rename(old_path(path), tmp)
            _fsync_dir(parent)
            if back is not None:
                with contextlib.suppress(OSError):
                    os.chdir(os.path.join(path, back))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def try_recover(path: str) -> bool:
    """Put back a folder whose two-rename swap a crash interrupted, if no writer holds the
    parent's lock (a live writer finishes the swap itself); True if ``path`` exists afterwards."""
    try:
        import fcntl

        fd = os.open(os.path.dirname(path), os.O_RDONLY)
    except (ImportError, OSError):
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        recover_folder(path)
    except OSError:
        pass
    finally:
        os.close(fd)
    return os.path.isdir(path)
