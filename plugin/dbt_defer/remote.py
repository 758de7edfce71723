"""Remote state (SPEC §8): an environment whose ``state`` is a URI, fetched through fsspec.

``file://``, ``http(s)://`` (needs aiohttp: ``pip install "dbt-defer[http]"``), ``s3://``
(``[s3]``: s3fs), ``gs://`` (``[gcs]``: gcsfs), or any other protocol fsspec knows, chained
URIs (``zip://manifest.json::s3://bucket/prod.zip``) included. A state URI names a folder
holding ``manifest.json`` or the manifest file itself; ``run_results.json`` beside it is
fetched too when present (URI forms: ``store``): only a clean not-found means there are none
(never when the publish pointer lists the file); any other error reading it fails the fetch
and keeps the cached pair.

On use (``fetch``), into the environment's local copy (``state_cache``):

- remote unchanged (same fingerprint) -> the cached copy, no download;
- remote changed or never fetched -> download (at most ``DBT_DEFER_MAX_STATE_MB`` per file,
  streamed, after any gzip decoding, within ``DBT_DEFER_FETCH_TIMEOUT`` for the whole fetch),
  verify (a dbt manifest this dbt can read, of this project, run results readable), then
  switch the cache's pointer;
- remote unreachable, missing or too slow -> the cached copy with one warning that states its
  age, or, with no cached copy, one ``ManifestError`` line naming the environment and the URI;
- remote content that is not this project's readable manifest -> one ``ManifestError`` line;
  the cached copy stays as it was.

A folder written by ``dbt-defer publish`` holds a pointer (``pointer``) naming its current
version folder; it is read first and the folder it names is fetched, so a reader gets one
run's pair even while a publisher writes the next version; each file must have the sha256 the
pointer lists.

Credentials and query strings of a state URI never leave this module unredacted (messages,
``fetch.json``, ``FetchResult.uri``): see ``config.redact``. Imports ``config``,
``manifests``, ``store``, ``state_cache`` and ``pointer``; nothing of the CLI; dbt is optional
(used only to check the manifest schema version and to log the fallback warning).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Optional, Tuple

from dbt_defer.config import EnvironmentSpec, redact
from dbt_defer.localfiles import sha256_of
from dbt_defer.manifests import MANIFEST, RUN_RESULTS, ManifestError, load_manifest, project_id_for
from dbt_defer.pointer import POINTER, PUBLISHED_VERSIONS, PointerError, pointer_root, published_version, read_pointer
from dbt_defer.state_cache import (
    INCOMING,
    age_text,
    cache_dir,
    cached_meta,
    current,
    expose,
    fingerprint,
    new_version,
    now,
    prune,
    sweep,
    trustworthy,
    uri_id,
    write_meta,
)
from dbt_defer.store import (
    MAX_STATE_ENV,
    Deadline,
    FetchTimeout,
    TooLarge,
    clean_not_found,
    download,
    fetch_timeout,
    filesystem,
    manifest_uri,
    max_state_bytes,
    reason,
    sibling,
)

Warn = Callable[[str], None]


@dataclass(frozen=True)
class FetchResult:
    env: str
    uri: str  # the manifest's URI, redacted (no credentials, no query string)
    local: str  # the cache folder holding manifest.json (+ run_results.json)
    action: str  # "downloaded" | "unchanged" | "cached (unreachable)"
    fetched_at: Optional[str]
    run_results: bool
    message: Optional[str] = None  # the warning, when the cached copy was used instead
    stable: Optional[str] = None  # the folder holding the version in use's manifest.json (dbt's --state)



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
        result = _fetch(spec, target_path, force, say, project_name)
    except ManifestError as exc:
        raise type(exc)(spec.redact(str(exc))) from None
    root = cache_dir(target_path, spec.name)
    try:
        return replace(result, stable=expose(root))
    except OSError as exc:  # the chain reads the version folder; only dbt's --state misses it
        say(f"dbt-defer: environment '{spec.name}': could not place manifest.json in {root} for dbt's "
            f"--state ({exc.strerror or exc}); make that folder writable and run dbt-defer fetch again")
        return result


def _fetch(
    spec: EnvironmentSpec, target_path: str, force: bool, warn: Warn, project_name: Optional[str]
) -> FetchResult:
    timeout = fetch_timeout()
    cap = max_state_bytes()
    deadline = Deadline(timeout)
    root = cache_dir(target_path, spec.name)
    meta, folder = current(root)
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
            f"in {folder} ({age_text(meta, folder)})"
        )
        warn(message)
        return FetchResult(
            spec.name, str(meta.get("uri") or shown), folder, "cached (unreachable)", meta.get("fetched_at"),
            os.path.isfile(os.path.join(folder, RUN_RESULTS)), message,
        )

    try:
        spec, published = _follow(spec, deadline, timeout)
    except _Unreachable as exc:
        return fallback(original.redact(f"{pointer_root(original.state)}/{POINTER}"), exc.reason)
    listed = published_files(published)  # name -> sha256 the publisher recorded (remote input, checked)
    uri = manifest_uri(spec.state)
    shown = original.redact(uri)
    same_uri = meta is not None and meta.get("uri_sha256", uri_id(str(meta.get("uri")))) == uri_id(uri)

    try:
        fs, path = deadline.run(lambda: filesystem(spec.name, uri, timeout))
        remote_fp = fingerprint(deadline.run(lambda: fs.info(path)))
    except ManifestError:
        raise
    except Exception as exc:  # unreachable, missing, denied, too slow: fsspec raises many kinds
        return fallback(shown, reason(exc))

    results_path = sibling(path, RUN_RESULTS)
    results_shown = sibling(shown, RUN_RESULTS)
    results_fp: Optional[Dict[str, str]]
    try:
        results_fp = fingerprint(deadline.run(lambda: fs.info(results_path)))
    except Exception as exc:
        # only a clean not-found means "no run results", and never when the pointer lists them;
        # denied, a server error, too slow: not "absent" (SPEC §7), the old pair is kept
        if not clean_not_found(exc):
            return fallback(results_shown, reason(exc))
        if RUN_RESULTS in listed:
            return fallback(results_shown, f"not found, though {POINTER} lists it")
        results_fp = None

    if (
        not force
        and same_uri
        and meta is not None
        and folder is not None
        and trustworthy(remote_fp)
        and meta.get("manifest") == remote_fp
        and meta.get("run_results") == results_fp
        and (results_fp is None or os.path.isfile(os.path.join(folder, RUN_RESULTS)))
    ):
        return FetchResult(spec.name, shown, folder, "unchanged", meta.get("fetched_at"), results_fp is not None)

    os.makedirs(root, exist_ok=True)
    sweep(root)
    incoming = tempfile.mkdtemp(prefix=f"{INCOMING}{os.getpid()}-", dir=root)
    try:
        try:
            download(deadline, fs, path, os.path.join(incoming, MANIFEST), cap)
            if results_fp is not None:
                try:
                    download(deadline, fs, results_path, os.path.join(incoming, RUN_RESULTS), cap)
                except (FetchTimeout, TooLarge):
                    raise
                except Exception as exc:
                    if not clean_not_found(exc):
                        return fallback(results_shown, reason(exc))
                    if RUN_RESULTS in listed:
                        return fallback(results_shown, f"not found, though {POINTER} lists it")
                    results_fp = None  # removed between info() and get(): a clean not-found
        except TooLarge as exc:
            which = shown if exc.path == path else sibling(shown, RUN_RESULTS)
            raise ManifestError(
                f"dbt-defer: environment '{spec.name}': {which} is {exc} after decoding "
                f"({MAX_STATE_ENV}); nothing was cached. Check what the store serves, or raise {MAX_STATE_ENV} "
                "if that environment's artifacts are really that large"
            ) from None
        except Exception as exc:
            return fallback(shown, reason(exc))
        _check_published(spec.name, incoming, shown, listed)
        _verify(spec.name, incoming, shown, project_name)
        version = new_version()
        os.replace(incoming, os.path.join(root, version))
        fetched_at = now()
        write_meta(root, {
            "version": version,
            "uri": shown,
            "uri_sha256": uri_id(uri),
            "state_sha256": uri_id(original.state),
            "fetched_at": fetched_at,
            "manifest": remote_fp,
            "run_results": results_fp,
        })
    finally:
        if os.path.isdir(incoming):
            shutil.rmtree(incoming, ignore_errors=True)
    previous = os.path.basename(folder) if folder is not None and folder != root else ""
    prune(root, (version, previous, str((current(root)[0] or {}).get("version"))))  # and a concurrent fetch's
    return FetchResult(
        spec.name, shown, os.path.join(root, version), "downloaded", fetched_at, results_fp is not None
    )


def published_files(doc: Optional[Dict[str, Any]]) -> Dict[str, str]:
    """manifest.json / run_results.json -> the sha256 a publish pointer lists for it (checked by
    ``pointer.parse_pointer``); empty without a pointer."""
    files = (doc or {}).get("files") or {}
    return {name: entry["sha256"] for name, entry in files.items() if name in (MANIFEST, RUN_RESULTS)}


def _check_published(env_name: str, incoming: str, shown: str, listed: Dict[str, str]) -> None:
    """Each downloaded file the pointer lists has the sha256 the publisher recorded; anything
    else (a file changed or truncated after publishing) is one line, and the cache is kept."""
    for name, expected in sorted(listed.items()):
        local = os.path.join(incoming, name)
        if os.path.isfile(local) and sha256_of(local) != expected:
            raise ManifestError(
                f"dbt-defer: environment '{env_name}': {sibling(shown, name)} does not match the sha256 its "
                f"{POINTER} lists (changed after it was published); the cached copy was kept; publish that "
                "environment's artifacts again"
            )


def _same_state(meta: Dict[str, Any], state: str) -> bool:
    """Was this cached copy fetched for this state (or, for a publish pointer, its versions)?"""
    if "state_sha256" in meta:
        return meta["state_sha256"] == uri_id(state)
    cached = str(meta.get("uri") or "")  # a cache written before versioned folders: its raw URI
    root = pointer_root(state)
    if root is not None and published_version(cached) is not None:
        return cached.startswith(root + "/" + PUBLISHED_VERSIONS + "/")
    return cached == manifest_uri(state)


def _verify(env_name: str, incoming: str, shown: str, project_name: Optional[str]) -> None:
    """The downloaded pair is this project's manifest that this dbt reads (+ readable run
    results); anything else is one line, and nothing in the cache is replaced."""
    local_manifest = os.path.join(incoming, MANIFEST)
    results_shown = sibling(shown, RUN_RESULTS)
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


def fetched_form(spec: EnvironmentSpec) -> Optional[EnvironmentSpec]:
    """The spec to fetch for an environment: a URI state as it is; a local folder that
    ``dbt-defer publish`` wrote (it holds the pointer, ``latest.json``; or the pointer itself)
    as its ``file://`` form, so it is read through the pointer into the cache exactly like that
    form; None for any other local state (read where it is)."""
    if spec.is_uri:
        return spec
    state = spec.state
    if "\0" in state:
        return None
    folder = os.path.dirname(state) if os.path.basename(state) == POINTER else state
    if not os.path.isfile(os.path.join(folder, POINTER)):
        return None
    return replace(spec, state="file://" + os.path.abspath(folder).replace(os.sep, "/"))


def fetch_state(
    spec: EnvironmentSpec, target_path: str, *, warn: Optional[Warn] = None, project_name: Optional[str] = None
) -> str:
    """The local folder holding a URI environment's manifest.json (called on every use)."""
    return fetch(spec, target_path, warn=warn, project_name=project_name).local


def _redact_for(spec: EnvironmentSpec, text: str) -> str:
    redact = getattr(spec, "redact", None)
    return redact(text) if callable(redact) else text


def _follow_pointer(spec: EnvironmentSpec, deadline: Deadline, timeout: float) -> EnvironmentSpec:
    return _follow(spec, deadline, timeout)[0]


def _follow(
    spec: EnvironmentSpec, deadline: Deadline, timeout: float
) -> Tuple[EnvironmentSpec, Optional[Dict[str, Any]]]:
    """(``spec`` with its state moved to the version folder its publish pointer names, the
    pointer), or (``spec``, None) without a pointer.
    _Unreachable: the pointer could not be read (the caller falls back to the cache)."""
    root = pointer_root(spec.state)
    if root is None:
        return spec, None
    try:
        fs, path = deadline.run(lambda: filesystem(spec.name, root + "/" + POINTER, timeout))
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
        raise _Unreachable(reason(exc)) from None
    if doc is None:
        return spec, None
    return replace(spec, state=f"{root}/{doc['path']}"), doc


def follow_pointer(spec: EnvironmentSpec, target_path: str) -> EnvironmentSpec:
    """``spec`` with its state moved to the version folder its publish pointer names, if any
    (unreachable: the version fetched last, or one ManifestError line when there is none)."""
    timeout = fetch_timeout()
    try:
        return _follow_pointer(spec, Deadline(timeout), timeout)
    except _Unreachable as exc:
        cached = published_version(str((cached_meta(target_path, spec.name) or {}).get("uri") or ""))
        if cached is None:
            where = _redact_for(spec, str(pointer_root(spec.state)) + "/" + POINTER)
            raise ManifestError(
                f"dbt-defer: environment '{spec.name}': cannot fetch {where} ({_redact_for(spec, exc.reason)}) "
                "and there is no cached copy; check the URI, the network and credentials, then run dbt-defer fetch"
            ) from None
        return replace(spec, state=f"{pointer_root(spec.state)}/{PUBLISHED_VERSIONS}/{cached['version']}")
