"""Audit of every ref resolution (SPEC §5): records, the JSON artifact, the summary line.

Thread-safe: dbt compiles nodes on several threads; each (node, ref) pair is kept once.
Holds no credentials and no data values — only node ids, environment names and relation names.

Also owns one invocation's audit file: its metadata, writing it (a failure is one warning
through the ``warn`` callable handed in, never the run's outcome), the ``refused`` audit, and
the counts behind the savings (upstream nodes not rebuilt). Imports ``config``, ``manifests``,
``chain`` and ``localfiles``; never the guard, the session or dbt's events.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import threading
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Optional, Sequence, Tuple

from dbt_defer import chain
from dbt_defer.config import DEV, EnvironmentSpec, node_meta, one_line
from dbt_defer.localfiles import replace_atomically, sweep
from dbt_defer.manifests import REFABLE
from dbt_defer.version import __version__

AUDIT_FILE = "dbt_defer_audit.json"
# metadata.status, present only when an invocation did not complete: "refused" (stopped before
# resolving any ref; no resolutions) or "failed" (dbt raised while resolving; the records so far)
REFUSED, FAILED = "refused", "failed"


# what a record reads (``Record.kind``): every deferred read is recorded, not only ref() (SPEC §5)
REF, FUNCTION, FOREIGN_KEY, CLONE = "ref", "function", "foreign_key", "clone"
_KIND_NOUNS = {REF: ("ref", "refs"), FUNCTION: ("function", "functions"),
               FOREIGN_KEY: ("foreign key", "foreign keys"), CLONE: ("cloned node", "cloned nodes")}


@dataclass(frozen=True)
class Record:
    node: str
    ref: str
    env: str
    relation: str
    reason: str
    limit: Optional[int]
    is_test: bool = False
    kind: str = REF
    # the project's own version of ``ref`` differs from the copy read in ``env`` (SPEC §5)
    parent_modified: bool = False

    def as_dict(self, cross_environment: bool = False) -> Dict[str, Any]:
        """The record as written to the artifact: the SPEC §5 fields + ``kind``,
        ``parent_modified`` and ``cross_environment``.

        Every record has the same keys; ``cross_environment`` is true only on the records of a
        data test whose refs resolve to more than one environment.
        """
        out = asdict(self)
        del out["is_test"]
        out["kind"] = out.pop("kind")
        out["parent_modified"] = out.pop("parent_modified")
        out["cross_environment"] = bool(cross_environment and self.is_test)
        return out


class Recorder:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: Dict[Tuple[str, str], Record] = {}

    def add(self, record: Record) -> bool:
        """Keep the record; True when it is new for its (node, ref, kind)."""
        key = (record.node, record.ref, record.kind)
        with self._lock:
            is_new = key not in self._records
            self._records[key] = record  # a re-compile of the same node keeps the latest answer
        return is_new

    def records(self) -> List[Record]:
        with self._lock:
            return [self._records[k] for k in sorted(self._records)]

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)


def cross_environment_tests(records: Iterable[Record]) -> Dict[str, List[str]]:
    """Data tests whose refs resolve to more than one environment -> sorted env names."""
    envs: Dict[str, set] = {}
    for r in records:
        if r.is_test and r.env != "ephemeral":
            envs.setdefault(r.node, set()).add(r.env)
    return {node: sorted(e) for node, e in envs.items() if len(e) > 1}


CROSS_ENVIRONMENT_OK = "ok"  # meta: {dbt_defer: {cross_environment: ok}} on a test: no warning


def cross_environment_ok(node: Any) -> bool:
    """The test says comparing across environments is what it means to do (e.g. expected rows
    from a seed): its warning is silenced (its records still carry ``cross_environment``)."""
    value = node_meta(node).get("cross_environment") if node is not None else None
    return isinstance(value, str) and value.strip().lower() == CROSS_ENVIRONMENT_OK


def cross_environment_line(test: str, envs: Sequence[str]) -> str:
    return (
        f"dbt-defer: {test} compares data across environments ({', '.join(envs)}); its result may not hold "
        "in any single environment. If that is intended (e.g. expected rows from a seed), silence this "
        "warning with config: {meta: {dbt_defer: {cross_environment: ok}}} on the test"
    )


def all_refused(manifest: Any, selected: FrozenSet[str], refused: Any) -> bool:
    """Did the write guard refuse every selected model, seed and snapshot (nothing was built)?"""
    buildable = [u for u in selected if getattr(manifest.nodes.get(u), "resource_type", None) in REFABLE]
    return bool(buildable) and all(u in refused for u in buildable)


def summarize(records: Sequence[Record], env_order: Sequence[str], current: str = DEV) -> Dict[str, Any]:
    """Counts by env: the current target first, then the chain in order, ephemeral, the rest."""
    counts: Dict[str, int] = {}
    for r in records:
        counts[r.env] = counts.get(r.env, 0) + 1
    order = [current, *env_order, "ephemeral"]
    summary: Dict[str, Any] = {name: counts.pop(name) for name in order if name in counts}
    summary.update(sorted(counts.items()))
    summary["limited"] = sum(1 for r in records if r.limit is not None)
    return summary


NOT_COUNTED = ("limited", "not_built", "saved_seconds")  # summary keys that are not environments


@dataclass(frozen=True)
class Savings:
    """What the run did not build (SPEC §5): the upstream nodes it did not select, and their
    build time in the chain (``seconds`` None: no environment of the chain has run results)."""

    not_built: int = 0
    seconds: Optional[float] = None
    measured_in: Tuple[str, ...] = ()  # the environments the seconds come from, in chain order


def savings(not_built: Iterable[str], run_times: Sequence[Tuple[str, Optional[Dict[str, float]]]]) -> Savings:
    """Sum, per node, its execution_time in the first environment whose run results record it
    as built. ``run_times``: (environment name, unique_id -> seconds, or None when that
    environment has no run_results.json), in chain order."""
    nodes = list(not_built)
    if all(times is None for _, times in run_times):
        return Savings(len(nodes), None, ())
    total, used = 0.0, set()
    for uid in nodes:
        for name, times in run_times:
            if times is not None and uid in times:
                total += times[uid]
                used.add(name)
                break
    return Savings(len(nodes), round(total, 3), tuple(n for n, _ in run_times if n in used))


def format_duration(seconds: float) -> str:
    """'4.2s' / '42s' / '14m 32s' / '2h 05m'."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(round(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m {whole % 60:02d}s"
    return f"{whole // 3600}h {whole % 3600 // 60:02d}m"


def _names(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def kinds_read(records: Iterable[Record]) -> Dict[str, int]:
    """How many records of each kind, in the order of ``_KIND_NOUNS``."""
    counts: Dict[str, int] = {}
    for r in records:
        counts[r.kind] = counts.get(r.kind, 0) + 1
    return {kind: counts[kind] for kind in _KIND_NOUNS if kind in counts}


def summary_line(summary: Dict[str, Any], limits: Iterable[Optional[int]], measured_in: Sequence[str] = (),
                 kinds: Optional[Dict[str, int]] = None) -> str:
    """The info line at the end of a deferred run (SPEC §5). ``measured_in``: the environments
    the saved seconds come from (``Savings.measured_in``); ``kinds``: ``kinds_read`` of the
    records ("14 refs resolved" when they are all refs, else "16 reads resolved (14 refs,
    2 foreign keys)")."""
    envs = {k: v for k, v in summary.items() if k not in NOT_COUNTED}
    total = sum(envs.values())
    parts = ", ".join(f"{k} {v}" for k, v in envs.items())
    if not kinds or set(kinds) == {REF}:
        line = f"dbt-defer: {total} ref{'s' if total != 1 else ''} resolved"
    else:
        each = ", ".join(f"{n} {_KIND_NOUNS[k][n != 1]}" for k, n in kinds.items())
        line = f"dbt-defer: {total} read{'s' if total != 1 else ''} resolved ({each})"
    if parts:
        line += f": {parts}"
    if summary.get("limited"):
        sizes = sorted({n for n in limits if n is not None})
        rows = "/".join(str(n) for n in sizes)
        line += f"; {summary['limited']} limited to {rows} rows"
    not_built = summary.get("not_built") or 0
    if not_built:
        line += f"; {not_built} upstream node{'s' if not_built != 1 else ''} not rebuilt"
        seconds = summary.get("saved_seconds")
        if seconds is not None and measured_in:
            line += f" (~{format_duration(seconds)} of build time in {_names(list(measured_in))})"
    return line


def build_document(
    records: Sequence[Record],
    *,
    metadata: Dict[str, Any],
    environments: List[Dict[str, Any]],
    saved: Savings = Savings(),
) -> Dict[str, Any]:
    crossed = cross_environment_tests(records)
    summary = summarize(records, [e["name"] for e in environments], metadata.get("target") or DEV)
    summary["not_built"] = saved.not_built
    summary["saved_seconds"] = saved.seconds
    return {
        "metadata": metadata,
        "environments": environments,
        "resolutions": [r.as_dict(r.node in crossed) for r in records],
        "summary": summary,
    }


def write_document(document: Dict[str, Any], target_path: str) -> str:
    """Write the audit file atomically (``localfiles.replace_atomically``: a reader never sees
    half a file; dbt's artifact permissions), after sweeping killed writers' temp files."""
    os.makedirs(target_path, exist_ok=True)
    sweep_temp_files(target_path)
    path = os.path.join(target_path, AUDIT_FILE)
    data = (json.dumps(document, indent=2, sort_keys=False) + "\n").encode("utf-8")
    replace_atomically(path, data, lambda: f".dbt_defer_audit.{os.getpid()}.{secrets.token_hex(6)}.json")
    return path


_TEMP_FILE = re.compile(r"^\.dbt_defer_audit\.(?P<pid>\d{1,10})\.[0-9a-f]{12}\.json$")
STALE_TEMP_SECONDS = 300.0  # an audit write takes milliseconds: older than this, nobody is writing it
_DEAD_GRACE_SECONDS = 5.0  # a dead writer's file: gone after this (clock skew on shared folders)


def sweep_temp_files(target_path: str, now: Optional[float] = None) -> List[str]:
    """Remove the temp files of audit writes that will never finish (a killed run): named
    ``.dbt_defer_audit.<pid>.<hex>.json`` and older than 5 minutes, or older than 5 seconds
    with a pid that is no running process. A concurrent run's temp file is never touched."""
    return sweep(target_path, _TEMP_FILE, STALE_TEMP_SECONDS, _DEAD_GRACE_SECONDS, now)


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --- one invocation's audit file (dbt's task in, warnings out through ``warn``) ------------------


def run_metadata(task: Any) -> Dict[str, Any]:
    return {
        "dbt_defer_version": __version__,
        "invocation_id": _invocation_id(),
        "generated_at": now_iso(),
        "target": task.config.target_name,
        "command": command_of(task),
    }


def _invocation_id() -> Optional[str]:
    try:
        from dbt_common.invocation import get_invocation_id

        return get_invocation_id()
    except Exception:  # pragma: no cover - older dbt-common
        return None


def command_of(task: Any) -> str:
    which = getattr(task.args, "which", None)
    return str(which) if which else type(task).__name__


def write_for_run(task: Any, document: Dict[str, Any], warn: Callable[[str], None]) -> None:
    """target/dbt_defer_audit.json; a failure is one warning line, never the run's outcome."""
    try:
        write_document(document, chain.target_path_of(task.config))
    except Exception as exc:
        where = os.path.join(chain.target_path_of(task.config), AUDIT_FILE)
        warn(
            f"dbt-defer: could not write the audit file {where} ({one_line(exc)}); the run is not "
            "affected. Make that path a writable file (remove what is there), or use another --target-path"
        )


def end_refused(task: Any, error: BaseException, environments: Sequence[Any],
                specs: Optional[Sequence[EnvironmentSpec]], warn: Callable[[str], None]) -> None:
    """A deferred invocation stopped before resolving any ref: replace the previous invocation's
    audit file, which would look current, by one that says so (``metadata.status: refused``,
    ``metadata.error``, no resolutions). Never raises. A target path inside an environment's
    state folder (itself a reason to refuse) gets nothing new written into it: the stale file
    is removed instead."""
    try:
        target_path = chain.target_path_of(task.config)
        if specs is not None and chain.inside_state_folder(target_path, specs):
            stale = os.path.join(target_path, AUDIT_FILE)
            if os.path.isfile(stale):
                os.unlink(stale)
            return
        metadata = {**run_metadata(task), "status": REFUSED, "error": one_line(error)}
        document = build_document([], metadata=metadata, environments=[e.describe() for e in environments])
    except Exception as exc:  # never hide the refusal itself
        warn(f"dbt-defer: could not record the refused run in the audit ({one_line(exc)})")
        return
    write_for_run(task, document, warn)


def remove_stale(task: Any) -> None:
    """A run with deferral off: remove the audit a previous deferred run left in the target path
    (removed, not marked: a marked file still holds resolutions a reader or a CI upload could take
    for this run's, and marking would rewrite a large file on every plain run). One stat when
    there is none."""
    path = os.path.join(chain.target_path_of(task.config), AUDIT_FILE)
    if os.path.isfile(path):
        os.unlink(path)


def upstream_not_selected(manifest: Any, selected: FrozenSet[str]) -> List[str]:
    """Models, seeds and snapshots (not ephemeral) upstream of the selection that the run did
    not select: what ``dbt build -s +<selection>`` would also have built (SPEC §5). Walks
    ``depends_on`` once (through ephemeral models and tests too); linear in the graph."""
    nodes = manifest.nodes
    unit_tests = getattr(manifest, "unit_tests", None) or {}
    seen = set(selected)
    stack = list(selected)
    found = []
    while stack:
        uid = stack.pop()
        node = nodes.get(uid) or unit_tests.get(uid)
        for parent in getattr(getattr(node, "depends_on", None), "nodes", None) or ():
            if parent in seen:
                continue
            seen.add(parent)
            stack.append(parent)
            other = nodes.get(parent)
            if other is not None and other.resource_type in REFABLE and not getattr(other, "is_ephemeral_model", False):
                found.append(parent)
    return sorted(found)


def tests_with_failures(task: Any) -> List[str]:
    """Data tests of this run that failed or warned (found rows)."""
    found = []
    for result in getattr(task, "node_results", None) or []:
        node = getattr(result, "node", None)
        if getattr(node, "resource_type", None) == "test" and str(getattr(result, "status", "")) in ("fail", "warn"):
            found.append(node.unique_id)
    return found
