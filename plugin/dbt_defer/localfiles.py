"""Local files dbt-defer writes, so that nothing is ever half-written or left behind.

Owns: replacing a file atomically (a temp file beside it, then one rename: a reader sees the
old file or the new one), removing a file or folder, and sweeping the temp files and folders
of writers that were killed (named with their process id). Used by the audit file
(``audit``) and the remote state cache (``state_cache``). Imports nothing of ours.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from typing import Callable, List, Optional


def sha256_of(path: str) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pid_alive(pid: int) -> bool:
    """Is ``pid`` a running process on this host? This process, and unknown (Windows,
    permission errors): assumed alive."""
    if pid == os.getpid() or os.name != "posix" or pid <= 0:
        return True  # os.kill on Windows would terminate the process; keep to the age rule there
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, another user's
        return True
    return True


def remove(path: str) -> None:
    """Remove a file or a folder; errors are ignored (another process may remove it too)."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except OSError:
        pass


def replace_atomically(path: str, data: bytes, temp_name: Callable[[], str], *, durable: bool = False) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder (``temp_name()``: a new
    name, with this process's id for ``sweep``), then one rename. The file gets the permissions
    dbt's own artifacts get (0666 less the umask; ``tempfile.mkstemp`` would force 0600).
    ``durable``: fsync before the rename (the pointer of a cache that must survive a crash)."""
    folder = os.path.dirname(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = os.path.join(folder, temp_name())
        try:
            fd = os.open(tmp, flags, 0o666)
            break
        except FileExistsError:  # pragma: no cover - random names
            continue
    else:  # pragma: no cover
        raise FileExistsError(f"no free temporary name in {folder}")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise


def sweep(folder: str, pattern: "re.Pattern[str]", stale_seconds: float, dead_grace_seconds: float,
          now: Optional[float] = None) -> List[str]:
    """Remove what killed writers left in ``folder``: entries whose name matches ``pattern``
    (its ``pid`` group: the writer's process id) and that are older than ``stale_seconds``, or
    older than ``dead_grace_seconds`` with a pid that is no running process (or no number). A
    live writer's entry is never touched. Returns the names removed; errors are ignored."""
    now = time.time() if now is None else now
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = pattern.match(name)
        if m is None:
            continue
        full = os.path.join(folder, name)
        try:
            age = now - os.lstat(full).st_mtime
        except OSError:
            continue
        pid = m.group("pid")
        dead = not (pid.isdigit() and pid_alive(int(pid)))
        if age >= stale_seconds or (age >= dead_grace_seconds and dead):
            remove(full)
            removed.append(name)
    return removed
