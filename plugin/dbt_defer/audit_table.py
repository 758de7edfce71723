"""The optional warehouse audit table (SPEC §5): ``<target schema>.dbt_defer_audit``.

Appended once, at the end of a deferred invocation, on dbt-defer's own connection. What it
promises:

- it never changes the run's outcome: any failure is one warning line;
- it writes nothing during ``dbt-defer explain`` (``DBT_DEFER_EXPLAIN``, set by the CLI);
- the write guard covers it: it never writes into a schema where a chain environment's
  manifest records a relation (a dev target pointed at prod's schema appends nothing there);
- creating it is safe under concurrency: two invocations creating it at once race inside the
  warehouse (Postgres: ``duplicate key ... pg_type_typname_nsp_index``), and the loser retries
  the idempotent ``create ... if not exists`` once the winner committed, so no rows are lost.

The SQL lives in the ``dbt_defer`` macros ``create_audit_table`` / ``insert_audit_records``.
"""

from __future__ import annotations

import random
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from dbt_common.events.base_types import EventLevel

from dbt_defer.config import one_line

TABLE_NAME = "dbt_defer_audit"
TABLE_BATCH = 500  # rows per insert statement
CREATE_ATTEMPTS = 6  # a lost creation race is retried; the winner has committed by then

Log = Callable[..., None]


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


def _lower(value: Optional[str]) -> str:
    return (value or "").lower()


def schema_owner(
    database: Optional[str], schema: Optional[str], environments: Iterable[Any], default_database: Optional[str]
) -> Optional[Tuple[str, str]]:
    """(environment name, unique_id) of a relation that a chain environment's manifest records
    in ``database.schema`` (a missing database meaning the adapter's default), or None."""
    want = (_lower(database or default_database), _lower(schema))
    for env in environments:
        for node in env.manifest.nodes.values():
            if node.materialized == "ephemeral":
                continue
            if (_lower(node.database or default_database), _lower(node.schema)) == want:
                return env.name, node.unique_id
    return None


def append(task: Any, document: Dict[str, Any], environments: Sequence[Any], log: Log) -> None:
    """Append the document's records to the audit table; every failure is one warning."""
    from dbt.adapters.factory import get_adapter

    config = task.config
    credentials = config.credentials
    where = f"{credentials.schema}.{TABLE_NAME}"
    try:
        adapter = get_adapter(config)
        relation = adapter.Relation.create(
            database=credentials.database, schema=credentials.schema, identifier=TABLE_NAME, type="table"
        )
        where = str(relation)
        owner = schema_owner(credentials.database, credentials.schema, environments, credentials.database)
        if owner is not None:
            env_name, uid = owner
            log(
                f"dbt-defer: not appending the audit to {where}: environment '{env_name}' records "
                f"relations in that schema (e.g. {uid}), and dbt-defer never writes where a chain "
                "environment keeps its relations; the run is not affected and "
                "target/dbt_defer_audit.json holds the records. Point your target at a development "
                "schema, or set vars: dbt_defer: audit_table: false",
                EventLevel.WARN,
            )
            return
        rows = table_rows(document)
        with adapter.connection_named(TABLE_NAME):
            _create(adapter, relation, task.manifest)
            _in_transaction(adapter, lambda: _insert(adapter, relation, task.manifest, rows))
        log(f"dbt-defer: appended {len(rows)} audit records to {where}", EventLevel.DEBUG)
    except Exception as exc:
        log(
            f"dbt-defer: could not append the audit to {where} ({one_line(exc)}); the run is not affected "
            "and target/dbt_defer_audit.json holds the records. Fix or drop that relation, "
            "or set vars: dbt_defer: audit_table: false",
            EventLevel.WARN,
        )


def _in_transaction(adapter: Any, work: Callable[[], None]) -> None:
    try:
        work()
        adapter.commit_if_has_connection()
    except BaseException:
        try:
            adapter.connections.rollback_if_open()
        except Exception:
            pass
        raise


def _create(adapter: Any, relation: Any, manifest: Any) -> None:
    """``create schema/table if not exists``, committed on its own, retried when it loses a race.

    In Postgres a concurrent creation blocks on the catalog's unique index until the other
    transaction commits, then fails with a duplicate key; the retry sees the committed table and
    does nothing. Any other failure is retried too, then reported by the last attempt's error.
    """
    for attempt in range(1, CREATE_ATTEMPTS + 1):
        try:
            _in_transaction(
                adapter,
                lambda: adapter.execute_macro(
                    "create_audit_table", macro_resolver=manifest, project="dbt_defer", kwargs={"relation": relation}
                ),
            )
            return
        except Exception:
            if attempt == CREATE_ATTEMPTS:
                raise
            time.sleep(random.uniform(0.05, 0.2) * attempt)


def _insert(adapter: Any, relation: Any, manifest: Any, rows: List[Dict[str, Any]]) -> None:
    for batch in batches(rows):
        adapter.execute_macro(
            "insert_audit_records", macro_resolver=manifest, project="dbt_defer",
            kwargs={"relation": relation, "rows": list(batch)},
        )
