"""Untrusted local input (SPEC §7): a state folder and its manifest are somebody else's files.

Owns the one error of reading them (``ManifestError``: one line naming the environment, the
path, what is wrong and the fix), the rule for names taken from a foreign manifest before any
of them reaches SQL (``unsafe_name``), and reading a local file without trusting what it is
(``read_bounded``: regular files only, at most ``DBT_DEFER_MAX_STATE_MB``, never blocking on
a FIFO). Imports ``config`` only.
"""

from __future__ import annotations

import os
import re
import stat as stat_module
import unicodedata
from typing import Any, Dict, Optional

from dbt_defer.config import DeferConfigError, max_state_bytes

MANIFEST = "manifest.json"


class ManifestError(RuntimeError):
    """One clear line: environment, path, what is wrong, the fix."""


# --- names from a foreign manifest (SPEC §7: untrusted input) -------------------------------

MAX_NAME_CHARS = 1024  # far above any warehouse's limit (Postgres 63 bytes, Snowflake 255)
_FORBIDDEN = {"'": "a single quote", '"': "a double quote", "`": "a backtick", ";": "a semicolon",
              "\\": "a backslash"}
_COMMENTS = ("--", "/*", "*/")
# letters and digits of any script, _, $, space, dot, hyphen: none of them refused below
# the common case of a safe name, whole: at most MAX_NAME_CHARS of those characters, no "--"
PLAIN_NAME = re.compile(r"(?!.*--)[\w$ .\-]{0,%d}\Z" % MAX_NAME_CHARS)


def unsafe_name(value: Any) -> Optional[str]:
    """Why ``value`` cannot be a database/schema/identifier dbt-defer hands to SQL, or None.

    Accepted: any string of printable characters (letters of any script, digits, mixed case,
    spaces, hyphens, dots, $, ...) up to 1024 characters. Refused: quotes of any kind,
    ``;``, backslash, control characters (and line/paragraph separators), SQL comment
    markers (``--``, ``/*``, ``*/``): what could end a quoted name or a string literal, or start
    another statement, in any adapter's SQL. None (no database/schema) is fine.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        return f"is not a string ({type(value).__name__})"
    if PLAIN_NAME.match(value):
        return None  # the common case, decided in one regex (3 names × every node of every manifest)
    if len(value) > MAX_NAME_CHARS:
        return f"is {len(value)} characters long (at most {MAX_NAME_CHARS})"
    for ch, what in _FORBIDDEN.items():
        if ch in value:
            return f"contains {what}"
    for ch in value:
        if unicodedata.category(ch) in ("Cc", "Zl", "Zp"):
            return f"contains the control character U+{ord(ch):04X}"
    for marker in _COMMENTS:
        if marker in value:
            return f"contains the SQL comment marker {marker}"
    return None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def unusable_reason(path: str, uid: str, fields: Dict[str, Any]) -> Optional[str]:
    """The problem with a node's names (without the environment), or None."""
    for name, value in fields.items():
        why = unsafe_name(value)
        if why is not None:
            return (
                f"{uid} has {name} {_shown(value)} in {path}, which {why} "
                "and so cannot be a SQL name; that environment's record of the node is not used (nothing "
                "is sent to the warehouse for it): regenerate that manifest or fix the node's "
                f"{name} in its project"
            )
    return None


def reject_nul(env_name: str, path: str) -> None:
    if "\0" in path:
        raise ManifestError(
            f"dbt-defer: environment '{env_name}': state location {path!r} contains a NUL character; "
            "fix the path"
        )


_KINDS = (
    (stat_module.S_ISFIFO, "a FIFO (named pipe)"),
    (stat_module.S_ISCHR, "a character device"),
    (stat_module.S_ISBLK, "a block device"),
    (stat_module.S_ISSOCK, "a socket"),
)


def limit_bytes(env_name: str) -> int:
    try:
        return max_state_bytes(os.environ)
    except DeferConfigError as exc:
        raise ManifestError(str(exc)) from None


def read_bounded(env_name: str, path: str, max_bytes: int, fix: str) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; anything else is one ManifestError line.

    Opened non-blocking (a FIFO without a writer would block a plain open forever) and checked
    to be a regular file before a byte is read: a FIFO, device or socket never hangs the run or
    grows its memory. Reads at most ``max_bytes + 1`` bytes, so a file growing meanwhile is
    caught too.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if isinstance(exc, IsADirectoryError):
            fix = f"it is a directory: point the environment at the folder holding {MANIFEST}"
        raise ManifestError(
            f"dbt-defer: environment '{env_name}': cannot read {path} ({exc.strerror or exc}); {fix}"
        ) from None
    try:
        st = os.fstat(fd)
        if stat_module.S_ISDIR(st.st_mode):
            raise ManifestError(
                f"dbt-defer: environment '{env_name}': cannot read {path} (Is a directory); it is a "
                f"directory: point the environment at the folder holding {MANIFEST}"
            )
        if not stat_module.S_ISREG(st.st_mode):
            kind = next((what for test, what in _KINDS if test(st.st_mode)), "not a regular file")
            raise ManifestError(
                f"dbt-defer: environment '{env_name}': {path} is {kind}, not a regular file; "
                "point the environment at a copy of that environment's artifacts"
            )
        limit_mb = max_bytes / (1024 * 1024)
        too_big = ManifestError(
            f"dbt-defer: environment '{env_name}': {path} is larger than {limit_mb:g} MB "
            f"(DBT_DEFER_MAX_STATE_MB); point the environment at the right file, or raise "
            "DBT_DEFER_MAX_STATE_MB if it really is that large"
        )
        if st.st_size > max_bytes:
            raise too_big
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        chunks = []
        remaining = max_bytes + 1
        # the whole file in one read (a 24 MB manifest: no chunks to join), then any growth
        size = min(remaining, st.st_size + 1) if st.st_size else 16 * 1024 * 1024
        while remaining > 0:
            chunk = os.read(fd, min(remaining, size))
            size = 16 * 1024 * 1024
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        if remaining <= 0:
            raise too_big
        return b"".join(chunks)
    except OSError as exc:
        raise ManifestError(
            f"dbt-defer: environment '{env_name}': cannot read {path} ({exc.strerror or exc}); {fix}"
        ) from None
    finally:
        os.close(fd)
