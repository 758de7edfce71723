"""Reaching a remote store (SPEC §8): URIs, fsspec filesystems, the deadline of one fetch and a
bounded streaming download.

Owns: ``DBT_DEFER_FETCH_TIMEOUT`` (a deadline for the whole fetch of one environment, on every
protocol) and the per-file cap ``DBT_DEFER_MAX_STATE_MB`` (``config.max_state_bytes``: one
rule), the URI forms (a folder or the manifest itself, a signed URL's query string kept at the
end, fsspec chains), which extra to install for a protocol, and the one-line reason of a failed
remote call. May not touch: the local cache (``state_cache``), what a download must contain
(``remote`` verifies it), publish pointers (``pointer``). Imports ``config`` and ``manifests``
(file names); fsspec and aiohttp lazily.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from typing import Any, Callable, Dict, Optional, Tuple

from dbt_defer.config import MAX_STATE_MB_VAR, DeferConfigError, exception_chain, one_line, redact, uri_secrets
from dbt_defer.config import max_state_bytes as config_max_state_bytes
from dbt_defer.manifests import MANIFEST, ManifestError

TIMEOUT_ENV = "DBT_DEFER_FETCH_TIMEOUT"  # seconds for the whole fetch of one environment
DEFAULT_TIMEOUT = 60.0
MAX_TIMEOUT = 24 * 3600.0
MAX_STATE_ENV = MAX_STATE_MB_VAR  # per downloaded file, after decoding
_CHUNK = 1024 * 1024
# object stores whose fsspec implementation takes no user:password@ in the URI (s3fs would read
# "KEY:SECRET" as a bucket name): where their credentials go instead
_S3_CREDENTIALS = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment"
_GCS_CREDENTIALS = "GOOGLE_APPLICATION_CREDENTIALS (a service account key file) or gcloud's default login"
_CREDENTIALS_FROM = {"s3": _S3_CREDENTIALS, "s3a": _S3_CREDENTIALS, "gs": _GCS_CREDENTIALS, "gcs": _GCS_CREDENTIALS}
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "http": "http", "https": "http"}


class RemoteConfigError(ManifestError):
    """A bad DBT_DEFER_FETCH_TIMEOUT / DBT_DEFER_MAX_STATE_MB: one line naming it and the fix."""


# --- settings ---------------------------------------------------------------------------------


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


def split_uri(uri: str) -> Tuple[str, str, str]:
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
    head, query, chain = split_uri(state)
    if head.rstrip("/").lower().endswith(".json"):
        return state
    return head.rstrip("/") + "/" + MANIFEST + query + chain


def sibling(uri: str, name: str) -> str:
    head, query, chain = split_uri(uri)
    folder = head.rsplit("/", 1)[0] + "/" if "/" in head else ""
    return folder + name + query + chain


def storage_options(uri: str, timeout: Optional[float] = None) -> Dict[str, Any]:
    if uri.split("://", 1)[0].lower() not in ("http", "https"):
        return {}
    try:
        import aiohttp
    except ImportError:
        return {}
    seconds = timeout if timeout is not None else fetch_timeout()
    return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=seconds)}}


def filesystem(env_name: str, uri: str, timeout: Optional[float] = None) -> Tuple[Any, str]:
    """(filesystem, path) of a URI; a missing implementation or an unknown protocol: one line.
    Other failures (a store that cannot be reached while it is set up) are raised as they are."""
    shown = redact(uri, uri_secrets(uri))
    try:
        import fsspec
    except ImportError:  # pragma: no cover - fsspec is a dependency
        raise ManifestError(
            f"dbt-defer: environment '{env_name}': state {shown} is a URI but fsspec is not installed; "
            "pip install fsspec"
        ) from None
    protocols = [seg.split("://", 1)[0].lower() for seg in uri.split("::") if "://" in seg]
    protocol = protocols[0] if protocols else uri.split("://", 1)[0].lower()
    for segment in uri.split("::"):
        scheme = segment.split("://", 1)[0].lower() if "://" in segment else ""
        if scheme in _CREDENTIALS_FROM and any(part.endswith("@") for part in uri_secrets(segment)):
            raise ManifestError(
                f"dbt-defer: environment '{env_name}': state {shown} has credentials in the URI, which "
                f"{scheme}:// does not support; remove them from the URI and give them as "
                f"{_CREDENTIALS_FROM[scheme]}"
            )
    try:
        return fsspec.core.url_to_fs(uri, **storage_options(uri, timeout))
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


class TooLarge(Exception):
    def __init__(self, limit: int, path: str) -> None:
        super().__init__(f"larger than {limit // (1024 * 1024)} MB")
        self.limit = limit
        self.path = path


class Deadline:
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


def reason(exc: BaseException) -> str:
    """The most telling message in an exception chain (fsspec wraps connection errors)."""
    seen = exception_chain(exc)
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


def clean_not_found(exc: BaseException) -> bool:
    """The store said plainly that the file is not there (404, no such key or file), and
    nothing else went wrong: fsspec's http(s) raises FileNotFoundError for any failed request
    (a 500, a 403, a refused connection), with the real error as its cause."""
    seen = exception_chain(exc)
    for e in seen:
        status = getattr(e, "status", None)
        code = str(((getattr(e, "response", None) or {}).get("Error") or {}).get("Code", "")) \
            if isinstance(getattr(e, "response", None), dict) else ""
        if code:  # botocore's ClientError
            if code not in ("404", "NoSuchKey", "NotFound"):
                return False
        elif status is not None:
            if status != 404:
                return False
        elif not isinstance(e, FileNotFoundError):
            return False
    return isinstance(exc, FileNotFoundError) or getattr(exc, "status", None) == 404


def fetch_timeout_or_default() -> float:
    try:
        return fetch_timeout()
    except RemoteConfigError:
        return DEFAULT_TIMEOUT


def download(deadline: Deadline, fs: Any, path: str, local: str, cap: int) -> None:
    """Stream one remote file to ``local``, at most ``cap`` bytes (after any gzip decoding),
    within the deadline; a longer file raises TooLarge and what was read is discarded."""
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
                    raise TooLarge(cap, path)
                out.write(chunk)

    try:
        deadline.run(copy)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(local)
        raise
