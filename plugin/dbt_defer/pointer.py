"""The layout of a published folder (SPEC §8), written by ``dbt-defer publish``::

    URI/latest.json                                   the pointer: which version is current
    URI/versions/<UTC time>-<invocation id>/manifest.json (+ run_results.json)

Owns the pointer's format and its checks (it is remote input: bounded, its path may not leave
the folder, its sha256 values are hex), reading and replacing it (one PUT on object stores,
write-then-rename elsewhere; conditionally, for concurrent publishers: If-Match on S3, a lock of
the folder on file://, a re-read elsewhere), version names and pruning (only what the pointer,
read again, does not name). May not touch: what is published (``publish``), fetching
(``remote``). Imports ``manifests`` (file names) only; works on an fsspec filesystem handed in.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Dict, Iterator, List, Optional, Tuple

from dbt_defer.config import exception_chain
from dbt_defer.manifests import MANIFEST

POINTER = "latest.json"
PUBLISHED_VERSIONS = "versions"
POINTER_MAX_BYTES = 64 * 1024
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
VERSION_NAME = re.compile(r"^(?P<time>[0-9]{8}T[0-9]{6}(?:[0-9]{6})?Z)-(?P<invocation>[A-Za-z0-9_.-]{1,100})$")


def pointer_root(state: str) -> Optional[str]:
    """The folder URI that may hold a publish pointer: a folder state, or ``<folder>/latest.json``."""
    if "?" in state or "#" in state or "::" in state:
        return None  # a signed URL or a chained URI names one object, never a published folder
    state = state.rstrip("/")
    if state.endswith("/" + POINTER):
        return state[: -len(POINTER) - 1]
    return None if state.lower().endswith(".json") else state


class PointerError(ValueError):
    """A publish pointer that is not one (remote input)."""


def parse_pointer(raw: bytes) -> Dict[str, Any]:
    """The pointer document, checked: it is remote input, and its path may not leave the folder."""
    if len(raw) > POINTER_MAX_BYTES:
        raise PointerError(f"it is larger than {POINTER_MAX_BYTES // 1024} KB")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise PointerError(f"not valid JSON: {str(exc).splitlines()[0][:120]}") from None
    except RecursionError:  # "[[[[..." within the size limit: not a pointer, not a network problem
        raise PointerError("its JSON is nested too deeply") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("path"), str):
        raise PointerError("no version path in it")
    folder, _, name = doc["path"].partition("/")
    if folder != PUBLISHED_VERSIONS or not VERSION_NAME.match(name):
        raise PointerError(
            f"its version path {doc['path'][:80]!r} is not {PUBLISHED_VERSIONS}/<UTC time>-<invocation id>"
        )
    files = doc.get("files")
    if files is not None and not (
        isinstance(files, dict)
        and all(isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and _SHA256.match(entry["sha256"])
                for entry in files.values())
    ):
        raise PointerError("its files entry is not {name: {sha256, size}}")
    return doc


def _read_raw(fs: Any, path: str) -> Optional[bytes]:
    """The pointer's bytes (at most the limit + 1); None when there is none."""
    try:
        fs.invalidate_cache(path)  # never an answer cached by an earlier call in this process
    except Exception:
        pass
    try:
        with fs.open(path, "rb") as fh:
            return fh.read(POINTER_MAX_BYTES + 1)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
        return None  # S3 and GCS answer 403 for a missing object to readers without the list right
    except Exception as exc:
        if getattr(exc, "status", None) in (403, 404):  # http(s): aiohttp's ClientResponseError
            return None
        raise


def read_pointer(fs: Any, root_path: str) -> Optional[Dict[str, Any]]:
    """The pointer in a folder of ``fs``; None when there is none. ValueError: not a pointer."""
    raw = _read_raw(fs, root_path.rstrip("/") + "/" + POINTER)
    return None if raw is None else parse_pointer(raw)


@dataclass(frozen=True)
class PointerRead:
    """What a publisher read of the pointer, to replace it only if it is still that (SPEC §7)."""

    doc: Optional[Dict[str, Any]]  # None: no pointer, or not a valid one
    raw: Optional[bytes]  # None: no pointer object at all
    etag: Optional[str] = None  # S3: the object's ETag when it was read


class PointerConflict(Exception):
    """The pointer changed since it was read (another publisher): read it again and decide again."""


def _is_s3(fs: Any) -> bool:
    protocol = fs.protocol
    return bool(({protocol} if isinstance(protocol, str) else set(protocol)) & {"s3", "s3a"})


def _is_local(fs: Any) -> bool:
    try:
        from fsspec.implementations.local import LocalFileSystem
    except ImportError:  # pragma: no cover
        return False
    return isinstance(fs, LocalFileSystem)


def _etag(fs: Any, path: str) -> Optional[str]:
    try:
        fs.invalidate_cache(path)
    except Exception:
        pass
    try:
        etag = fs.info(path).get("ETag")
    except FileNotFoundError:
        return None
    return str(etag) if etag else None


def read_pointer_state(fs: Any, root: str) -> PointerRead:
    """The pointer as a publisher reads it before replacing it: its document, its bytes and (S3)
    the ETag of exactly those bytes (read before and after; read again while they differ)."""
    path = f"{root}/{POINTER}"
    for _ in range(3):
        before = _etag(fs, path) if _is_s3(fs) else None
        raw = _read_raw(fs, path)
        if raw is None:
            return PointerRead(None, None)
        after = _etag(fs, path) if _is_s3(fs) else None
        if before == after:
            break
    try:
        doc: Optional[Dict[str, Any]] = parse_pointer(raw)
    except PointerError:
        doc = None
    return PointerRead(doc, raw, after)


def published_version(uri: str) -> Optional[Dict[str, str]]:
    """version, invocation_id and published_at of a manifest URI inside a published version folder."""
    parts = uri.split("?", 1)[0].rstrip("/").split("/")
    if len(parts) < 3 or parts[-1] != MANIFEST or parts[-3] != PUBLISHED_VERSIONS:
        return None
    match = VERSION_NAME.match(parts[-2])
    if not match:
        return None
    stamp = match.group("time")
    when = f"{stamp[0:4]}-{stamp[4:6]}-{stamp[6:8]}T{stamp[9:11]}:{stamp[11:13]}:{stamp[13:15]}Z"
    return {"version": parts[-2], "invocation_id": match.group("invocation"), "published_at": when}


# --- writing (dbt-defer publish) -------------------------------------------------------------

# object stores: one PUT replaces an object at once, and there are no folders to make (making
# one there may create a bucket); anything else gets folders made and write-then-rename
_OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "gcsfs", "az", "abfs", "abfss", "adl", "oss", "memory"}


def version_name(when: datetime, invocation_id: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", invocation_id)[:100] or "unknown"
    return f"{when.astimezone(timezone.utc).strftime('%Y%m%dT%H%M%S%fZ')}-{safe}"


def is_object_store(fs: Any) -> bool:
    protocol = fs.protocol
    return bool(({protocol} if isinstance(protocol, str) else set(protocol)) & _OBJECT_STORES)


def current_pointer(fs: Any, root: str) -> Optional[Dict[str, Any]]:
    """The current pointer; None when there is none or it is not one (this publish replaces it)."""
    try:
        return read_pointer(fs, root)
    except ValueError:
        return None


def exists(fs: Any, path: str) -> bool:
    try:
        fs.invalidate_cache(path)
    except Exception:
        pass
    try:
        return bool(fs.exists(path))
    except Exception:
        return False


def _chain_text(exc: BaseException) -> str:
    return " ".join(f"{type(e).__name__} {e}" for e in exception_chain(exc))


def _precondition_failed(exc: BaseException) -> bool:
    """S3 refused a conditional PUT: 412 PreconditionFailed (If-Match), or 409
    ConditionalRequestConflict; s3fs turns an If-None-Match refusal into FileExistsError."""
    for e in exception_chain(exc):
        if isinstance(e, FileExistsError):
            return True
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = str((response.get("Error") or {}).get("Code", ""))
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status == 412:
                return True
        if "pre-condition" in str(e).lower() or "precondition" in str(e).lower():
            return True
    return False


def _unsupported(exc: BaseException) -> bool:
    """The store (or an old botocore) does not know conditional writes."""
    text = _chain_text(exc)
    return any(word in text for word in ("Unknown parameter", "NotImplemented", "501"))


@contextlib.contextmanager
def _locked(root: str) -> Iterator[None]:
    """An exclusive lock of a local published folder: flock on the folder itself (nothing is left
    behind in it); where there is no flock, the re-read check alone."""
    try:
        import fcntl

        fd = os.open(root, os.O_RDONLY)
    except (ImportError, OSError):  # pragma: no cover - Windows
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def write_pointer(fs: Any, root: str, document: Dict[str, Any], expected: Optional[PointerRead] = None) -> None:
    """Replace the pointer. With ``expected`` (what the publisher read), only if the pointer is
    still exactly that, else PointerConflict: file://, an exclusive lock around a re-read and the
    rename; S3, a conditional PUT (If-Match the ETag read, If-None-Match when there was none);
    other stores (no conditional write through fsspec), a re-read just before the write."""
    data = (json.dumps(document, indent=2, sort_keys=True) + "\n").encode("utf-8")
    target = f"{root}/{POINTER}"
    if expected is not None and _is_local(fs):
        with _locked(root):
            if _read_raw(fs, target) != expected.raw:
                raise PointerConflict(target)
            _replace(fs, root, target, data)
        return
    if expected is not None and _is_s3(fs) and (expected.raw is None or expected.etag):
        condition = {"IfNoneMatch": "*"} if expected.raw is None else {"IfMatch": expected.etag}
        try:
            fs.pipe_file(target, data, **condition)
            return
        except Exception as exc:
            if _precondition_failed(exc):
                raise PointerConflict(target) from None
            if not _unsupported(exc):
                raise
    if expected is not None and _read_raw(fs, target) != expected.raw:
        raise PointerConflict(target)
    _replace(fs, root, target, data)


def _replace(fs: Any, root: str, target: str, data: bytes) -> None:
    if is_object_store(fs):
        fs.pipe_file(target, data)
        return
    scratch = f"{root}/.{POINTER}.{uuid.uuid4().hex}.tmp"
    fs.pipe_file(scratch, data)
    try:
        fs.mv(scratch, target)  # a rename on local and most mounted stores: readers see old or new
    except Exception:
        try:
            fs.rm(scratch)
        except Exception:
            pass
        raise


def _versions(fs: Any, root: str) -> List[str]:
    folder = f"{root}/{PUBLISHED_VERSIONS}"
    try:
        fs.invalidate_cache(folder)
    except Exception:
        pass
    try:
        entries = fs.ls(folder, detail=False)
    except FileNotFoundError:
        return []
    names = {str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries}
    return sorted(n for n in names if VERSION_NAME.match(n))


IN_FLIGHT_SECONDS = 3600.0  # a version newer than the pointer's, named this recently: a publish under way
CLOCK_SKEW_SECONDS = 300.0


def _in_flight(name: str, named: str, now: datetime) -> bool:
    """Newer than the version the pointer names and named within the last hour (not in the
    future): another publisher's upload, whose pointer write is still to come."""
    match = VERSION_NAME.match(name)
    if not match or name <= named:
        return False
    stamp = match.group("time")
    when = datetime.strptime(stamp, "%Y%m%dT%H%M%S%fZ" if len(stamp) > 16 else "%Y%m%dT%H%M%SZ")
    age = (now - when.replace(tzinfo=timezone.utc)).total_seconds()
    return -CLOCK_SKEW_SECONDS <= age <= IN_FLIGHT_SECONDS


def prune(fs: Any, root: str, keep: int, current: Optional[str]) -> Tuple[List[str], List[str]]:
    """Remove version folders the pointer does not name: (kept, removed). The pointer is read
    again here (another publisher may have moved it): never its version, nor the newest
    ``keep``, nor ``current``, nor a version newer than the pointer's named in the last hour (a
    publish under way). Without a readable pointer nothing is removed."""
    doc = read_pointer(fs, root)
    if doc is None:
        raise PointerError(f"no {POINTER} to prune against")
    named = doc["path"].rsplit("/", 1)[-1]
    names = _versions(fs, root)
    now = datetime.now(timezone.utc)
    kept = set(names[-keep:]) if keep > 0 else set()
    kept.add(named)
    kept.update(name for name in names if _in_flight(name, named, now))
    if current:
        kept.add(current)
    removed = []
    for name in names:
        if name in kept:
            continue
        fs.rm(f"{root}/{PUBLISHED_VERSIONS}/{name}", recursive=True)
        removed.append(name)
    return sorted(kept), removed
