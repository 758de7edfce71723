"""Reading an environment's artifacts: manifest.json (+ run_results.json when present).

Only the fields deferral needs are decoded (msgspec skips the rest without building it), and
parsed manifests are cached in-process by (path, mtime, size). Every problem becomes one
``ManifestError`` line naming the environment, the path, what is wrong and the fix.

Imports ``config`` and ``untrusted`` (the error, the name rule, bounded reads): it reads
untrusted files and knows nothing of chains, dbt's live objects or the warehouse.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Dict, FrozenSet, Optional, Tuple

import msgspec

from dbt_defer.artifact_schema import DECODE_CONFIG, DECODE_MANIFEST, DECODE_METADATA_ONLY, DECODE_RESULTS
from dbt_defer.config import gc_paused, one_line
from dbt_defer.untrusted import (MANIFEST, PLAIN_NAME, ManifestError, limit_bytes, read_bounded,
                                 reject_nul, unsafe_name, unusable_reason)

RUN_RESULTS = "run_results.json"
REFABLE = frozenset({"model", "seed", "snapshot"})
# other nodes whose relations an environment records (the write guard protects them too):
# a test's stored failures (dbt test/build --store-failures), and sources (raw data)
OWNS_RELATION = frozenset({"test"})
# statuses in run_results.json that mean "this node's relation is not trustworthy there"
BAD_STATUSES = frozenset({"error", "fail", "skipped", "runtime error"})
# statuses that mean "this run built the node" (models, seeds, snapshots: success; tests: pass)
BUILT_STATUSES = frozenset({"success", "pass"})


# --- what the rest of the package sees ------------------------------------------------------


@dataclass(frozen=True)
class EnvNode:
    unique_id: str
    resource_type: str
    database: Optional[str]
    schema: Optional[str]
    identifier: str
    materialized: Optional[str]
    checksum: str
    unrendered_config: Dict[str, Any]
    # the node's record as dbt's deferral copies it (``artifact_schema._Node``: relation_name,
    # and description, compiled_code, meta, tags, config still encoded); None for hand-made nodes
    record: Any = None

    @property
    def location(self) -> Tuple[Optional[str], Optional[str], str]:
        return (self.database, self.schema, self.identifier)


@dataclass(frozen=True)
class LoadedManifest:
    path: str
    schema_version: str
    dbt_version: str
    generated_at: str
    invocation_id: Optional[str]
    project_name: Optional[str]
    project_id: Optional[str]
    adapter_type: Optional[str]
    nodes: Dict[str, EnvNode]
    node_count: int  # all nodes in the manifest, refable or not
    bad_status: Dict[str, str] = field(default_factory=dict)  # unique_id -> status in run_results
    built: FrozenSet[str] = frozenset()  # unique_ids run_results records as built (success/pass)
    run_results_path: Optional[str] = None  # None: no run_results.json beside the manifest
    # every relation the environment records, refable or not (tests' stored failures, sources,
    # functions):
    # (database, schema, identifier) -> unique_id; what the write guard protects
    relations: Dict[Tuple[Optional[str], Optional[str], str], str] = field(default_factory=dict)
    functions: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # unique_id -> as in the manifest
    # unique_id -> execution_time (seconds) of the nodes run_results records as built
    build_seconds: Dict[str, float] = field(default_factory=dict)
    # unique_id -> the one line saying why this environment's record of the node (model, seed,
    # snapshot, function) is not used: a database/schema/identifier that cannot be a SQL name
    unusable: Dict[str, str] = field(default_factory=dict)
    packages: FrozenSet[str] = frozenset()  # package names of the manifest's nodes
    # (database, schema) of every refable, non-ephemeral node; None: not known (built elsewhere)
    schemas: Optional[FrozenSet[Tuple[Optional[str], Optional[str]]]] = None

    def unusable_line(self, env_name: str, unique_id: str) -> str:
        """The one line saying why ``env_name``'s record of ``unique_id`` is not used."""
        return f"dbt-defer: environment '{env_name}': {self.unusable[unique_id]}"

    def generated_datetime(self) -> Optional[datetime]:
        return parse_timestamp(self.generated_at)

    def ahead_hours(self, now: Optional[datetime] = None) -> Optional[float]:
        """Hours generated_at is in the future (beyond the allowed clock skew), else None."""
        return ahead_hours(self.generated_datetime(), now)

    def age_hours(self, now: Optional[datetime] = None) -> Optional[float]:
        generated = self.generated_datetime()
        if generated is None:
            return None
        now = now or datetime.now(timezone.utc)
        return max(0.0, (now - generated).total_seconds() / 3600.0)


FUTURE_SKEW_MINUTES = 5.0  # clocks of two machines may differ this much; more ahead of now warns


def ahead_hours(generated: Optional[datetime], now: Optional[datetime] = None) -> Optional[float]:
    """How far ``generated`` is ahead of now, in hours, when that is more than the clock skew
    allowed (FUTURE_SKEW_MINUTES); None otherwise."""
    if generated is None:
        return None
    ahead = (generated - (now or datetime.now(timezone.utc))).total_seconds() / 3600.0
    return ahead if ahead * 60.0 > FUTURE_SKEW_MINUTES else None


def parse_timestamp(value: str) -> Optional[datetime]:
    if not value or not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed


def format_age(hours: float) -> str:
    """'12 min' / '5.0 hours' / '3.2 days (77 hours)': an age as a person reads it."""
    if hours < 1:
        return f"{hours * 60:.0f} min"
    if hours < 48:
        return f"{hours:.1f} hours"
    return f"{hours / 24:.1f} days ({hours:.0f} hours)"


def project_id_for(project_name: str) -> str:
    """dbt's metadata.project_id: md5 of the project name."""
    return hashlib.md5(project_name.encode("utf-8")).hexdigest()


def manifest_path_for(env_name: str, state: str) -> str:
    """A state is a folder holding manifest.json, or the manifest file itself."""
    if os.path.isdir(state):
        return os.path.join(state, MANIFEST)
    if os.path.exists(state) or state.endswith(".json"):
        return state
    reject_nul(env_name, state)
    raise ManifestError(
        f"dbt-defer: environment '{env_name}': state location {state} does not exist; "
        f"point it at a folder holding {MANIFEST} (or at the file itself), or unset it to skip the environment"
    )


_CACHE: Dict[Tuple[str, int, int, Optional[Tuple[int, int]], int], LoadedManifest] = {}
_CACHE_LOCK = threading.Lock()


def _stat_key(path: str) -> Optional[Tuple[int, int]]:
    try:
        st = os.stat(path)
    except (OSError, ValueError):  # ValueError: an embedded NUL character
        return None
    return (st.st_mtime_ns, st.st_size)


def load_manifest(env_name: str, path: str, *, is_compatible=None, max_bytes: Optional[int] = None) -> LoadedManifest:
    """Load one environment's manifest (+ run_results.json beside it), cached by path+mtime+size.

    ``is_compatible(schema_version) -> bool`` is dbt's own check of the manifest schema version.
    ``max_bytes``: the largest file read (default: DBT_DEFER_MAX_STATE_MB).
    """
    if max_bytes is None:
        max_bytes = limit_bytes(env_name)
    path = os.path.abspath(path)
    reject_nul(env_name, path)
    stat = _stat_key(path)
    if stat is None:
        raise ManifestError(
            f"dbt-defer: environment '{env_name}': {path} does not exist; "
            f"copy that environment's {MANIFEST} there (e.g. from its last production run) or fix the path"
        )
    results_path = os.path.join(os.path.dirname(path), RUN_RESULTS)
    key = (path, stat[0], stat[1], _stat_key(results_path), max_bytes)
    with _CACHE_LOCK:
        cached = _CACHE.get(key)
    if cached is None:
        with gc_paused():
            cached = _read(env_name, path, results_path if key[3] else None, is_compatible, max_bytes)
        with _CACHE_LOCK:
            if len(_CACHE) >= 16:  # a handful of environments per process; never grow unbounded
                _CACHE.clear()
            _CACHE[key] = cached
    if is_compatible is not None and not is_compatible(cached.schema_version):
        raise _version_error(env_name, path, cached.schema_version, cached.dbt_version)
    return cached


def _version_error(env_name: str, path: str, schema_version: Any, dbt_version: Any) -> ManifestError:
    def plain(value: Any, default: str) -> str:  # the file's own text: one line, bounded
        return " ".join(str(value).split())[:80] or default if value else default

    return ManifestError(
        f"dbt-defer: environment '{env_name}': {path} has schema {plain(schema_version, '(none)')} "
        f"(written by dbt {plain(dbt_version, 'unknown')}), which this dbt cannot read; "
        "regenerate it with this dbt version (dbt parse, or a run in that environment)"
    )


def _not_a_manifest(env_name: str, path: str, what: str) -> ManifestError:
    return ManifestError(
        f"dbt-defer: environment '{env_name}': {path} is JSON but not a dbt manifest ({what}); "
        f"point the environment at the {MANIFEST} that dbt writes into target/"
    )


def _explain_invalid(env_name: str, path: str, raw: bytes, detail: str, is_compatible) -> ManifestError:
    """The full decode failed on a JSON document: a manifest of another dbt version, or not one."""
    try:
        meta = DECODE_METADATA_ONLY.decode(raw).metadata
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        meta = None
    version = meta.get("dbt_schema_version") if isinstance(meta, dict) else None
    if isinstance(version, str) and "/manifest/" in version:
        if is_compatible is not None and not is_compatible(version):
            return _version_error(env_name, path, version, meta.get("dbt_version"))
        return _not_a_manifest(env_name, path, detail)
    if isinstance(version, str) and version:
        return _not_a_manifest(env_name, path, f"metadata.dbt_schema_version is {version}")
    return _not_a_manifest(env_name, path, detail)


def _read(env_name: str, path: str, results_path: Optional[str], is_compatible, max_bytes: int) -> LoadedManifest:
    raw = read_bounded(env_name, path, max_bytes, "check the file's permissions or point the environment elsewhere")
    try:
        parsed = DECODE_MANIFEST.decode(raw)
    except msgspec.ValidationError as exc:
        raise _explain_invalid(env_name, path, raw, one_line(exc, pick='all', limit=200), is_compatible) from None
    except RecursionError:
        raise _not_a_manifest(env_name, path, "it is nested too deeply") from None
    except msgspec.DecodeError as exc:
        raise ManifestError(
            f"dbt-defer: environment '{env_name}': {path} is not valid JSON ({one_line(exc, pick='all', limit=200)}); "
            f"it may be truncated or not a manifest at all — copy that environment's {MANIFEST} again"
        ) from None
    meta = parsed.metadata
    if meta is None:
        raise _not_a_manifest(env_name, path, "it has no metadata")
    if "/manifest/" not in meta.dbt_schema_version:
        raise _not_a_manifest(env_name, path, f"metadata.dbt_schema_version is {meta.dbt_schema_version or 'missing'}")
    if is_compatible is not None and not is_compatible(meta.dbt_schema_version):
        raise _version_error(env_name, path, meta.dbt_schema_version, meta.dbt_version)
    if parsed.nodes is None:
        raise _not_a_manifest(env_name, path, "it has no nodes")
    nodes: Dict[str, EnvNode] = {}
    unusable: Dict[str, str] = {}
    relations: Dict[Tuple[Optional[str], Optional[str], str], str] = {}
    safe_schemas: Dict[Tuple[Optional[str], Optional[str]], bool] = {}
    for uid, n in (parsed.sources or {}).items():
        relations.setdefault((n.database, n.schema, n.identifier or n.name), uid)
    for uid, n in parsed.nodes.items():
        if n.resource_type not in REFABLE and n.resource_type not in OWNS_RELATION:
            continue
        try:
            config = DECODE_CONFIG.decode(n.config)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
            raise _not_a_manifest(env_name, path, f"{uid}: config {one_line(exc, pick='all', limit=120)}") from None
        if n.resource_type in OWNS_RELATION and config.enabled and (n.alias or n.name):
            relations.setdefault((n.database, n.schema, n.alias or n.name), uid)
        if n.resource_type not in REFABLE or not config.enabled:
            continue
        if config.materialized != "ephemeral":
            relations[(n.database, n.schema, n.alias or n.name)] = uid
            # the names checked as unusable_reason does, a (database, schema) once (few per manifest)
            names_ok = safe_schemas.get((n.database, n.schema))
            if names_ok is None:
                names_ok = safe_schemas[(n.database, n.schema)] = (
                    unsafe_name(n.database) is None and unsafe_name(n.schema) is None)
            identifier = n.alias or n.name
            # unsafe_name's common case inline (every node of every manifest)
            if not names_ok or not (isinstance(identifier, str) and PLAIN_NAME.match(identifier)) \
                    and unsafe_name(identifier) is not None:
                line = unusable_reason(
                    path, uid, {"database": n.database, "schema": n.schema, "identifier": n.alias or n.name}
                )
                if line:
                    unusable[uid] = line
        nodes[uid] = EnvNode(
            unique_id=uid,
            resource_type=n.resource_type,
            database=n.database,
            schema=n.schema,
            identifier=n.alias or n.name,
            materialized=config.materialized,
            checksum=n.checksum.checksum,
            unrendered_config=n.unrendered_config,
            record=n,
        )
    functions: Dict[str, Dict[str, Any]] = {}
    for uid, raw_function in (parsed.functions or {}).items():
        location = _function_location(raw_function)
        if location is not None:  # the write guard protects functions like any relation
            relations.setdefault(location, uid)
        line = unusable_reason(path, uid, {
            key: raw_function.get(key) if isinstance(raw_function, dict) else raw_function
            for key in ("database", "schema", "alias")
        })
        if line:
            unusable[uid] = line  # a function a SQL name cannot call: never deferred to
        else:
            functions[uid] = raw_function
    bad: Dict[str, str] = {}
    seconds: Dict[str, float] = {}
    if results_path:
        bad, seconds = _read_run_results(env_name, results_path, max_bytes)
    built = frozenset(seconds)
    return LoadedManifest(
        path=path,
        schema_version=meta.dbt_schema_version,
        dbt_version=meta.dbt_version,
        generated_at=meta.generated_at,
        invocation_id=meta.invocation_id,
        project_name=meta.project_name,
        project_id=meta.project_id,
        adapter_type=meta.adapter_type,
        nodes=nodes,
        node_count=len(parsed.nodes),
        bad_status=bad,
        built=built,
        run_results_path=results_path,
        relations=relations,
        functions=functions,
        build_seconds=seconds,
        unusable=unusable,
        schemas=frozenset(safe_schemas),
        packages=frozenset({n.package_name or uid.split(".")[1] for uid, n in parsed.nodes.items() if uid.count(".") >= 2}),
    )


def _function_location(raw: Any) -> Optional[Tuple[Optional[str], Optional[str], str]]:
    """(database, schema, name) of a function as the manifest records it; None when its fields
    are not names at all (untrusted input: never compared as anything but text)."""
    if not isinstance(raw, dict):
        return None
    database, schema = raw.get("database"), raw.get("schema")
    name = raw.get("alias") or raw.get("name")
    if not isinstance(name, str) or not name:
        return None
    if not all(value is None or isinstance(value, str) for value in (database, schema)):
        return None
    return (database, schema, name)


def _read_run_results(env_name: str, path: str, max_bytes: int) -> Tuple[Dict[str, str], Dict[str, float]]:
    """(unique_id -> bad status, unique_id -> execution_time of the nodes recorded as built)."""
    raw = read_bounded(env_name, path, max_bytes, "fix its permissions or remove it")
    try:
        parsed = DECODE_RESULTS.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        raise ManifestError(
            f"dbt-defer: environment '{env_name}': {path} is not a dbt run_results.json ({one_line(exc, pick='all', limit=200)}); "
            "copy it again from that environment's target/ or remove it"
        ) from None
    bad: Dict[str, str] = {}
    seconds: Dict[str, float] = {}
    for r in parsed.results:
        status = r.status.lower() if r.status else ""
        if status in BAD_STATUSES:
            bad[r.unique_id] = r.status
        elif status in BUILT_STATUSES:
            t = r.execution_time
            seconds[r.unique_id] = t if t is not None and math.isfinite(t) and t > 0 else 0.0
    return bad, seconds
