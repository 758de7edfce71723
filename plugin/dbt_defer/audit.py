"""Audit of every ref resolution (SPEC §5): records, the JSON artifact, the summary line.

Thread-safe: dbt compiles nodes on several threads; each (node, ref) pair is kept once.
Holds no credentials and no data values — only node ids, environment names and relation names.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from dbt_defer.config import DEV

AUDIT_FILE = "dbt_defer_audit.json"


@dataclass(frozen=True)
class Record:
    node: str
    ref: str
    env: str
    relation: str
    reason: str
    limit: Optional[int]
    is_test: bool = False

    def as_dict(self, cross_environment: bool = False) -> Dict[str, Any]:
        """The record as written to the artifact: the SPEC §5 fields + ``cross_environment``.

        Every record has the same keys; ``cross_environment`` is true only on the records of a
        data test whose refs resolve to more than one environment.
        """
        out = asdict(self)
        del out["is_test"]
        out["cross_environment"] = bool(cross_environment and self.is_test)
        return out


class Recorder:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: Dict[Tuple[str, str], Record] = {}

    def add(self, record: Record) -> bool:
        """Keep the record; True when it is new for its (node, ref) pair."""
        key = (record.node, record.ref)
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


def summarize(records: Sequence[Record], env_order: Sequence[str]) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for r in records:
        counts[r.env] = counts.get(r.env, 0) + 1
    order = [DEV, *env_order, "ephemeral"]
    summary = {name: counts.pop(name) for name in order if name in counts}
    summary.update(sorted(counts.items()))
    summary["limited"] = sum(1 for r in records if r.limit is not None)
    return summary


def summary_line(summary: Dict[str, int], limits: Iterable[Optional[int]]) -> str:
    total = sum(v for k, v in summary.items() if k != "limited")
    parts = ", ".join(f"{k} {v}" for k, v in summary.items() if k != "limited")
    line = f"dbt-defer: {total} ref{'s' if total != 1 else ''} resolved"
    if parts:
        line += f": {parts}"
    if summary.get("limited"):
        sizes = sorted({n for n in limits if n is not None})
        rows = "/".join(str(n) for n in sizes)
        line += f"; {summary['limited']} limited to {rows} rows"
    return line


def build_document(
    records: Sequence[Record],
    *,
    metadata: Dict[str, Any],
    environments: List[Dict[str, Any]],
) -> Dict[str, Any]:
    crossed = cross_environment_tests(records)
    return {
        "metadata": metadata,
        "environments": environments,
        "resolutions": [r.as_dict(r.node in crossed) for r in records],
        "summary": summarize(records, [e["name"] for e in environments]),
    }


def write_document(document: Dict[str, Any], target_path: str) -> str:
    """Write atomically (temp file + rename): a reader never sees half a file."""
    os.makedirs(target_path, exist_ok=True)
    path = os.path.join(target_path, AUDIT_FILE)
    fd, tmp = tempfile.mkstemp(prefix=".dbt_defer_audit.", suffix=".json", dir=target_path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(document, fh, indent=2, sort_keys=False)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


TABLE_NAME = "dbt_defer_audit"
TABLE_BATCH = 500  # rows per insert statement


def table_rows(document: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The rows appended to the warehouse audit table: one per resolution, plus the invocation.

    ``generated_at`` is the artifact's metadata.generated_at as a UTC timestamp without zone
    ('YYYY-MM-DD HH:MM:SS.ffffff'), which every warehouse casts to its timestamp type.
    """
    meta = document["metadata"]
    generated_at = str(meta.get("generated_at") or "").replace("T", " ").rstrip("Z")
    rows = []
    for r in document["resolutions"]:
        rows.append(
            {
                "invocation_id": meta.get("invocation_id"),
                "generated_at": generated_at,
                "target_name": meta.get("target"),
                "command": meta.get("command"),
                "node": r["node"],
                "ref": r["ref"],
                "env": r["env"],
                "relation": r["relation"],
                "reason": r["reason"],
                "row_limit": r["limit"],
                "cross_environment": bool(r.get("cross_environment")),
            }
        )
    return rows


def batches(rows: Sequence[Any], size: int = TABLE_BATCH) -> List[Sequence[Any]]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
