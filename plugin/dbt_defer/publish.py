"""``dbt-defer publish`` (SPEC §8): a production or staging run's artifacts, as one version.

Store layout under the publish URI (any fsspec store that writes: ``file://``, ``s3://``,
``gs://``, ...)::

    URI/latest.json                                   the pointer: which version is current
    URI/versions/<UTC time>-<invocation id>/manifest.json
    URI/versions/<UTC time>-<invocation id>/run_results.json

Order of writes: both files into a new version folder (never written again), then the pointer
(one object, replaced at once: a single PUT on object stores, write-then-rename elsewhere), then
pruning of old version folders. Concurrent publishers (SPEC §7): the pointer is replaced only if
it is still what this publisher read (``pointer.write_pointer``; on a conflict it reads and
decides again), a run whose manifest is older (``generated_at``) than the one the pointer names
is not published, and an upload named before the pointer's version is uploaded again under a
later name before the pointer names it (a prune that read that pointer may remove it). A reader (remote.py) reads the pointer, then the folder it
names, so it sees the old pair or the new pair, never a mix; a publisher killed before the
pointer moves leaves an unreferenced folder that readers never see and a later prune removes.

Before anything is written the artifacts are checked: a manifest this dbt can read, of this
project, and run results of the same dbt invocation (``metadata.invocation_id``). What dbt wrote
of ``--vars`` and the command line into run_results.json ``args`` is uploaded with the secrets of
URIs in it as ``***`` (``redact_run_results``).

Owns checking the artifacts and the order of the writes. The layout of the published folder
(pointer, version names, pruning) is ``pointer``; reaching the store is ``store``. Imports
``config``, ``manifests``, ``pointer`` and ``store``; nothing imports it but the CLI.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Dict, List, Optional, Tuple

import msgspec

from dbt_defer.config import redact, uri_secrets
from dbt_defer.localfiles import sha256_of
from dbt_defer.manifests import (
    BAD_STATUSES,
    MANIFEST,
    RUN_RESULTS,
    LoadedManifest,
    ManifestError,
    ahead_hours,
    load_manifest,
    parse_timestamp,
    project_id_for,
)
from dbt_defer.pointer import (
    POINTER,
    PUBLISHED_VERSIONS,
    VERSION_NAME,
    PointerConflict,
    current_pointer,
    exists,
    is_object_store,
    prune,
    read_pointer_state,
    version_name,
    write_pointer,
)
from dbt_defer.store import filesystem, reason

DEFAULT_KEEP = 10
POINTER_FORMAT = 1


class PublishError(RuntimeError):
    """One clear line: what was not published, where, and the fix."""


# --- the artifacts -------------------------------------------------------------------------


class _ResultsMeta(msgspec.Struct):
    invocation_id: Optional[str] = None
    generated_at: Optional[str] = None
    dbt_version: Optional[str] = None


class _Result(msgspec.Struct):
    unique_id: str = ""
    status: Optional[str] = None


class _Args(msgspec.Struct):
    which: Optional[str] = None
    target: Optional[str] = None


class _RunResults(msgspec.Struct):
    metadata: Optional[_ResultsMeta] = None
    results: List[_Result] = msgspec.field(default_factory=list)
    args: Optional[_Args] = None


@dataclass(frozen=True)
class Artifacts:
    folder: str
    manifest: LoadedManifest
    invocation_id: str
    command: Optional[str]  # run, build, ... (run_results args.which)
    target: Optional[str]  # the --target of the run, when it was given
    results: int
    failed: Dict[str, str] = field(default_factory=dict)  # unique_id -> error/fail/skipped/...
    # run_results.json as it is uploaded when its args held secrets (redacted), else None
    run_results_redacted: Optional[bytes] = None
    redacted: int = 0  # how many values of args (vars, invocation_command) were redacted

    @property
    def manifest_path(self) -> str:
        return os.path.join(self.folder, MANIFEST)

    @property
    def run_results_path(self) -> str:
        return os.path.join(self.folder, RUN_RESULTS)


def check_artifacts(folder: str, project_name: Optional[str], *, is_compatible=None) -> Artifacts:
    """The run's manifest.json + run_results.json in ``folder``, verified; or PublishError."""
    manifest_path = os.path.join(folder, MANIFEST)
    results_path = os.path.join(folder, RUN_RESULTS)
    for path in (manifest_path, results_path):
        if not os.path.isfile(path):
            raise PublishError(
                f"dbt-defer: nothing published: {path} does not exist; run dbt (build or run) first, "
                "then publish from the same target path (--target-path)"
            )
    try:
        manifest = load_manifest("publish", manifest_path, is_compatible=is_compatible)
    except ManifestError as exc:
        text = str(exc).replace("environment 'publish': ", "")
        raise PublishError(text.replace("dbt-defer: ", "dbt-defer: nothing published: ", 1)) from None
    if project_name:
        other = manifest.project_name or (
            f"project_id {manifest.project_id}" if manifest.project_id else None
        )
        same = (
            manifest.project_name == project_name
            if manifest.project_name
            else (manifest.project_id is None or manifest.project_id == project_id_for(project_name))
        )
        if not same:
            raise PublishError(
                f"dbt-defer: nothing published: {manifest_path} is a manifest of project {other!r}, not of "
                f"{project_name!r}; publish from this project's target path"
            )
    try:
        with open(results_path, "rb") as fh:
            results = msgspec.json.decode(fh.read(), type=_RunResults)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        detail = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise PublishError(
            f"dbt-defer: nothing published: {results_path} is not a dbt run_results.json ({detail}); "
            "run dbt again to rewrite it"
        ) from None
    invocation = manifest.invocation_id
    theirs = results.metadata.invocation_id if results.metadata else None
    if not invocation or invocation != theirs:
        raise PublishError(
            f"dbt-defer: nothing published: {manifest_path} (invocation {invocation or 'unknown'}) and "
            f"{results_path} (invocation {theirs or 'unknown'}) come from different dbt commands; publish "
            "right after the dbt run or build whose results you want readers to see"
        )
    failed = {
        r.unique_id: r.status for r in results.results if r.status and r.status.lower() in BAD_STATUSES
    }
    args = results.args or _Args()
    uploaded, count = redact_run_results(results_path)
    return Artifacts(folder, manifest, invocation, args.which, args.target, len(results.results), failed,
                     uploaded, count)


def _strings(value: Any) -> List[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _redact_strings(value: Any, secrets: Tuple[str, ...], counter: List[int]) -> Any:
    if isinstance(value, str):
        shown = redact(value, secrets)
        if shown != value:
            counter[0] += 1
        return shown
    if isinstance(value, dict):
        return {k: _redact_strings(v, secrets, counter) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_strings(v, secrets, counter) for v in value]
    return value


def redact_run_results(path: str) -> Tuple[Optional[bytes], int]:
    """run_results.json's ``args`` (``vars``, ``invocation_command``, every other string in it)
    with the credentials, query strings and fragments of URIs rendered ``***`` (the rules of
    ``config.redact``, also where a URI's secret is repeated without the URI): what dbt wrote of
    ``--vars`` is uploaded for every reader. (the bytes to upload, how many values changed);
    (None, 0) when nothing in ``args`` is secret."""
    with open(path, "rb") as fh:
        doc = msgspec.json.decode(fh.read())
    if not isinstance(doc, dict) or not isinstance(doc.get("args"), dict):
        return None, 0
    secrets = tuple(sorted(
        {secret for text in _strings(doc["args"]) for word in text.split() for secret in _uri_secrets_in(word)},
        key=len, reverse=True,
    ))
    counter = [0]
    args = _redact_strings(doc["args"], secrets, counter)
    if not counter[0]:
        return None, 0
    doc["args"] = args
    return msgspec.json.encode(doc), counter[0]


def _uri_secrets_in(word: str) -> Tuple[str, ...]:
    """The secret parts of a URI inside one word of text (quotes and JSON punctuation around it)."""
    start = word.find("://")
    if start < 0:
        return ()
    begin = start
    while begin > 0 and (word[begin - 1].isalnum() or word[begin - 1] in "+.-"):
        begin -= 1
    return uri_secrets(word[begin:].rstrip("'\",}]);"))


# --- the store -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Published:
    uri: str  # the publish root, as given (shown redacted)
    version: str  # the version folder's name
    version_uri: str
    pointer: Dict[str, Any]
    kept: List[str]
    removed: List[str]
    prune_problem: Optional[str] = None
    already: bool = False  # the pointer named this invocation already: nothing uploaded


def shown(uri: str) -> str:
    """A URI as it may be printed: no user, password or query string (they may hold secrets)."""
    return redact(uri, uri_secrets(uri))


def _open_store(uri: str) -> Tuple[Any, str, str]:
    """(filesystem, root path inside it, root URI without a trailing slash)."""
    root_uri = uri.rstrip("/")
    if "?" in uri or "#" in uri:
        raise PublishError(
            f"dbt-defer: nothing published: {shown(uri)} has a query string or a fragment; publish to a folder URI "
            "(s3://bucket/prefix, gs://bucket/prefix, file:///path) and give credentials in the environment"
        )
    if root_uri.lower().endswith(".json"):
        raise PublishError(
            f"dbt-defer: nothing published: {shown(uri)} names a file; publish to the folder that readers "
            "set as the state (e.g. s3://bucket/dbt/prod)"
        )
    try:
        fs, path = filesystem("publish", root_uri + "/" + POINTER)
    except ManifestError as exc:
        text = str(exc).replace("environment 'publish': cannot read", "cannot publish to")
        raise PublishError(text.replace("environment 'publish': state", "nothing published:", 1)) from None
    return fs, path.rsplit("/", 1)[0], root_uri


def publish(
    uri: str,
    artifacts: Artifacts,
    *,
    env: Optional[str] = None,
    keep: int = DEFAULT_KEEP,
    now: Optional[datetime] = None,
) -> Published:
    """Upload ``artifacts`` as a new version under ``uri``, move the pointer to it, prune."""
    if keep < 1:
        raise PublishError(f"dbt-defer: nothing published: --keep {keep}; keep at least 1 version")
    fs, root, root_uri = _open_store(uri)
    where = shown(root_uri)
    try:
        previous = current_pointer(fs, root)
    except Exception as exc:
        raise PublishError(
            f"dbt-defer: nothing published: cannot read {where}/{POINTER} ({reason(exc)}); check "
            "the URI, the network and credentials"
        ) from None
    manifest = artifacts.manifest
    if (
        previous
        and previous.get("invocation_id") == artifacts.invocation_id
        and exists(fs, f"{root}/{previous['path']}/{MANIFEST}")
    ):
        return _finish(uri, fs, root, root_uri, previous, keep, already=True)

    _refuse_older(where, previous, manifest.generated_at, artifacts.invocation_id, "nothing published")
    when = now or datetime.now(timezone.utc)
    name = version_name(when, artifacts.invocation_id)
    files = _upload(fs, root, where, name, artifacts)

    # Move the pointer only if it is still what was read just before (another publisher may
    # move it meanwhile): read, decide, write conditionally; on a conflict read and decide again.
    for _ in range(_ATTEMPTS):
        try:
            state = read_pointer_state(fs, root)
        except Exception as exc:
            _discard(fs, root, name)
            raise PublishError(
                f"dbt-defer: not published: cannot read {where}/{POINTER} ({reason(exc)}); readers still see "
                "the previous version; check the URI, the network and credentials, then publish again"
            ) from None
        current = state.doc
        if current and current.get("invocation_id") == artifacts.invocation_id and current["path"] != (
            f"{PUBLISHED_VERSIONS}/{name}"
        ) and exists(fs, f"{root}/{current['path']}/{MANIFEST}"):
            _discard(fs, root, name)  # a concurrent publish of this same run won
            return _finish(uri, fs, root, root_uri, current, keep, already=True)
        try:
            _refuse_older(where, current, manifest.generated_at, artifacts.invocation_id, "not published")
        except PublishError:
            _discard(fs, root, name)
            raise
        named = str(current["path"]).rsplit("/", 1)[-1] if current else ""
        if named and named >= name:
            # the pointer names a version newer than this upload: a prune that read that pointer
            # may remove this one, so upload again under a name after it before pointing at it
            _discard(fs, root, name)
            name = version_name(_after(named, datetime.now(timezone.utc)), artifacts.invocation_id)
            files = _upload(fs, root, where, name, artifacts)
        rel = f"{PUBLISHED_VERSIONS}/{name}"
        pointer = {
            "format": POINTER_FORMAT,
            "path": rel,
            "version": name,
            "invocation_id": artifacts.invocation_id,
            "generated_at": manifest.generated_at,
            "dbt_version": manifest.dbt_version,
            "project_name": manifest.project_name,
            "env": env,
            "command": artifacts.command,
            "target": artifacts.target,
            "results": artifacts.results,
            "failed_nodes": len(artifacts.failed),
            "published_at": when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "previous": (current or {}).get("version"),
            "files": files,
        }
        try:
            write_pointer(fs, root, pointer, expected=state)
        except PointerConflict:
            continue
        except Exception as exc:
            raise PublishError(
                f"dbt-defer: not published: uploaded {where}/{rel} but cannot write {where}/{POINTER} "
                f"({reason(exc)}); readers still see the previous version; check write credentials and publish again"
            ) from None
        return _finish(uri, fs, root, root_uri, pointer, keep)
    _discard(fs, root, name)
    raise PublishError(
        f"dbt-defer: not published: {where}/{POINTER} changed {_ATTEMPTS} times while this run was being "
        "published (other publishers at the same time); readers see the newest of theirs; publish again"
    )


_ATTEMPTS = 5


def _finish(uri: str, fs: Any, root: str, root_uri: str, pointer: Dict[str, Any], keep: int,
            already: bool = False) -> Published:
    name = str(pointer.get("version") or pointer["path"].rsplit("/", 1)[-1])
    try:
        kept, removed = prune(fs, root, keep, name)
        problem = None
    except Exception as exc:
        kept, removed, problem = [], [], reason(exc)
    return Published(uri, name, f"{root_uri}/{pointer['path']}", pointer, kept, removed, problem, already)


def _refuse_older(where: str, current: Optional[Dict[str, Any]], generated_at: str, invocation: str,
                  what: str) -> None:
    """An older run (by its manifest's generated_at) never replaces a newer one (SPEC §7)."""
    if not current or current.get("invocation_id") == invocation:
        return
    theirs = parse_timestamp(str(current.get("generated_at") or ""))
    ours = parse_timestamp(generated_at or "")
    if ahead_hours(theirs) is not None:
        return  # dated in the future (a wrong clock): it may not block every later run
    if theirs is not None and ours is not None and theirs > ours:
        raise PublishError(
            f"dbt-defer: {what}: {where}/{POINTER} names a newer run (invocation "
            f"{current.get('invocation_id')}, manifest generated_at {current.get('generated_at')}) than this "
            f"one (generated_at {generated_at}); readers keep the newer run; publish the artifacts of a later run"
        )


def _after(named: str, when: datetime) -> datetime:
    """``when``, or just after the time in a version name when that is later (clock skew)."""
    match = VERSION_NAME.match(named)
    if not match:
        return when
    stamp = match.group("time")
    then = datetime.strptime(stamp, "%Y%m%dT%H%M%S%fZ" if len(stamp) > 16 else "%Y%m%dT%H%M%SZ")
    then = then.replace(tzinfo=timezone.utc) + timedelta(microseconds=1)
    return max(when, then)


def _discard(fs: Any, root: str, name: str) -> None:
    """Remove this publish's own version folder (never pointed at); a failure leaves it to prune."""
    try:
        fs.rm(f"{root}/{PUBLISHED_VERSIONS}/{name}", recursive=True)
    except Exception:
        pass


def _upload(fs: Any, root: str, where: str, name: str, artifacts: Artifacts) -> Dict[str, Dict[str, Any]]:
    """Both files into a new version folder; (file name -> size and sha256 of what was uploaded)."""
    rel = f"{PUBLISHED_VERSIONS}/{name}"
    folder = f"{root}/{rel}"
    files = {}
    try:
        if not is_object_store(fs):
            fs.makedirs(folder, exist_ok=True)
        for filename, local in ((MANIFEST, artifacts.manifest_path), (RUN_RESULTS, artifacts.run_results_path)):
            data = artifacts.run_results_redacted if filename == RUN_RESULTS else None
            if data is not None:  # its args held secrets: the redacted copy is what readers get
                fs.pipe_file(f"{folder}/{filename}", data)
                size, digest = len(data), hashlib.sha256(data).hexdigest()
            else:
                fs.put_file(local, f"{folder}/{filename}")
                size, digest = os.path.getsize(local), sha256_of(local)
            try:
                fs.invalidate_cache(f"{folder}/{filename}")
            except Exception:
                pass
            uploaded = fs.info(f"{folder}/{filename}").get("size")
            if uploaded is not None and int(uploaded) != size:
                raise OSError(f"{filename} has {uploaded} bytes there, {size} here")
            files[filename] = {"size": size, "sha256": digest}
    except NotImplementedError:
        raise PublishError(
            f"dbt-defer: nothing published: {where} cannot be written through fsspec (read-only store); "
            "publish to s3://, gs:// or file:// and serve that to readers"
        ) from None
    except Exception as exc:
        raise PublishError(
            f"dbt-defer: nothing published: cannot upload to {where}/{rel} ({reason(exc)}); check the URI "
            "and write credentials (readers still see the previous version)"
        ) from None
    return files
