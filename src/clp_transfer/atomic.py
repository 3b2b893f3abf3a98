"""Write outputs so that an interrupted or concurrent run never leaves something that looks complete, and no
run ever destroys its own inputs.

Everything is first written to a hidden temporary sibling of the destination and renamed into place at the
end (a rename within one file system is atomic). While a run writes an output it holds an exclusive lock on a
hidden lock file next to it (``.<name>.lock``, ``fcntl.flock``): a second run on the same output fails at
once, and because the operating system drops the lock when a process dies (even by SIGKILL), the next run
knows that temporary siblings it finds (``.<name>.tmp-*``, ``.<name>.old-*``) were left by a dead run and
removes them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import socket
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import ClpError

log = logging.getLogger(__name__)

# Locks this process holds: resolved output path -> [open lock file descriptor, nesting depth]. flock locks
# belong to an open file description, so a second open() of the same lock file in this process would conflict
# with the first; nested claims of one output (a stage claiming early, atomic_directory claiming again at the
# end) share the descriptor instead.
_HELD: dict[str, list[int]] = {}


def check_output_path(path: str | os.PathLike, overwrite: bool, what: str = "output") -> Path:
    """Refuse an existing, non-empty destination unless ``overwrite`` is set."""
    path = Path(path)
    if path.exists() and not overwrite:
        if path.is_dir() and not any(path.iterdir()):
            return path
        raise ClpError(f"{what} {str(path)!r} exists; pass --overwrite to replace it (nothing was written)")
    return path


def check_disjoint(output: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], what: str = "output",
                   ) -> None:
    """Refuse an output that is, contains, or lies inside one of the ``inputs`` that exist on disk.

    Replacing such an output (``--overwrite``) would delete the inputs, and writing into an input directory
    would mix outputs with inputs; both are refused before anything is written.
    """
    out = Path(output).expanduser().resolve()
    for item in inputs:
        if item is None or str(item) == "":
            continue
        p = Path(item).expanduser()
        if not p.exists():
            continue  # hub ids, glob patterns: the stage checks what they resolve to
        inp = p.resolve()
        if inp == out:
            relation = "is"
        elif out in inp.parents:
            relation = "contains"
        elif inp in out.parents:
            relation = "lies inside"
        else:
            continue
        raise ClpError(f"{what} {str(output)!r} {relation} the input {str(item)!r}: writing it could destroy "
                       "the input; choose an output path outside the inputs (nothing was changed)")


def check_writable(path: str | os.PathLike, what: str = "output") -> None:
    """Fail early when ``path`` cannot be created: an ancestor is a file, or its directory is not writable."""
    parent = Path(path).expanduser().absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ClpError(f"{what} {str(path)!r} cannot be created: {str(parent)!r} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ClpError(f"{what} {str(path)!r} cannot be created: no write permission in {str(parent)!r}; "
                       "choose another location or fix the permissions")


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of output ``path``: a hidden sibling ``.<name>.lock``."""
    p = Path(path).expanduser().absolute()
    return p.parent / f".{p.name}.lock"


def _owner_of(lock: Path) -> str:
    try:
        owner = json.loads(lock.read_text(encoding="utf-8"))
        return f" (pid {owner.get('pid')} on {owner.get('host')})"
    except (OSError, ValueError, AttributeError):
        return ""


def _acquire(path: Path, what: str, wait: bool = False) -> int:
    """Open and flock the lock file of ``path`` (without blocking unless ``wait``); retries when the file was
    replaced meanwhile. Where the file system or platform has no locks, warns and returns the file unlocked."""
    lock = lock_path(path)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        log.warning("no file locks on this platform: a second run on %s would not be detected", path)
        return os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
                log.warning("the file system of %s has no locks: a second run on it would not be detected", path)
                return fd
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise ClpError(f"another run{_owner_of(lock)} is writing {what} {str(path)!r} right now (lock file "
                           f"{str(lock)!r}); wait for it to finish or choose another output") from None
        # The previous holder unlinks the file on release: make sure we locked the file that is still there.
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
            return fd
        os.close(fd)


def clean_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove ``.<name>.tmp-*`` / ``.<name>.old-*`` siblings of ``path``; call only while holding its lock.

    Every run that writes ``path`` holds the lock, so such siblings were left by a run that was killed before
    it could clean up. Returns what was removed.
    """
    p = Path(path).expanduser().absolute()
    removed = []
    if not p.parent.is_dir():
        return removed
    for pattern in (f".{p.name}.tmp-*", f".{p.name}.old-*"):
        for stale in p.parent.glob(pattern):
            log.warning("removing %s, left behind by an interrupted run", stale)
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    stale.unlink()
            removed.append(stale)
    return removed


@contextlib.contextmanager
def output_lock(path: str | os.PathLike, what: str = "output", wait: bool = False) -> Iterator[Path]:
    """Hold the exclusive lock of output ``path`` for the block (re-entrant within one process).

    The first (outermost) claim creates missing parent directories, takes the lock - failing at once with a
    clear message when another run holds it, or waiting for it with ``wait`` (shared caches) - and removes
    temporaries of dead runs. On exit the lock file is
    deleted, and parent directories this claim created are removed again when they are still empty.
    """
    p = Path(os.path.normpath(Path(path).expanduser().absolute()))
    key = str(p)
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield p
        finally:
            _HELD[key][1] -= 1
        return
    check_writable(p, what)
    created = []
    parent = p.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = _acquire(p, what, wait)
    except BaseException:
        _remove_empty(created)
        raise
    _HELD[key] = [fd, 1]
    try:
        clean_stale_temporaries(p)
        yield p
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            os.unlink(lock_path(p))  # unlink while still locked: a waiting run then locks a fresh file
        os.close(fd)
        if not p.exists():
            _remove_empty(created)


def _remove_empty(dirs: list[Path]) -> None:
    for d in dirs:  # innermost first
        with contextlib.suppress(OSError):
            d.rmdir()


@contextlib.contextmanager
def claim_output(path: str | os.PathLike, overwrite: bool = False, inputs: Iterable[Any] = (),
                 what: str = "output", wait: bool = False) -> Iterator[Path]:
    """Everything a stage checks about its output before starting work, and the lock for the whole run.

    Refuses an existing output without ``overwrite``, an output that is, contains or lies inside one of the
    ``inputs``, and a location that cannot be written; then holds :func:`output_lock` for the block.
    """
    final = check_output_path(path, overwrite, what)
    check_disjoint(final, list(inputs), what)
    with output_lock(final, what, wait):
        yield final


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False, inputs: Iterable[Any] = (),
                     wait: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``path`` when the block ends without an exception.

    On an exception (Ctrl-C and SIGTERM included) the temporary directory is removed and ``path`` is left as
    it was. The output's lock is held throughout (see :func:`claim_output`; ``wait``: wait for another
    writer instead of failing, for caches that several runs may fill at once).
    """
    with claim_output(path, overwrite, inputs, wait=wait) as final:
        tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            yield tmp
            check_output_path(final, overwrite)  # something other than a locked run created it meanwhile
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if final.exists() or final.is_symlink():
            # Move the old output aside first so that a crash between the two renames still leaves one of them.
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            final.rename(old)
            tmp.rename(final)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
        else:
            tmp.rename(final)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and rename it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
