"""Remote state (SPEC §8): an environment whose ``state`` is a URI, fetched through fsspec.

``file://``, ``http(s)://`` (needs aiohttp: ``pip install "dbt-defer[http]"``), ``s3://``
(``[s3]``: s3fs), ``gs://`` (``[gcs]``: gcsfs), or any other protocol fsspec knows.

A state URI names a folder holding ``manifest.json`` (``s3://bucket/dbt/prod``) or the manifest
file itself (``https://host/prod/manifest.json``); ``run_results.json`` beside it is fetched too
when present. Copies live in ``<target path>/dbt_defer_state/<env>/`` with a small
``fetch.json`` recording where they came from and the remote fingerprint (ETag, or
modification time and size, whatever the store reports). On use:

- remote unchanged (same fingerprint) -> the cached copy, no download;
- remote changed or never fetched -> download into a scratch folder, verify it is a dbt
  manifest this dbt can read, then move it into place (a reader never sees half a copy);
- remote unreachable or missing -> the cached copy with one warning that states its age, or,
  with no cached copy, one ``ManifestError`` line naming the environment and the URI.

A folder written by ``dbt-defer publish`` (publish.py) holds a pointer, ``latest.json``, naming
its current version folder (``versions/<UTC time>-<invocation id>/``, never modified once
named). The pointer is read first and the folder it names is fetched as above, so a reader gets
one run's manifest.json + run_results.json even while a publisher writes the next version; a
folder without a pointer is read as it is.

Imports nothing of the CLI; dbt is optional (used only to check the manifest schema version
and to log the fallback warning through dbt's logger).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any, Callable, Dict, Optional, Tuple

from dbt_defer.config import EnvironmentSpec
from dbt_defer.manifests import MANIFEST, RUN_RESULTS, ManifestError, format_age, load_manifest, parse_timestamp

CACHE_DIR = "dbt_defer_state"
META = "fetch.json"
TIMEOUT_ENV = "DBT_DEFER_FETCH_TIMEOUT"  # seconds, for http(s); default 60
# info() keys that identify a version of a remote file, by store:
#   http: ETag / Last-Modified / Content-MD5; s3: ETag, LastModified; gcs: etag, md5Hash,
#   generation, updated; local and most others: mtime (+ size everywhere)
_VERSION_KEYS = (
    "ETag", "etag", "Content-MD5", "md5Hash", "Digest", "generation",
    "Last-Modified", "LastModified", "last_modified", "updated", "mtime",
)
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "http": "http", "https": "http"}

Warn = Callable[[str], None]


@dataclass(frozen=True)
class FetchResult:
    env: str
    uri: str  # the manifest's URI
    local: str  # the cache folder holding manifest.json (+ run_results.json)
    action: str  # "downloaded" | "unchanged" | "cached (unreachable)"
    fetched_at: Optional[str]
    run_results: bool
    message: Optional[str] = None  # the warning, when the cached copy was used instead


def cache_dir(target_path: str, env_name: str) -> str:
    return os.path.join(target_path, CACHE_DIR, env_name)


def manifest_uri(state: str) -> str:
    """The manifest's URI for a state URI naming a folder or the file itself."""
    if state.rstrip("/").lower().endswith(".json"):
        return state
    return state.rstrip("/") + "/" + MANIFEST


def _sibling(uri: str, name: str) -> str:
    return uri.rsplit("/", 1)[0] + "/" + name


def _storage_options(uri: str) -> Dict[str, Any]:
    if uri.split("://", 1)[0].lower() not in ("http", "https"):
        return {}
    try:
        import aiohttp
    except ImportError:
        return {}
    try:
        seconds = float(os.environ.get(TIMEOUT_ENV) or 60)
    except ValueError:
        seconds = 60.0
    return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=seconds)}}


def _filesystem(env_name: str, uri: str) -> Tuple[Any, str]:
    try:
        import fsspec
    except ImportError:  # pragma: no cover - fsspec is a dependency
        raise ManifestError(
            f"dbt-defer: environment '{env_name}': state {uri} is a URI but fsspec is not installed; "
            "pip install fsspec"
        ) from None
    protocol = uri.split("://", 1)[0].lower()
    try:
        return fsspec.core.url_to_fs(uri, **_storage_options(uri))
    except ImportError as exc:
        extra = _EXTRAS.get(protocol)
        hint = f'pip install "dbt-defer[{extra}]"' if extra else f"install the fsspec implementation for {protocol}://"
        raise ManifestError(
            f"dbt-defer: environment '{env_name}': cannot read {uri}: {exc}; {hint}"
        ) from None
    except ValueError as exc:
        raise ManifestError(
            f"dbt-defer: environment '{env_name}': cannot read {uri}: {exc}; use a local path or a "
            "file://, http(s)://, s3:// or gs:// URI"
        ) from None


def _reason(exc: BaseException) -> str:
    """The most telling message in an exception chain (fsspec wraps connection errors)."""
    seen = []
    current: Optional[BaseException] = exc
    while current is not None and len(seen) < 6:
        seen.append(current)
        current = current.__cause__ or current.__context__
    for candidate in reversed(seen):
        text = str(candidate).strip().splitlines()[0] if str(candidate).strip() else ""
        if text and candidate is not exc:
            return f"{type(candidate).__name__}: {text}"
    if isinstance(exc, FileNotFoundError):
        return "not found"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def fingerprint(info: Dict[str, Any]) -> Dict[str, str]:
    out = {k: str(info[k]) for k in _VERSION_KEYS if info.get(k) not in (None, "")}
    if info.get("size") is not None:
        out["size"] = str(info["size"])
    return out


def _trustworthy(fp: Dict[str, str]) -> bool:
    """A fingerprint with only a size cannot tell two versions apart: always download."""
    return any(k != "size" for k in fp)


def _read_meta(folder: str) -> Optional[Dict[str, Any]]:
    try:
        with open(os.path.join(folder, META), encoding="utf-8") as fh:
            meta = json.load(fh)
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or not os.path.isfile(os.path.join(folder, MANIFEST)):
        return None
    return meta


def cached_meta(target_path: str, env_name: str) -> Optional[Dict[str, Any]]:
    """What the cache holds for an environment (None when nothing usable)."""
    return _read_meta(cache_dir(target_path, env_name))


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


def fetch(
    spec: EnvironmentSpec,
    target_path: str,
    *,
    force: bool = False,
    warn: Optional[Warn] = None,
) -> FetchResult:
    """Bring an environment's remote state into the cache; see the module docstring."""
    warn = warn or _default_warn
    spec = follow_pointer(spec, target_path)  # a published folder: the version its pointer names
    uri = manifest_uri(spec.state)
    results_uri = _sibling(uri, RUN_RESULTS)
    folder = cache_dir(target_path, spec.name)
    meta = _read_meta(folder)
    if meta is not None and meta.get("uri") != uri:
        meta = None  # the environment points elsewhere now: the old copy is not its state
    fs, path = _filesystem(spec.name, uri)

    try:
        remote_fp = fingerprint(fs.info(path))
    except Exception as exc:  # unreachable, missing, denied: fsspec raises many kinds
        reason = _reason(exc)
        if meta is None:
            raise ManifestError(
                f"dbt-defer: environment '{spec.name}': cannot fetch {uri} ({reason}) and there is no "
                f"cached copy; check the URI, the network and credentials, then run dbt-defer fetch"
            ) from None
        message = (
            f"dbt-defer: environment '{spec.name}': cannot fetch {uri} ({reason}); using the cached copy "
            f"in {folder} ({_age_text(meta, folder)})"
        )
        warn(message)
        return FetchResult(
            spec.name, uri, folder, "cached (unreachable)", meta.get("fetched_at"),
            os.path.isfile(os.path.join(folder, RUN_RESULTS)), message,
        )

    results_fp: Optional[Dict[str, str]]
    try:
        results_fp = fingerprint(fs.info(_sibling(path, RUN_RESULTS)))
    except Exception:
        results_fp = None  # no run_results.json beside the manifest (or not readable): optional

    if (
        not force
        and meta is not None
        and _trustworthy(remote_fp)
        and meta.get("manifest") == remote_fp
        and meta.get("run_results") == results_fp
        and (results_fp is None or os.path.isfile(os.path.join(folder, RUN_RESULTS)))
    ):
        return FetchResult(spec.name, uri, folder, "unchanged", meta.get("fetched_at"), results_fp is not None)

    _download(spec.name, fs, path, uri, results_uri, results_fp is not None, folder)
    fetched_at = _now()
    _write_meta(folder, {"uri": uri, "fetched_at": fetched_at, "manifest": remote_fp, "run_results": results_fp})
    return FetchResult(spec.name, uri, folder, "downloaded", fetched_at, results_fp is not None)


def _download(
    env_name: str, fs: Any, path: str, uri: str, results_uri: str, with_results: bool, folder: str
) -> None:
    os.makedirs(folder, exist_ok=True)
    incoming = tempfile.mkdtemp(prefix=".incoming-", dir=folder)
    try:
        local_manifest = os.path.join(incoming, MANIFEST)
        try:
            fs.get_file(path, local_manifest)
        except Exception as exc:
            raise ManifestError(
                f"dbt-defer: environment '{env_name}': cannot fetch {uri} ({_reason(exc)}); "
                "check the URI, the network and credentials, then run dbt-defer fetch"
            ) from None
        if with_results:
            try:
                fs.get_file(_sibling(path, RUN_RESULTS), os.path.join(incoming, RUN_RESULTS))
            except Exception:
                pass  # optional; vanished between info() and get()
        try:
            load_manifest(env_name, local_manifest, is_compatible=_is_compatible())
        except ManifestError as exc:
            text = str(exc).replace(os.path.join(incoming, RUN_RESULTS), results_uri)
            raise ManifestError(text.replace(local_manifest, uri)) from None
        for name in (MANIFEST, RUN_RESULTS):
            source = os.path.join(incoming, name)
            if os.path.exists(source):
                os.replace(source, os.path.join(folder, name))
            elif os.path.exists(os.path.join(folder, name)):
                os.unlink(os.path.join(folder, name))  # the remote has none any more
    finally:
        shutil.rmtree(incoming, ignore_errors=True)


def _write_meta(folder: str, meta: Dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".fetch.", suffix=".json", dir=folder)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=2, sort_keys=True)
        fh.write("\n")
    os.replace(tmp, os.path.join(folder, META))


def fetch_state(spec: EnvironmentSpec, target_path: str, *, warn: Optional[Warn] = None) -> str:
    """The local folder holding a URI environment's manifest.json (called on every use)."""
    return fetch(spec, target_path, warn=warn).local


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


def parse_pointer(raw: bytes) -> Dict[str, Any]:
    """The pointer document, checked: it is remote input, and its path may not leave the folder."""
    if len(raw) > POINTER_MAX_BYTES:
        raise ValueError(f"it is larger than {POINTER_MAX_BYTES // 1024} KB")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"not valid JSON: {str(exc).splitlines()[0][:120]}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("path"), str):
        raise ValueError("no version path in it")
    folder, _, name = doc["path"].partition("/")
    if folder != PUBLISHED_VERSIONS or not VERSION_NAME.match(name):
        raise ValueError(f"its version path {doc['path'][:80]!r} is not {PUBLISHED_VERSIONS}/<UTC time>-<invocation id>")
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


def follow_pointer(spec: EnvironmentSpec, target_path: str) -> EnvironmentSpec:
    """``spec`` with its state moved to the version folder its publish pointer names, if any."""
    root = pointer_root(spec.state)
    if root is None:
        return spec
    fs, path = _filesystem(spec.name, root + "/" + POINTER)
    where = _redact_for(spec, root + "/" + POINTER)
    try:
        doc = read_pointer(fs, path.rsplit("/", 1)[0])
    except ValueError as exc:
        raise ManifestError(
            f"dbt-defer: environment '{spec.name}': {where} is not a dbt-defer publish pointer ({exc}); "
            "publish again with dbt-defer publish, or delete it to read the folder's manifest.json"
        ) from None
    except Exception as exc:  # unreachable: go on with the version fetched last, if there is one
        cached = published_version(str((cached_meta(target_path, spec.name) or {}).get("uri") or ""))
        if cached is None:
            raise ManifestError(
                f"dbt-defer: environment '{spec.name}': cannot fetch {where} ({_redact_for(spec, _reason(exc))}) "
                "and there is no cached copy; check the URI, the network and credentials, then run dbt-defer fetch"
            ) from None
        doc = {"path": f"{PUBLISHED_VERSIONS}/{cached['version']}"}  # unreachable there too: the cache is used
    if doc is None:
        return spec
    return replace(spec, state=f"{root}/{doc['path']}")
