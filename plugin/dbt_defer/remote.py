"""Remote state (SPEC §8): an environment whose ``state`` is a URI, fetched through fsspec.

``file://``, ``http(s)://`` (needs aiohttp: ``pip install "dbt-defer[http]"``), ``s3://``
(``[s3]``: s3fs), ``gs://`` (``[gcs]``: gcsfs), or any other protocol fsspec knows, chained
URIs (``zip://manifest.json::s3://bucket/prod.zip``) included.

A state URI names a folder holding ``manifest.json`` (``s3://bucket/dbt/prod``) or the manifest
file itself (``https://host/prod/manifest.json``); ``run_results.json`` beside it is fetched too
when present. A query string (a signed URL's token) stays at the end: ``https://h/prod?token=T``
reads ``https://h/prod/manifest.json?token=T``.

The cache of an environment is ``<target path>/dbt_defer_state/<env>/`` (a long name: its
prefix + a hash). Each download goes to ``.incoming-<pid>-*``, is verified (a dbt manifest this dbt
can read, of this project, run results readable), then renamed to its own version folder
``v-<time>-<random>/``; ``fetch.json`` is the one pointer naming the version in use (with where
it came from, redacted, and the remote fingerprint), replaced atomically: a reader, or a fetch
killed at any moment, sees the old pair or the new pair, never a mix. Scratch folders of killed
fetches are swept by the next fetch; the previous version is kept for readers still on it.

On use:

- remote unchanged (same fingerprint) -> the cached copy, no download;
- remote changed or never fetched -> download (at most ``DBT_DEFER_MAX_STATE_MB`` per file,
  streamed, after any gzip decoding), verify, switch the pointer;
- remote unreachable, missing or too slow -> the cached copy with one warning that states its
  age, or, with no cached copy, one ``ManifestError`` line naming the environment and the URI;
- remote content that is not this project's readable manifest -> one ``ManifestError`` line;
  the cached copy stays as it was.

``DBT_DEFER_FETCH_TIMEOUT`` (seconds, default 60) is a deadline for the whole fetch of one
environment (pointer, listing, both files), on every protocol.

A folder written by ``dbt-defer publish`` (publish.py) holds a pointer, ``latest.json``, naming
its current version folder (``versions/<UTC time>-<invocation id>/``, never modified once
named). The pointer is read first and the folder it names is fetched as above, so a reader gets
one run's manifest.json + run_results.json even while a publisher writes the next version; a
folder without a pointer is read as it is.

Credentials and query strings of a state URI never leave this module unredacted (messages,
``fetch.json``, ``FetchResult.uri``): see ``config.redact``.

Imports nothing of the CLI; dbt is optional (used only to check the manifest schema version
and to log the fallback warning through dbt's logger).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any, Callable, Dict, Optional, Tuple

from dbt_defer.config import DeferConfigError, EnvironmentSpec, MAX_STATE_MB_VAR, one_line, redact
from dbt_defer.config import max_state_bytes as config_max_state_bytes
from dbt_defer.manifests import (
    MANIFEST,
    RUN_RESULTS,
    ManifestError,
    format_age,
    load_manifest,
    parse_timestamp,
    project_id_for,
)

__all__ = ["redact", "fetch", "fetch_state", "cached_meta", "cached_folder", "cache_dir"]

CACHE_DIR = "dbt_defer_state"
META = "fetch.json"  # the pointer: which version folder is in use, and where it came from
TIMEOUT_ENV = "DBT_DEFER_FETCH_TIMEOUT"  # seconds for the whole fetch of one environment
DEFAULT_TIMEOUT = 60.0
MAX_TIMEOUT = 24 * 3600.0
MAX_STATE_ENV = MAX_STATE_MB_VAR  # per downloaded file, after decoding
NAME_MAX = 64  # longer environment names: a prefix + a hash as the cache folder name
INCOMING = ".incoming-"
META_SCRATCH = ".fetch-"
STALE_SCRATCH_SECONDS = 3600.0
_VERSION = re.compile(r"^v-[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}$")
_CHUNK = 1024 * 1024
# info() keys that identify a version of a remote file, by store:
#   http: ETag / Last-Modified / Content-MD5; s3: ETag, LastModified; gcs: etag, md5Hash,
#   generation, updated; local and most others: mtime (+ size everywhere)
_VERSION_KEYS = (
    "ETag", "etag", "Content-MD5", "md5Hash", "Digest", "generation",
    "Last-Modified", "LastModified", "last_modified", "updated", "mtime",
)
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "http": "http", "https": "http"}

Warn = Callable[[str], None]


class RemoteConfigError(ManifestError):
    """A bad DBT_DEFER_FETCH_TIMEOUT / DBT_DEFER_MAX_STATE_MB: one line naming it and the fix."""


@dataclass(frozen=True)
class FetchResult:
    env: str
    uri: str  # the manifest's URI, redacted (no credentials, no query string)
    local: str  # the cache folder holding manifest.json (+ run_results.json)
    action: str  # "downloaded" | "unchanged" | "cached (unreachable)"
    fetched_at: Optional[str]
    run_results: bool
    message: Optional[str] = None  # the warning, when the cached copy was used instead


# --- settings --------------------------------------------------------------------------------


def fetch_timeout(environ: Optional[Dict[str, str]] = None) -> float:
    """DBT_DEFER_FETCH_TIMEOUT: seconds > 0 (at most a day); unset or empty: 60."""
    raw = (os.environ if environ is None else environ).get(TIMEOUT_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_TIMEOUT
    try:
        value = float(raw.strip())
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and 0 < value <= MAX_TIMEOUT):
        raise RemoteConfigError(
            f"dbt-defer: {TIMEOUT_ENV} is {raw[:40]!r}; use a number of seconds greater than 0 and at most "
            f"{MAX_TIMEOUT:.0f} (the deadline of one environment's whole fetch), e.g. {TIMEOUT_ENV}=60, "
            "or unset it for the default of 60"
        )
    return value


def max_state_bytes(environ: Optional[Dict[str, str]] = None) -> int:
    """DBT_DEFER_MAX_STATE_MB in bytes, per downloaded file (config.max_state_bytes: one rule)."""
    try:
        return config_max_state_bytes(os.environ if environ is None else environ)
    except DeferConfigError as exc:
        raise RemoteConfigError(str(exc)) from None


# --- URIs ------------------------------------------------------------------------------------


def _split(uri: str) -> Tuple[str, str, str]:
    """(the location of the path, its query string with '?', the rest of an fsspec chain with '::').

    In a chained URI the path is in the first segment with '://' (``zip://prod::file:///a.zip``);
    bare protocol names before it (``simplecache::s3://b/prod``) stay in front of it."""
    segments = uri.split("::")
    at = next((i for i, seg in enumerate(segments) if "://" in seg), 0)
    prefix = "".join(seg + "::" for seg in segments[:at])
    head, q, query = segments[at].partition("?")
    chain = "".join("::" + seg for seg in segments[at + 1:])
    return prefix + head, q + query, chain


def manifest_uri(state: str) -> str:
    """The manifest's URI for a state URI naming a folder or the file itself."""
    head, query, chain = _split(state)
    if head.rstrip("/").lower().endswith(".json"):
        return state
    return head.rstrip("/") + "/" + MANIFEST + query + chain


def _sibling(uri: str, name: str) -> str:
    head, query, chain = _split(uri)
    folder = head.rsplit("/", 1)[0] + "/" if "/" in head else ""
    return folder + name + query + chain


def cache_dir(target_path: str, env_name: str) -> str:
    """The cache folder of an environment; names longer than NAME_MAX: a prefix + a hash."""
    name = env_name
    if len(name) > NAME_MAX:
        name = name[:40] + "-" + hashlib.sha256(env_name.encode("utf-8")).hexdigest()[:16]
    return os.path.join(target_path, CACHE_DIR, name)


def _uri_id(uri: str) -> str:
    return hashlib.sha256(uri.encode("utf-8")).hexdigest()


def _storage_options(uri: str, timeout: Optional[float] = None) -> Dict[str, Any]:
    if uri.split("://", 1)[0].lower() not in ("http", "https"):
        return {}
    try:
        import aiohttp
    except ImportError:
        return {}
    seconds = timeout if timeout is not None else fetch_timeout()
    return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=seconds)}}


def _filesystem(env_name: str, uri: str, timeout: Optional[float] = None) -> Tuple[Any, str]:
    """(filesystem, path) of a URI; a missing implementation or an unknown protocol: one line.
    Other failures (a store that cannot be reached while it is set up) are raised as they are."""
    shown = redact(uri)
    try:
        import fsspec
    except ImportError:  # pragma: no cover - fsspec is a dependency
        raise ManifestError(
            f"dbt-defer: environment '{env_name}': state {shown} is a URI but fsspec is not installed; "
            "pip install fsspec"
        ) from None
    protocols = [seg.split("://", 1)[0].lower() for seg in uri.split("::") if "://" in seg]
    protocol = protocols[0] if protocols else uri.split("://", 1)[0].lower()
    try:
        return fsspec.core.url_to_fs(uri, **_storage_options(uri, timeout))
    except ImportError as exc:
        missing = getattr(exc, "name", None) or ""
        extra = next((_EXTRAS[p] for p in protocols if p in _EXTRAS), None)
        hint = (
            f'pip install "dbt-defer[{extra}]"' if extra
            else f"pip install {missing}" if missing
            else f"install the fsspec implementation for {protocol}://"
        )
        raise ManifestError(
            f"dbt-defer: environment '{env_name}': cannot read {shown}: {redact(one_line(exc, limit=300))}; {hint}"
        ) from None
    except ValueError as exc:
        raise ManifestError(
            f"dbt-defer: environment '{env_name}': cannot read {shown}: {redact(one_line(exc, limit=300))}; use a local "
            "path or a file://, http(s)://, s3:// or gs:// URI"
        ) from None


# --- the deadline ----------------------------------------------------------------------------


class FetchTimeout(Exception):
    """The fetch of one environment took longer than DBT_DEFER_FETCH_TIMEOUT."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"timed out after {seconds:g} s ({TIMEOUT_ENV})")
        self.seconds = seconds


class _TooLarge(Exception):
    def __init__(self, limit: int, path: str) -> None:
        super().__init__(f"larger than {limit // (1024 * 1024)} MB")
        self.limit = limit
        self.path = path


class _Deadline:
    """One environment's fetch: every remote call runs in a daemon thread and is waited for only
    until the deadline (a store that never answers cannot hold the run; its thread ends with the
    store's own timeout and writes nothing that is read)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        self.cancelled = threading.Event()

    def run(self, fn: Callable[[], Any]) -> Any:
        remaining = self.end - time.monotonic()
        if remaining <= 0:
            self.cancelled.set()
            raise FetchTimeout(self.seconds)
        box: Dict[str, Any] = {}

        def target() -> None:
            try:
                box["value"] = fn()
            except BaseException as exc:  # handed to the caller's thread
                box["error"] = exc

        worker = threading.Thread(target=target, name="dbt-defer-fetch", daemon=True)
        worker.start()
        worker.join(remaining)
        if worker.is_alive():
            self.cancelled.set()
            raise FetchTimeout(self.seconds)
        if "error" in box:
            raise box["error"]
        return box.get("value")


def _is_timeout(exc: BaseException) -> bool:
    import asyncio
    import socket

    kinds: Tuple[type, ...] = (TimeoutError, asyncio.TimeoutError, socket.timeout, FetchTimeout)
    try:
        from fsspec.exceptions import FSTimeoutError

        kinds += (FSTimeoutError,)
    except ImportError:  # pragma: no cover
        pass
    return isinstance(exc, kinds) or "Timeout" in type(exc).__name__


def _chain(exc: BaseException) -> list:
    seen = []
    current: Optional[BaseException] = exc
    while current is not None and len(seen) < 6:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _reason(exc: BaseException) -> str:
    """The most telling message in an exception chain (fsspec wraps connection errors)."""
    seen = _chain(exc)
    if isinstance(exc, FetchTimeout):
        return str(exc)
    if any(_is_timeout(e) for e in seen):
        seconds = fetch_timeout_or_default()
        return f"timed out after {seconds:g} s ({TIMEOUT_ENV})"
    for candidate in reversed(seen):
        text = str(candidate).strip().splitlines()[0] if str(candidate).strip() else ""
        if text and candidate is not exc:
            return f"{type(candidate).__name__}: {text}"
    if isinstance(exc, FileNotFoundError):
        return "not found"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def fetch_timeout_or_default() -> float:
    try:
        return fetch_timeout()
    except RemoteConfigError:
        return DEFAULT_TIMEOUT


# --- the cache -------------------------------------------------------------------------------


def fingerprint(info: Dict[str, Any]) -> Dict[str, str]:
    out = {k: str(info[k]) for k in _VERSION_KEYS if info.get(k) not in (None, "")}
    if info.get("size") is not None:
        out["size"] = str(info["size"])
    return out


def _trustworthy(fp: Dict[str, str]) -> bool:
    """A fingerprint with only a size cannot tell two versions apart: always download."""
    return any(k != "size" for k in fp)


def _current(root: str) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """(the pointer, the version folder it names) of an environment's cache; (None, None) when
    there is no usable copy. A cache written before versioned folders is its own folder."""
    try:
        with open(os.path.join(root, META), encoding="utf-8") as fh:
            meta = json.load(fh)
    except (OSError, ValueError):
        return None, None
    if not isinstance(meta, dict):
        return None, None
    version = meta.get("version")
    if version is None:
        folder = root  # the layout before versions: manifest.json in the environment's folder
    elif isinstance(version, str) and _VERSION.match(version):
        folder = os.path.join(root, version)
    else:
        return None, None
    if not os.path.isfile(os.path.join(folder, MANIFEST)):
        return None, None
    return meta, folder


def cached_meta(target_path: str, env_name: str) -> Optional[Dict[str, Any]]:
    """What the cache holds for an environment (None when nothing usable)."""
    return _current(cache_dir(target_path, env_name))[0]


def cached_folder(target_path: str, env_name: str) -> Optional[str]:
    """The folder holding an environment's cached manifest.json (+ run_results.json), if any."""
    return _current(cache_dir(target_path, env_name))[1]


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _hours_since(stamp: Optional[str]) -> Optional[float]:
    when = parse_timestamp(stamp or "")
    if when is None:
        return None
    return max(0.0, (datetime.now(timezone.utc) - when).total_seconds() / 3600.0)


def _age_text(meta: Dict[str, Any], folder: str) -> str:
    fetched = _hours_since(meta.get("fetched_at"))
    parts = []
    if fetched is not None:
        parts.append(f"fetched {format_age(fetched)} ago")
    try:
        generated_at = load_manifest("cache", os.path.join(folder, MANIFEST)).generated_at
    except ManifestError:
        generated_at = None
    generated = _hours_since(generated_at)
    if generated is not None:
        parts.append(f"manifest generated {format_age(generated)} ago, at {generated_at}")
    return "; ".join(parts) or "age unknown"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # a fetch of this process that timed out may still be writing there
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _sweep(root: str) -> None:
    """Remove what killed fetches left behind: scratch folders and pointer files of processes
    that are gone (or older than an hour), and version folders no pointer names any more."""
    try:
        names = os.listdir(root)
    except OSError:
        return
    now = time.time()
    for name in names:
        path = os.path.join(root, name)
        if not name.startswith((INCOMING, META_SCRATCH)):
            continue
        pid_text = name.split("-")[1] if name.count("-") >= 2 else ""
        try:
            old = now - os.lstat(path).st_mtime > STALE_SCRATCH_SECONDS
        except OSError:
            continue
        if old or not (pid_text.isdigit() and _pid_alive(int(pid_text))):
            _remove(path)


def _prune(root: str, keep: Tuple[str, ...]) -> None:
    """Version folders other than ``keep`` (the current one and the one before it, which a
    reader may still be reading), and the files of the layout before versions."""
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        if (_VERSION.match(name) and name not in keep) or name in (MANIFEST, RUN_RESULTS):
            _remove(os.path.join(root, name))


def _remove(path: str) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except OSError:
        pass


def _write_meta(root: str, meta: Dict[str, Any]) -> None:
    """Replace the pointer in one atomic rename: this is the moment a new version is in use."""
    fd, tmp = tempfile.mkstemp(prefix=f"{META_SCRATCH}{os.getpid()}-", suffix=".json", dir=root)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(meta, fh, indent=2, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, os.path.join(root, META))
    except BaseException:
        _remove(tmp)
        raise


# --- fetching --------------------------------------------------------------------------------


def _default_warn(message: str) -> None:
    try:
        from dbt_common.events.base_types import EventLevel
        from dbt_common.events.functions import fire_event
        from dbt_common.events.types import Note

        fire_event(Note(msg=message), level=EventLevel.WARN)
    except Exception:  # no dbt here: plain stderr
        print(message, file=sys.stderr)


def _is_compatible() -> Optional[Callable[[str], bool]]:
    try:
        from dbt.artifacts.schemas.manifest import WritableManifest
    except Exception:  # pragma: no cover - dbt not importable
        return None
    return WritableManifest.is_compatible_version


class _Unreachable(Exception):
    """The store could not be reached, answered an error, or was too slow: the cache may serve."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def fetch(
    spec: EnvironmentSpec,
    target_path: str,
    *,
    force: bool = False,
    warn: Optional[Warn] = None,
    project_name: Optional[str] = None,
) -> FetchResult:
    """Bring an environment's remote state into the cache; see the module docstring.

    ``project_name``: a download whose manifest is of another project is refused before it
    replaces anything. Every message is redacted with the environment's own secrets."""
    sink = warn or _default_warn

    def say(message: str) -> None:
        sink(spec.redact(message))

    try:
        return _fetch(spec, target_path, force, say, project_name)
    except ManifestError as exc:
        raise type(exc)(spec.redact(str(exc))) from None


def _fetch(
    spec: EnvironmentSpec, target_path: str, force: bool, warn: Warn, project_name: Optional[str]
) -> FetchResult:
    timeout = fetch_timeout()
    cap = max_state_bytes()
    deadline = _Deadline(timeout)
    root = cache_dir(target_path, spec.name)
    meta, folder = _current(root)
    original = spec
    if meta is not None and not _same_state(meta, spec.state):
        meta, folder = None, None  # the environment points elsewhere now: the old copy is not its state

    def fallback(shown: str, reason: str) -> FetchResult:
        if meta is None or folder is None:
            raise ManifestError(
                f"dbt-defer: environment '{spec.name}': cannot fetch {shown} ({reason}) and there is no "
                f"cached copy; check the URI, the network and credentials, then run dbt-defer fetch"
            )
        message = (
            f"dbt-defer: environment '{spec.name}': cannot fetch {shown} ({reason}); using the cached copy "
            f"in {folder} ({_age_text(meta, folder)})"
        )
        warn(message)
        return FetchResult(
            spec.name, str(meta.get("uri") or shown), folder, "cached (unreachable)", meta.get("fetched_at"),
            os.path.isfile(os.path.join(folder, RUN_RESULTS)), message,
        )

    try:
        spec = _follow_pointer(spec, deadline, timeout)
    except _Unreachable as exc:
        return fallback(original.redact(f"{pointer_root(original.state)}/{POINTER}"), exc.reason)
    uri = manifest_uri(spec.state)
    shown = original.redact(uri)
    same_uri = meta is not None and meta.get("uri_sha256", _uri_id(str(meta.get("uri")))) == _uri_id(uri)

    try:
        fs, path = deadline.run(lambda: _filesystem(spec.name, uri, timeout))
        remote_fp = fingerprint(deadline.run(lambda: fs.info(path)))
    except ManifestError:
        raise
    except Exception as exc:  # unreachable, missing, denied, too slow: fsspec raises many kinds
        return fallback(shown, _reason(exc))

    results_path = _sibling(path, RUN_RESULTS)
    results_fp: Optional[Dict[str, str]]
    try:
        results_fp = fingerprint(deadline.run(lambda: fs.info(results_path)))
    except FetchTimeout as exc:
        return fallback(shown, _reason(exc))
    except Exception:
        results_fp = None  # no run_results.json beside the manifest (or not readable): optional

    if (
        not force
        and same_uri
        and meta is not None
        and folder is not None
        and _trustworthy(remote_fp)
        and meta.get("manifest") == remote_fp
        and meta.get("run_results") == results_fp
        and (results_fp is None or os.path.isfile(os.path.join(folder, RUN_RESULTS)))
    ):
        return FetchResult(spec.name, shown, folder, "unchanged", meta.get("fetched_at"), results_fp is not None)

    os.makedirs(root, exist_ok=True)
    _sweep(root)
    incoming = tempfile.mkdtemp(prefix=f"{INCOMING}{os.getpid()}-", dir=root)
    try:
        try:
            _download(deadline, fs, path, os.path.join(incoming, MANIFEST), cap)
            if results_fp is not None:
                try:
                    _download(deadline, fs, results_path, os.path.join(incoming, RUN_RESULTS), cap)
                except (FetchTimeout, _TooLarge):
                    raise
                except Exception:
                    pass  # optional; vanished between info() and get()
        except _TooLarge as exc:
            which = shown if exc.path == path else _sibling(shown, RUN_RESULTS)
            raise ManifestError(
                f"dbt-defer: environment '{spec.name}': {which} is {exc} after decoding "
                f"({MAX_STATE_ENV}); nothing was cached. Check what the store serves, or raise {MAX_STATE_ENV} "
                "if that environment's artifacts are really that large"
            ) from None
        except Exception as exc:
            return fallback(shown, _reason(exc))
        _verify(spec.name, incoming, shown, project_name)
        version = f"v-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
        os.replace(incoming, os.path.join(root, version))
        fetched_at = _now()
        _write_meta(root, {
            "version": version,
            "uri": shown,
            "uri_sha256": _uri_id(uri),
            "state_sha256": _uri_id(original.state),
            "fetched_at": fetched_at,
            "manifest": remote_fp,
            "run_results": results_fp,
        })
    finally:
        if os.path.isdir(incoming):
            shutil.rmtree(incoming, ignore_errors=True)
    previous = os.path.basename(folder) if folder is not None and folder != root else ""
    _prune(root, (version, previous, str((_current(root)[0] or {}).get("version"))))  # and a concurrent fetch's
    return FetchResult(
        spec.name, shown, os.path.join(root, version), "downloaded", fetched_at, results_fp is not None
    )


def _same_state(meta: Dict[str, Any], state: str) -> bool:
    """Was this cached copy fetched for this state (or, for a publish pointer, its versions)?"""
    if "state_sha256" in meta:
        return meta["state_sha256"] == _uri_id(state)
    cached = str(meta.get("uri") or "")  # a cache written before versioned folders: its raw URI
    root = pointer_root(state)
    if root is not None and published_version(cached) is not None:
        return cached.startswith(root + "/" + PUBLISHED_VERSIONS + "/")
    return cached == manifest_uri(state)


def _download(deadline: _Deadline, fs: Any, path: str, local: str, cap: int) -> None:
    """Stream one remote file to ``local``, at most ``cap`` bytes (after any gzip decoding),
    within the deadline; a longer file raises _TooLarge and what was read is discarded."""
    cancelled = deadline.cancelled

    def copy() -> None:
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        # http(s): a streaming GET (no size probe, no range requests; aiohttp decodes gzip as it reads)
        options = {"block_size": 0, "size": 1} if protocol in ("http", "https") else {}
        with fs.open(path, "rb", **options) as src, open(local, "wb") as out:
            total = 0
            while True:
                if cancelled.is_set():
                    return
                chunk = src.read(_CHUNK)
                if not chunk:
                    break
                total += len(chunk)
                if total > cap:
                    raise _TooLarge(cap, path)
                out.write(chunk)

    try:
        deadline.run(copy)
    except BaseException:
        _remove(local)
        raise


def _verify(env_name: str, incoming: str, shown: str, project_name: Optional[str]) -> None:
    """The downloaded pair is this project's manifest that this dbt reads (+ readable run
    results); anything else is one line, and nothing in the cache is replaced."""
    local_manifest = os.path.join(incoming, MANIFEST)
    results_shown = _sibling(shown, RUN_RESULTS)
    try:
        manifest = load_manifest(env_name, local_manifest, is_compatible=_is_compatible())
    except ManifestError as exc:
        text = str(exc).replace(os.path.join(incoming, RUN_RESULTS), results_shown)
        raise ManifestError(text.replace(local_manifest, shown) + "; the cached copy was kept") from None
    if project_name:
        if manifest.project_name:
            other, same = repr(manifest.project_name), manifest.project_name == project_name
        elif manifest.project_id:
            other, same = f"project_id {manifest.project_id}", manifest.project_id == project_id_for(project_name)
        else:
            other, same = "", True
        if not same:
            raise ManifestError(
                f"dbt-defer: environment '{env_name}': {shown} is a manifest of project {other}, not of "
                f"{project_name!r}; the cached copy was kept; point the environment at this project's artifacts"
            )


def fetch_state(
    spec: EnvironmentSpec, target_path: str, *, warn: Optional[Warn] = None, project_name: Optional[str] = None
) -> str:
    """The local folder holding a URI environment's manifest.json (called on every use)."""
    return fetch(spec, target_path, warn=warn, project_name=project_name).local


# --- publish pointers (written by dbt-defer publish, see publish.py) ------------------------

POINTER = "latest.json"
PUBLISHED_VERSIONS = "versions"
POINTER_MAX_BYTES = 64 * 1024
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
    if not isinstance(doc, dict) or not isinstance(doc.get("path"), str):
        raise PointerError("no version path in it")
    folder, _, name = doc["path"].partition("/")
    if folder != PUBLISHED_VERSIONS or not VERSION_NAME.match(name):
        raise PointerError(
            f"its version path {doc['path'][:80]!r} is not {PUBLISHED_VERSIONS}/<UTC time>-<invocation id>"
        )
    return doc


def read_pointer(fs: Any, root_path: str) -> Optional[Dict[str, Any]]:
    """The pointer in a folder of ``fs``; None when there is none. ValueError: not a pointer."""
    path = root_path.rstrip("/") + "/" + POINTER
    try:
        fs.invalidate_cache(path)  # never an answer cached by an earlier call in this process
    except Exception:
        pass
    try:
        with fs.open(path, "rb") as fh:
            raw = fh.read(POINTER_MAX_BYTES + 1)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
        return None  # S3 and GCS answer 403 for a missing object to readers without the list right
    except Exception as exc:
        if getattr(exc, "status", None) in (403, 404):  # http(s): aiohttp's ClientResponseError
            return None
        raise
    return parse_pointer(raw)


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


def _redact_for(spec: EnvironmentSpec, text: str) -> str:
    redact = getattr(spec, "redact", None)
    return redact(text) if callable(redact) else text


def _follow_pointer(
    spec: EnvironmentSpec, deadline: _Deadline, timeout: float
) -> EnvironmentSpec:
    """``spec`` with its state moved to the version folder its publish pointer names, if any.
    _Unreachable: the pointer could not be read (the caller falls back to the cache)."""
    root = pointer_root(spec.state)
    if root is None:
        return spec
    try:
        fs, path = deadline.run(lambda: _filesystem(spec.name, root + "/" + POINTER, timeout))
        doc = deadline.run(lambda: read_pointer(fs, path.rsplit("/", 1)[0]))
    except PointerError as exc:
        raise ManifestError(
            f"dbt-defer: environment '{spec.name}': {_redact_for(spec, root + '/' + POINTER)} is not a dbt-defer "
            f"publish pointer ({exc}); publish again with dbt-defer publish, or delete it to read the folder's "
            "manifest.json"
        ) from None
    except ManifestError as exc:  # no implementation, unknown protocol: name the state, not the pointer
        raise ManifestError(str(exc).replace(redact(root + "/" + POINTER), redact(spec.state))) from None
    except Exception as exc:
        raise _Unreachable(_reason(exc)) from None
    if doc is None:
        return spec
    return replace(spec, state=f"{root}/{doc['path']}")


def follow_pointer(spec: EnvironmentSpec, target_path: str) -> EnvironmentSpec:
    """``spec`` with its state moved to the version folder its publish pointer names, if any
    (unreachable: the version fetched last, or one ManifestError line when there is none)."""
    timeout = fetch_timeout()
    try:
        return _follow_pointer(spec, _Deadline(timeout), timeout)
    except _Unreachable as exc:
        cached = published_version(str((cached_meta(target_path, spec.name) or {}).get("uri") or ""))
        if cached is None:
            where = _redact_for(spec, str(pointer_root(spec.state)) + "/" + POINTER)
            raise ManifestError(
                f"dbt-defer: environment '{spec.name}': cannot fetch {where} ({_redact_for(spec, exc.reason)}) "
                "and there is no cached copy; check the URI, the network and credentials, then run dbt-defer fetch"
            ) from None
        return replace(spec, state=f"{pointer_root(spec.state)}/{PUBLISHED_VERSIONS}/{cached['version']}")
