"""Files written whole or not at all: written under a temporary name beside the target, then renamed.

A crash, a full disk or a second writer never leaves half a checkpoint, cache or card behind.
"""
from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
import sys
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: writers of one folder do not take turns
    fcntl = None

import torch

__all__ = ["save", "write_text", "write_bytes", "replace_files", "load_or_discard", "save_or_warn", "taking_turns"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process, or a platform that cannot tell: leave its file alone
    return True


def _remove_stale(path: Path) -> None:
    """Remove the temporary files of writers that were killed: SIGKILL runs no cleanup."""
    for tmp in path.parent.glob(f".{path.name}.tmp*"):
        pid = tmp.name.rsplit(".tmp", 1)[1].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass  # a folder we may not write to: nothing of ours to clean there


def _temporary_name(path: Path) -> Path:
    # The pid comes first, so _remove_stale can tell a dead writer's file; the thread and a random
    # suffix keep two threads, or two calls, of one process from writing to the same file.
    return path.with_name(f".{path.name}.tmp{os.getpid()}-{threading.get_ident()}-{secrets.token_hex(4)}")


def _replace(path: str | os.PathLike, write) -> None:
    path = Path(path)
    tmp = _temporary_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(path)
        # Created here, before torch.save opens it: an unwritable folder then fails with an OSError
        # naming the file, rather than a RuntimeError from torch's C++ writer naming none.
        with open(tmp, "xb"):
            pass
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the bytes are on disk before the name points at them
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise _naming(e, path) from e
        if isinstance(e, RuntimeError) and "write" in str(e):  # torch's writer on a full disk: "file write failed"
            raise OSError(errno.ENOSPC, f"could not write {path}: the disk may be full "
                                        f"({str(e).strip().splitlines()[-1].strip()}); free some space") from None
        raise


def _naming(e: OSError, path: Path) -> OSError:
    """The same kind of error, naming the target rather than the temporary file."""
    message = f"could not write {path}: {e.strerror or e}"
    try:
        return type(e)(e.errno, message) if e.errno is not None else type(e)(message)
    except Exception:  # a subclass with a constructor of its own
        return OSError(e.errno, message)


def save(obj, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)``, atomically.

    Args:
        obj: anything torch.save accepts.
        path: the target file; its folder is created when missing.

    Raises:
        OSError: the file could not be created or renamed (a read-only folder, say); it names ``path``.
            Whatever fails, torch.save's own errors too, the previous file at ``path`` is left as it was.
    """
    _replace(path, lambda tmp: torch.save(obj, tmp))


def write_text(path: str | os.PathLike, text: str) -> None:
    """``Path(path).write_text(text)`` in UTF-8, atomically; raises OSError as :func:`save` does."""
    _replace(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """``Path(path).write_bytes(data)``, atomically; raises OSError as :func:`save` does."""
    _replace(path, lambda tmp: tmp.write_bytes(data))


def load_or_discard(path: Path) -> tuple[object | None, str | None]:
    """Read a cache file written by :func:`save`; remove it when it cannot be read.

    Args:
        path: the file.

    Returns:
        (its content, None); (None, None) when there is no file; (None, what is wrong) when it is
        damaged, e.g. "is damaged or unreadable (RuntimeError)", removed where the folder allows.
    """
    if not path.is_file():
        return None, None
    try:
        return torch.load(path, weights_only=True), None
    except Exception as e:  # truncated (a full disk, a killed writer of an older version) or not ours
        problem = f"is damaged or unreadable ({type(e).__name__})"
    try:
        path.unlink(missing_ok=True)  # so the next save puts a whole file in its place
    except OSError as e:
        problem += f" and could not be removed ({e.strerror or e})"
    return None, problem


def save_or_warn(obj, path: Path, problem: str | None = None, then: str = "", stacklevel: int = 2) -> bool:
    """:func:`save` for a cache: a file that cannot be written costs one warning, not the result.

    Args:
        obj, path: as in :func:`save`.
        problem: what :func:`load_or_discard` found wrong with the file there, told in the same line.
        then: what follows for the user, e.g. "it will be computed again next time".
        stacklevel: as in warnings.warn, counted from the caller of this function.

    Returns:
        True when written; False, with one warning naming the file and its folder, when not.
    """
    try:
        save(obj, path)
        return True
    except (OSError, RuntimeError) as e:  # RuntimeError: torch's writer on a full disk
        if isinstance(e.__cause__, OSError):
            e = e.__cause__
        reason = (e.strerror if isinstance(e, OSError) else None) or str(e).strip().splitlines()[-1]
        before = f"the cache file {path} {problem}, and " if problem else ""
        warnings.warn(
            f"{before}could not write the cache {path.name} in {path.parent} ({reason})"
            + (f"; {then}" if then else ""),
            RuntimeWarning,
            stacklevel=stacklevel + 1,
        )
        return False


# ----------------------------------------------------------------------------- several files at once


@contextmanager
def taking_turns(path: Path):
    """Processes that make the same file take turns: the second waits, then finds the first one's result.

    A lock file beside `path`; where none can be made (a read-only folder, Windows) nobody waits.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.parent / f".{path.name}.lock", "w")
    except OSError:
        yield
        return
    with lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _sync(path: Path) -> None:
    if os.name != "posix" and path.is_dir():
        return  # no fsync of a folder there
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders in one atomic rename where the system and file system can; False where not."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
            rc = libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2)  # AT_FDCWD, RENAME_EXCHANGE
        elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
            rc = libc.renamex_np(os.fsencode(a), os.fsencode(b), 2)  # RENAME_SWAP
        else:
            return False
    except OSError:
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _tidy(folder: Path) -> None:
    """Finish or undo what a killed writer left beside `folder`: its staged and its set-aside copies."""
    for old in folder.parent.glob(f".{folder.name}.old*"):
        if not folder.exists():  # killed between the two renames: the old set goes back
            os.rename(old, folder)
        else:
            shutil.rmtree(old, ignore_errors=True)
    for new in folder.parent.glob(f".{folder.name}.new*"):
        shutil.rmtree(new, ignore_errors=True)


def replace_files(folder: str | os.PathLike, files: dict[str, bytes]) -> None:
    """Write `files` (name -> content) into `folder` together: a reader finds all the old ones or all the new.

    The new set is staged in a folder beside `folder` (the files already there, hard-linked), which then
    takes its place in one atomic exchange (two renames where the system has none). Two writers of the
    same folder take turns; what a killed writer left is cleaned up by the next one.

    Raises:
        OSError: the folder cannot be written (the message names it); it is left as it was.
    """
    folder = Path(os.path.realpath(folder))
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _naming(e, folder) from e
    with taking_turns(folder):  # a second writer waits for the first to finish
        _tidy(folder)
        token = f"{os.getpid()}-{secrets.token_hex(4)}"
        new, old = folder.with_name(f".{folder.name}.new{token}"), folder.with_name(f".{folder.name}.old{token}")
        try:
            new.mkdir()
            if folder.exists():
                for entry in folder.iterdir():
                    if entry.name not in files and entry.is_file() and not entry.is_symlink():
                        try:
                            os.link(entry, new / entry.name)
                        except OSError:
                            shutil.copy2(entry, new / entry.name)
                    elif entry.name not in files:
                        shutil.copytree(entry, new / entry.name, symlinks=True) if entry.is_dir() \
                            else os.symlink(os.readlink(entry), new / entry.name)
                shutil.copymode(folder, new)
            for name, content in files.items():
                (new / name).write_bytes(content)
                _sync(new / name)
            _sync(new)
            if not folder.exists():
                os.rename(new, folder)
            elif not _exchange(new, folder):
                os.rename(folder, old)
                os.rename(new, folder)
            _sync(folder.parent)
        except OSError as e:
            raise _naming(e, folder) from e
        finally:
            for leftover in (new, old):  # the unfinished set, or after the switch the old one
                shutil.rmtree(leftover, ignore_errors=True)
