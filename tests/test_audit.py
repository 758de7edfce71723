"""Audit logging (SPEC §5): the JSON artifact, the log lines, the warehouse table, the
cross-environment flag on data tests, and exactly one record per edge with threads: 8.

Real dbt runs on DuckDB and Postgres. The ``envs`` project has prod built in full and staging
in part (raw_*, stg_*, orders), so a dev run reads from all three places.
"""

from __future__ import annotations

import gc
import json
import os
import random
import re
import subprocess
import time
import sys
from datetime import datetime
from pathlib import Path

import pytest

import dbt_defer
from dbt_defer import audit, audit_table
from dbt_harness import make_project, pg_connect
from conftest import ADAPTERS, require_adapter

ENV = {"DBT_DEFER": "1", "DBT_DEFER_STAGING_STATE": "staging-artifacts", "DBT_DEFER_PROD_STATE": "prod-artifacts"}
# tests of the log lines must not depend on what earlier tests left in dev
NEVER_DEV = {**ENV, "DBT_DEFER_DEV_RELATIONS": "never"}
PROJECT = "dbt_defer_integration_tests"
RECORD_KEYS = ["node", "ref", "env", "relation", "reason", "limit", "kind", "parent_modified", "cross_environment"]
REL_TEST = "test.dbt_defer_integration_tests.relationships_model_b_id__id__ref_model_a_.ea90810b97"


def uid(name: str, kind: str = "model") -> str:
    return f"{kind}.{PROJECT}.{name}"


def rel(project, env: str, name: str) -> str:
    return f'"{project.database}"."{project.schema(env)}"."{name}"'


def ours(result, level: str = None):
    return [m for m in result.messages if m["msg"].startswith("dbt-defer:") and (level is None or m["level"] == level)]


def execute(project, sql: str) -> None:
    """Run a write statement outside dbt (set-up of a test only)."""
    if project.adapter == "postgres":
        conn = pg_connect()
        try:
            with conn, conn.cursor() as cur:
                cur.execute(sql)
        finally:
            conn.close()
        return
    import duckdb

    con = duckdb.connect(str(project.duckdb_path))  # shares dbt-duckdb's in-process handle if open
    try:
        con.execute(sql)
    finally:
        con.close()


def release_duckdb() -> None:
    """dbt-duckdb keeps its database open in-process after a run; another process needs the lock."""
    try:
        from dbt.adapters.duckdb.connections import DuckDBConnectionManager
    except ImportError:
        return
    DuckDBConnectionManager.close_all_connections()
    gc.collect()


def invocation_id_of_last_run(project) -> str:
    return json.loads((project.target / "run_results.json").read_text())["metadata"]["invocation_id"]


def build_times(project, folder: str) -> dict:
    """unique_id -> execution_time of the nodes an environment's run_results.json records as built."""
    results = json.loads((project.root / folder / "run_results.json").read_text())["results"]
    return {r["unique_id"]: r["execution_time"] for r in results if r["status"] == "success"}


def expected_savings(project, not_built, chain=("staging", "prod")):
    """(seconds, environments used): each node's time in the first environment that built it."""
    times = {env: build_times(project, f"{env}-artifacts") for env in chain}
    total, used = 0.0, []
    for node in not_built:
        env = next(e for e in chain if node in times[e])
        total += times[env][node]
        used.append(env)
    return round(total, 3), [e for e in chain if e in used]


def savings_tail(count, seconds, used) -> str:
    names = used[0] if len(used) == 1 else ", ".join(used[:-1]) + " and " + used[-1]
    return f"; {count} upstream node{'s' if count != 1 else ''} not rebuilt (~{audit.format_duration(seconds)} of build time in {names})"


# --- units (no dbt) ------------------------------------------------------------------------------


def record(node, ref, env="prod", limit=None, is_test=False):
    return audit.Record(node, ref, env, f'"db"."{env}"."{ref}"', "deferred", limit, is_test)


def test_summary_line_of_the_spec():
    records = (
        [record(f"model.p.d{i}", "model.p.x", "dev") for i in range(3)]
        + [record(f"model.p.s{i}", "model.p.x", "staging") for i in range(2)]
        + [record(f"model.p.p{i}", "model.p.x", "prod", limit=1000) for i in range(9)]
    )
    summary = audit.summarize(records, ["staging", "prod"])
    assert summary == {"dev": 3, "staging": 2, "prod": 9, "limited": 9}
    assert audit.summary_line(summary, [r.limit for r in records]) == (
        "dbt-defer: 14 refs resolved: dev 3, staging 2, prod 9; 9 limited to 1000 rows"
    )
    assert audit.summary_line(audit.summarize([], ["prod"]), []) == "dbt-defer: 0 refs resolved"
    summary.update(not_built=37, saved_seconds=872.4)
    assert audit.summary_line(summary, [r.limit for r in records], ["prod"]) == (
        "dbt-defer: 14 refs resolved: dev 3, staging 2, prod 9; 9 limited to 1000 rows; "
        "37 upstream nodes not rebuilt (~14m 32s of build time in prod)"
    )
    # no run results anywhere: the count without an estimate
    summary.update(not_built=1, saved_seconds=None)
    assert audit.summary_line(summary, [r.limit for r in records]).endswith("rows; 1 upstream node not rebuilt")


def test_summary_line_names_the_reads_that_are_not_refs():
    reads = [record("model.p.a", "model.p.x", "prod"),
             audit.Record("model.p.a", "model.p.x", "prod", "r", "deferred", None, kind=audit.FOREIGN_KEY),
             audit.Record("model.p.a", "function.p.f", "staging", "r", "deferred", None, kind=audit.FUNCTION)]
    summary = audit.summarize(reads, ["staging", "prod"])
    assert audit.summary_line(summary, [None] * 3, kinds=audit.kinds_read(reads)) == (
        "dbt-defer: 3 reads resolved (1 ref, 1 function, 1 foreign key): staging 1, prod 2"
    )
    clones = [audit.Record(f"model.p.{n}", f"model.p.{n}", "prod", "r", "deferred", None, kind=audit.CLONE) for n in "ab"]
    assert audit.summary_line(audit.summarize(clones, ["prod"]), [None] * 2, kinds=audit.kinds_read(clones)) == (
        "dbt-defer: 2 reads resolved (2 cloned nodes): prod 2"
    )
    # a ref and a foreign key of one node to one parent are two records
    recorder = audit.Recorder()
    assert recorder.add(reads[0]) and recorder.add(reads[1]) and not recorder.add(reads[0])
    assert len(recorder) == 2


# --- a parent you changed, read from another environment (SPEC §5) ----------------------------


def test_a_changed_parent_read_from_an_environment_is_flagged_and_warned_once(envs):
    project = envs
    stg_orders = project.read("models/staging/stg_orders.sql")
    orders = project.read("models/marts/orders.sql")
    with project.edited("models/staging/stg_orders.sql", stg_orders.replace("amount\n", "amount, amount > 0 as is_fulfilled\n")), \
            project.edited("models/marts/orders.sql", orders.replace("o.amount\n", "o.amount, o.is_fulfilled\n")):
        assert "is_fulfilled" in project.read("models/marts/orders.sql")
        res = project.dbt("run", "-s", "orders", "customers", env=NEVER_DEV, expect=False)
    records = project.resolutions()
    changed = records[(uid("orders"), uid("stg_orders"))]
    assert (changed["env"], changed["reason"], changed["parent_modified"]) == ("staging", "deferred", True)
    # the ephemeral int_order_totals (compiled into customers) reads the same changed parent
    assert records[(uid("int_order_totals"), uid("stg_orders"))]["parent_modified"] is True
    assert records[(uid("customers"), uid("stg_customers"))]["parent_modified"] is False
    warnings = [m["msg"] for m in ours(res, "warn") if "differs from" in m["msg"]]
    assert len(warnings) == 1, warnings
    assert f"reads {uid('stg_orders')} from staging, but your stg_orders differs from staging's copy" in warnings[0]
    assert "build both: dbt build -s stg_orders " in warnings[0] and "state:modified+" in warnings[0]
    assert str(res.node_results()[uid("orders")].status) == "error"  # the warehouse's "column does not exist"


def test_savings_take_each_node_from_the_first_environment_that_built_it():
    staging = {"model.p.a": 1.25, "model.p.b": 2.0}
    prod = {"model.p.a": 100.0, "model.p.b": 200.0, "model.p.c": 3.5}
    got = audit.savings(["model.p.a", "model.p.c", "model.p.d"], [("staging", staging), ("prod", prod)])
    assert got == audit.Savings(not_built=3, seconds=4.75, measured_in=("staging", "prod"))
    got = audit.savings(["model.p.c"], [("staging", staging), ("qa", None), ("prod", prod)])
    assert got == audit.Savings(1, 3.5, ("prod",))
    # environments with run results that never built these nodes: 0 seconds, not null
    assert audit.savings(["model.p.x"], [("staging", staging), ("prod", None)]) == audit.Savings(1, 0.0, ())
    # no environment has run results: null
    assert audit.savings(["model.p.a"], [("staging", None), ("prod", None)]) == audit.Savings(1, None, ())
    assert audit.savings([], []) == audit.Savings(0, None, ())


def test_durations_read_like_the_spec():
    assert [audit.format_duration(s) for s in (0.04, 4.25, 42.4, 59.6, 872.4, 3599.4, 7500)] == [
        "0.0s", "4.2s", "42s", "1m 00s", "14m 32s", "59m 59s", "2h 05m"
    ]


def test_recorder_keeps_one_record_per_pair_across_threads():
    from concurrent.futures import ThreadPoolExecutor

    recorder = audit.Recorder()
    pairs = [(f"model.p.n{i % 40}", f"model.p.r{i % 7}") for i in range(2000)]

    def add(pair):
        return recorder.add(record(*pair))

    with ThreadPoolExecutor(8) as pool:
        new = list(pool.map(add, pairs))
    assert sum(new) == len(set(pairs)) == len(recorder)
    keys = [(r.node, r.ref) for r in recorder.records()]
    assert keys == sorted(set(pairs))


def test_document_and_table_rows():
    records = [
        record("test.p.t", "model.p.a", "dev", is_test=True),
        record("test.p.t", "model.p.b", "prod", is_test=True),
        record("model.p.m", "model.p.b", "prod", limit=5),
    ]
    recorder = audit.Recorder()
    for r in records:
        recorder.add(r)
    doc = audit.build_document(
        recorder.records(),
        metadata={"invocation_id": "i-1", "generated_at": "2026-01-02T03:04:05.123456Z", "target": "dev",
                  "command": "build"},
        environments=[{"name": "prod", "state": "/s", "generated_at": None, "nodes": 3}],
    )
    assert [(r["node"], r["ref"], r["cross_environment"]) for r in doc["resolutions"]] == [
        ("model.p.m", "model.p.b", False), ("test.p.t", "model.p.a", True), ("test.p.t", "model.p.b", True),
    ]
    assert doc["summary"] == {"dev": 1, "prod": 2, "limited": 1, "not_built": 0, "saved_seconds": None}
    rows = audit_table.table_rows(doc)
    assert rows[0] == {
        "invocation_id": "i-1", "generated_at": "2026-01-02 03:04:05.123456", "target_name": "dev",
        "command": "build", "node": "model.p.m", "ref": "model.p.b", "env": "prod",
        "relation": '"db"."prod"."model.p.b"', "reason": "deferred", "row_limit": 5, "cross_environment": False,
    }
    assert [len(b) for b in audit_table.batches(list(range(1201)))] == [500, 500, 201]


# --- the artifact ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def build_b(envs):
    """dev build of customers (refs staging + an ephemeral) and model_b (refs prod) with tests."""
    result = envs.dbt("build", "-s", "customers", "model_b", env=ENV)
    return envs, result


def test_artifact_shape(build_b):
    project, result = build_b
    doc = project.audit()
    assert list(doc) == ["metadata", "environments", "resolutions", "summary"]

    meta = doc["metadata"]
    assert list(meta) == ["dbt_defer_version", "invocation_id", "generated_at", "target", "command"]
    assert meta["dbt_defer_version"] == dbt_defer.__version__
    assert meta["invocation_id"] == invocation_id_of_last_run(project)
    assert meta["target"] == "dev" and meta["command"] == "build"
    datetime.strptime(meta["generated_at"], "%Y-%m-%dT%H:%M:%S.%fZ")

    expected_envs = []
    for name in ("staging", "prod"):
        manifest = json.loads((project.root / f"{name}-artifacts" / "manifest.json").read_text())
        expected_envs.append(
            {
                "name": name,
                "state": str(project.root / f"{name}-artifacts"),
                "generated_at": manifest["metadata"]["generated_at"],
                "nodes": len(manifest["nodes"]),
            }
        )
    assert doc["environments"] == expected_envs

    records = doc["resolutions"]
    keys = [(r["node"], r["ref"]) for r in records]
    assert keys == sorted(keys), "resolutions are ordered by node then ref"
    assert len(set(keys)) == len(keys), "one record per (node, ref)"
    for r in records:
        assert list(r) == RECORD_KEYS


def test_artifact_content(build_b):
    project, _ = build_b
    got = {(r["node"], r["ref"]): r for r in project.audit()["resolutions"]}
    row = lambda env, relation, reason, limit=None, cross=False: {  # noqa: E731
        "env": env, "relation": relation, "reason": reason, "limit": limit, "kind": "ref", "parent_modified": False,
        "cross_environment": cross,
    }
    expected = {
        # customers refs stg_customers (in staging) and the ephemeral int_order_totals, which refs stg_orders
        (uid("customers"), uid("stg_customers")): row("staging", rel(project, "staging", "stg_customers"), "deferred"),
        (uid("customers"), uid("int_order_totals")): row("ephemeral", "__dbt__cte__int_order_totals", "ephemeral"),
        (uid("int_order_totals"), uid("stg_orders")): row("staging", rel(project, "staging", "stg_orders"), "deferred"),
        # model_a was never built in staging: prod
        (uid("model_b"), uid("model_a")): row("prod", rel(project, "prod", "model_a"), "deferred"),
        # tests of the selected customers read dev
        (uid("assert_totals_not_negative", "test"), uid("customers")): row(
            "dev", rel(project, "dev", "customers"), "selected"
        ),
        (REL_TEST, uid("model_b")): row("dev", rel(project, "dev", "model_b"), "selected", cross=True),
        (REL_TEST, uid("model_a")): row("prod", rel(project, "prod", "model_a"), "deferred", cross=True),
    }
    for test in ("not_null_customers_customer_id", "unique_customers_customer_id"):
        [key] = [k for k in got if k[0].startswith(uid(test, "test") + ".")]
        expected[key] = row("dev", rel(project, "dev", "customers"), "selected")
    assert {k: {f: v[f] for f in RECORD_KEYS[2:]} for k, v in got.items()} == expected

    # what the audit says is what the SQL reads
    compiled = project.compiled("models/marts/customers.sql")
    assert rel(project, "staging", "stg_customers") in compiled
    assert rel(project, "prod", "model_a") in project.compiled("models/docs_example/model_b.sql")


# build -s customers model_b does not build these (dbt build -s +customers +model_b would);
# int_order_totals, ephemeral, is upstream too but has no relation to build
NOT_BUILT_B = [uid("model_a"), uid("raw_customers", "seed"), uid("raw_orders", "seed"), uid("stg_customers"),
               uid("stg_orders")]


def test_summary_and_log_lines(build_b):
    project, result = build_b
    doc = project.audit()
    # staging built the seeds and stg_*, so their times come from staging; model_a only from prod
    seconds, used = expected_savings(project, NOT_BUILT_B)
    assert used == ["staging", "prod"] and seconds > 0
    assert doc["summary"] == {
        "dev": 4, "staging": 2, "prod": 2, "ephemeral": 1, "limited": 0, "not_built": 5, "saved_seconds": seconds
    }
    assert list(doc["summary"]) == ["dev", "staging", "prod", "ephemeral", "limited", "not_built", "saved_seconds"]

    info = [m["msg"] for m in ours(result, "info")]
    assert info == ["dbt-defer: 9 refs resolved: dev 4, staging 2, prod 2, ephemeral 1" + savings_tail(5, seconds, used)]
    summary_at = max(i for i, m in enumerate(result.messages) if m["msg"] == info[0])
    assert all(not m["msg"].startswith("dbt-defer:") for m in result.messages[summary_at + 1:])

    # one debug line per deferred ref (staging/prod), none for dev or ephemeral refs
    debug = sorted(m["msg"] for m in ours(result, "debug") if " -> " in m["msg"])
    deferred = [r for r in doc["resolutions"] if r["env"] in ("staging", "prod")]
    assert debug == sorted(f"dbt-defer: {r['node']} -> {r['ref']}: {r['env']} {r['relation']}" for r in deferred)


def test_savings_without_run_results_are_null(envs):
    """An environment given as a manifest alone: the count stays exact, the seconds are null."""
    folder = envs.root / "prod-manifest-only"
    folder.mkdir(exist_ok=True)
    (folder / "manifest.json").write_text((envs.root / "prod-artifacts" / "manifest.json").read_text())
    result = envs.dbt("build", "-s", "model_b", env={  # savings: only commands that build report them
        "DBT_DEFER": "1", "DBT_DEFER_PROD_STATE": "prod-manifest-only", "DBT_DEFER_DEV_RELATIONS": "never"})
    summary = envs.audit()["summary"]
    # dbt build -s +model_b would also build model_a, stg_customers and raw_customers
    assert (summary["not_built"], summary["saved_seconds"]) == (3, None)
    [line] = [m["msg"] for m in ours(result, "info")]
    assert line == "dbt-defer: 3 refs resolved: dev 1, prod 2; 3 upstream nodes not rebuilt"


def test_cross_environment_test_warns_once(build_b):
    project, result = build_b
    warnings = ours(result, "warn")
    assert len(warnings) == 1
    assert REL_TEST in warnings[0]["msg"] and "(dev, prod)" in warnings[0]["msg"]
    flagged = {r["node"] for r in project.audit()["resolutions"] if r["cross_environment"]}
    assert flagged == {REL_TEST}


def test_same_env_data_test_is_not_cross_environment(envs):
    """model_a and model_b both selected: the relationships test reads dev only."""
    result = envs.dbt("build", "-s", "model_a", "model_b", env=ENV)
    records = [r for r in envs.audit()["resolutions"] if r["node"] == REL_TEST]
    assert {r["env"] for r in records} == {"dev"} and not any(r["cross_environment"] for r in records)
    assert ours(result, "warn") == []


def test_artifact_is_rewritten_per_invocation(envs):
    envs.dbt("compile", "-s", "stg_customers", env=ENV)
    first = envs.audit()
    envs.dbt("compile", "-s", "model_a", env=ENV)
    second = envs.audit()
    assert second["metadata"]["invocation_id"] != first["metadata"]["invocation_id"]
    # compile -s model_a also compiles the relationships test on model_a (eager selection)
    assert {r["node"] for r in first["resolutions"]} == {uid("stg_customers")}
    assert {r["node"] for r in second["resolutions"]} == {uid("model_a"), REL_TEST}
    assert second["metadata"]["command"] == "compile"


def test_no_artifact_without_deferral(envs):
    path = envs.target / "dbt_defer_audit.json"
    path.unlink(missing_ok=True)
    envs.dbt("compile", "-s", "model_a")
    assert not path.exists()


# --- logs ---------------------------------------------------------------------------------------


def test_lines_reach_dbt_log(envs):
    log_file = envs.root / "logs" / "dbt.log"
    log_file.unlink(missing_ok=True)
    envs.dbt("run", "-s", "model_b", env=NEVER_DEV)  # savings: only commands that build report them
    text = log_file.read_text()
    assert f"dbt-defer: {uid('model_b')} -> {uid('model_a')}: prod {rel(envs, 'prod', 'model_a')}" in text
    seconds, used = expected_savings(envs, [uid("model_a"), uid("raw_customers", "seed"), uid("stg_customers")])
    assert "dbt-defer: 1 ref resolved: prod 1" + savings_tail(3, seconds, used) + "\n" in text


def test_lines_in_json_log_format(envs):
    """A real `dbt` process: the summary is a JSON line on stdout; the debug lines are JSON in dbt.log."""
    dbt = os.path.join(os.path.dirname(sys.executable), "dbt")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DBT_DEFER", "DBT_STATE", "DBT_TARGET"))}
    env.update(NEVER_DEV, DBT_SEND_ANONYMOUS_USAGE_STATS="false")
    log_file = envs.root / "logs" / "dbt.log"
    log_file.unlink(missing_ok=True)
    release_duckdb()
    proc = subprocess.run(
        [dbt, "--log-format", "json", "run", "-s", "model_b",
         "--project-dir", str(envs.root), "--profiles-dir", str(envs.root)],
        env=env, cwd=str(envs.root), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stdout = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    summary = [e for e in stdout if e["data"].get("msg", "").startswith("dbt-defer: 1 ref resolved")]
    assert len(summary) == 1
    assert summary[0]["info"]["level"] == "info" and summary[0]["info"]["name"] == "Note"
    seconds, used = expected_savings(envs, [uid("model_a"), uid("raw_customers", "seed"), uid("stg_customers")])
    assert summary[0]["data"]["msg"] == "dbt-defer: 1 ref resolved: prod 1" + savings_tail(3, seconds, used)

    in_file = [json.loads(line) for line in log_file.read_text().splitlines() if line.startswith("{")]
    debug = [e for e in in_file if e["data"].get("msg", "").startswith(f"dbt-defer: {uid('model_b')} -> ")]
    assert [e["info"]["level"] for e in debug] == ["debug"]
    assert debug[0]["data"]["msg"].endswith(f": prod {rel(envs, 'prod', 'model_a')}")


# --- warehouse table ----------------------------------------------------------------------------

TABLE_VARS = "{dbt_defer: {audit_table: true}}"
QUOTED_MODELS = {
    # a relation name with a single quote in it: the insert must escape it
    "models/audit_table/quoted_parent.sql": "{{ config(materialized='view', alias=\"it's_quoted\") }}\nselect 1 as id",
    "models/audit_table/quoted_child.sql": "{{ config(materialized='view') }}\nselect id from {{ ref('quoted_parent') }}",
}


def table_rows(project):
    cols = "invocation_id, target_name, command, node, ref, env, relation, reason, row_limit, cross_environment"
    rows = project.query(f"select {cols}, generated_at from {project.schema('dev')}.dbt_defer_audit")
    return sorted(rows, key=lambda r: (r[0], r[3], r[4]))


def expected_rows(doc):
    meta = doc["metadata"]
    return [
        (meta["invocation_id"], meta["target"], meta["command"], r["node"], r["ref"], r["env"], r["relation"],
         r["reason"], r["limit"], r["cross_environment"])
        for r in doc["resolutions"]
    ]


def test_audit_table_appends_each_run(envs):
    for path, text in QUOTED_MODELS.items():
        envs.write(path, text)
    first = envs.dbt("build", "-s", "model_b", "quoted_parent", "quoted_child", "--vars", TABLE_VARS, env=ENV)
    doc1 = envs.audit()
    assert [m for m in ours(first, "warn") if REL_TEST not in m["msg"]] == []  # only the cross-env warning
    assert any(r["relation"].endswith('."it\'s_quoted"') for r in doc1["resolutions"])
    envs.dbt("compile", "-s", "model_a", "--vars", TABLE_VARS, env=ENV)
    doc2 = envs.audit()

    rows = table_rows(envs)
    want = sorted(expected_rows(doc1) + expected_rows(doc2), key=lambda r: (r[0], r[3], r[4]))
    assert [tuple(r[:10]) for r in rows] == want
    stamps = {r[0]: r[10] for r in rows}
    for doc in (doc1, doc2):
        generated = datetime.strptime(doc["metadata"]["generated_at"], "%Y-%m-%dT%H:%M:%S.%fZ")
        assert stamps[doc["metadata"]["invocation_id"]].replace(tzinfo=None) == generated


def test_no_audit_table_by_default(envs):
    before = len(table_rows(envs)) if envs.relation_exists("dev", "dbt_defer_audit") else 0
    envs.dbt("compile", "-s", "model_a", env=ENV)
    after = len(table_rows(envs)) if envs.relation_exists("dev", "dbt_defer_audit") else 0
    assert after == before


def test_audit_table_failure_warns_and_run_succeeds(envs):
    """An incompatible relation already named dbt_defer_audit: the insert fails, dbt does not."""
    execute(envs, f"create schema if not exists {envs.schema('dev')}")
    execute(envs, f"drop table if exists {envs.schema('dev')}.dbt_defer_audit")
    execute(envs, f"create table {envs.schema('dev')}.dbt_defer_audit (something_else integer)")
    try:
        result = envs.dbt("build", "-s", "model_a", "--vars", TABLE_VARS, env=ENV)  # asserts success
        warnings = [m["msg"] for m in ours(result, "warn") if "audit" in m["msg"]]
        assert len(warnings) == 1
        assert warnings[0].startswith("dbt-defer: could not append the audit to ")
        assert "dbt_defer_audit" in warnings[0] and "the run is not affected" in warnings[0]
        assert "invocation_id" in warnings[0], "the warning gives the database's reason"
        assert result.node_results()[uid("model_a")].status == "success"
        # the artifact is still written, and the summary still ends the run
        assert envs.audit()["metadata"]["invocation_id"] == invocation_id_of_last_run(envs)
        assert re.match(r"dbt-defer: \d+ refs? resolved", ours(result, "info")[-1]["msg"])
        assert envs.query(f"select count(*) from {envs.schema('dev')}.dbt_defer_audit") == [(0,)]
    finally:
        execute(envs, f"drop table if exists {envs.schema('dev')}.dbt_defer_audit")


# --- threads: 8 over a wide project ---------------------------------------------------------------

LAYERS, WIDTH, REFS = 6, 10, 4


def wide_project_source(folder: Path, seed: int = 7) -> Path:
    """LAYERS x WIDTH view models; each model after the first layer refs REFS earlier models (one
    of them twice, and one through the two-argument form); a not_null test on every model; half of
    the models tagged 'work'."""
    rng = random.Random(seed)
    (folder / "models").mkdir(parents=True)
    (folder / "macros").mkdir()
    (folder / "dbt_project.yml").write_text(
        f"name: {PROJECT}\nversion: '1.0'\nconfig-version: 2\nprofile: {PROJECT}\n"
        "model-paths: [models]\nmacro-paths: [macros]\n"
        f"models:\n  {PROJECT}:\n    +materialized: view\n"
    )
    (folder / "packages.yml").write_text("packages:\n  - local: ../\n")
    (folder / "macros" / "ref.sql").write_text(
        "{% macro ref() %}{{ return(dbt_defer.ref(*varargs, **kwargs)) }}{% endmacro %}\n"
    )
    yml = ["version: 2", "models:"]
    names = []
    for layer in range(LAYERS):
        for i in range(WIDTH):
            name = f"m_{layer}_{i}"
            tags = "['work']" if (layer + i) % 2 == 0 else "[]"
            if layer == 0:
                body = f"select {i} as id"
            else:
                parents = rng.sample(names, REFS)
                parts = [f"select id from {{{{ ref('{parents[0]}') }}}}",
                         f"select id from {{{{ ref('{PROJECT}', '{parents[1]}') }}}}"]
                parts += [f"select id from {{{{ ref('{p}') }}}}" for p in parents[2:]]
                parts.append(f"select id from {{{{ ref('{parents[0]}') }}}} where id < 0")
                body = "\nunion all\n".join(parts)
            (folder / "models" / f"{name}.sql").write_text(f"{{{{ config(tags={tags}) }}}}\n{body}\n")
            yml += [f"  - name: {name}", "    columns:", "      - name: id", "        data_tests: [not_null]"]
        names += [f"m_{layer}_{i}" for i in range(WIDTH)]
    (folder / "models" / "_schema.yml").write_text("\n".join(yml) + "\n")
    return folder


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_threads_8_one_record_per_edge(adapter, tmp_path):
    require_adapter(adapter)
    project = make_project(tmp_path, adapter, threads=8, source=wide_project_source(tmp_path / "src"))
    try:
        project.dbt("deps")
        project.dbt("run", "--target", "prod")
        project.save_artifacts("prod-artifacts")
        result = project.dbt("build", "-s", "tag:work", env={"DBT_DEFER": "1", "DBT_DEFER_PROD_STATE": "prod-artifacts"})
        assert "Concurrency: 8 threads" in result.text()

        manifest = json.loads((project.target / "manifest.json").read_text())
        run = json.loads((project.target / "run_results.json").read_text())
        executed = {r["unique_id"] for r in run["results"]}
        selected_models = {u for u in executed if u.startswith("model.")}
        assert len(selected_models) == LAYERS * WIDTH // 2 and len(executed) == 2 * len(selected_models)
        edges = {
            (node, parent)
            for node in executed
            for parent in manifest["nodes"][node]["depends_on"]["nodes"]
        }
        assert len(edges) >= 120

        records = project.audit()["resolutions"]
        keys = [(r["node"], r["ref"]) for r in records]
        assert len(keys) == len(set(keys)), "a (node, ref) pair is recorded twice"
        assert set(keys) == edges, f"lost: {sorted(edges - set(keys))[:5]} extra: {sorted(set(keys) - edges)[:5]}"
        for r in records:
            if r["ref"] in selected_models:
                assert (r["env"], r["reason"]) == ("dev", "selected"), r
            else:
                assert (r["env"], r["reason"]) == ("prod", "deferred"), r
                assert r["relation"] == rel(project, "prod", r["ref"].rsplit(".", 1)[1])
        deferred = sum(1 for r in records if r["env"] == "prod")
        debug = [m for m in ours(result, "debug") if " -> " in m["msg"]]
        assert len(debug) == deferred
        # not built: what dbt build -s +tag:work would also have built, as dbt itself lists it
        listed = lambda sel: set(project.dbt("ls", "-s", sel, "--resource-type", "model", "--output", "json",  # noqa: E731
                                              "--output-keys", "unique_id").raw)
        upstream = sorted(json.loads(line)["unique_id"] for line in listed("+tag:work") - listed("tag:work"))
        assert len(upstream) >= 10
        seconds, _ = expected_savings(project, upstream, chain=("prod",))
        assert project.audit()["summary"] == {
            "dev": len(records) - deferred, "prod": deferred, "limited": 0,
            "not_built": len(upstream), "saved_seconds": seconds,
        }
    finally:
        project.drop_schemas()


# --- issue 17: the audit never changes the run's outcome, and writes only where it may -----------


def add_target(project, name: str, schema: str) -> None:
    """A profile target like dev, writing into ``schema`` (kept for the module: harmless)."""
    import yaml

    path = project.root / "profiles.yml"
    profiles = yaml.safe_load(path.read_text())
    outputs = profiles[PROJECT]["outputs"]
    outputs[name] = {**outputs["dev"], "schema": schema}
    path.write_text(yaml.safe_dump(profiles, sort_keys=False))


def schemas(project) -> list:
    """Every schema of this test project (its prefix), with its relations."""
    if project.adapter == "postgres":
        with pg_connect() as conn, conn.cursor() as cur:
            cur.execute(
                "select n.nspname, c.relname from pg_namespace n left join pg_class c on c.relnamespace = n.oid "
                "and c.relkind in ('r', 'v', 'm', 'p', 'f') where n.nspname like %s",
                (project.schema_prefix + "%",),
            )
            rows = cur.fetchall()
    else:
        release_duckdb()
        with __import__("dbt_harness")._duckdb_connect(project.duckdb_path) as con:
            rows = con.execute(
                "select s.schema_name, t.table_name from information_schema.schemata s left join "
                "information_schema.tables t on t.table_schema = s.schema_name where s.schema_name like ?",
                [project.schema_prefix + "%"],
            ).fetchall()
    out: dict = {}
    for schema, relation in rows:
        out.setdefault(schema, set())
        if relation:
            out[schema].add(relation)
    return out


def test_audit_file_respects_the_umask_like_dbt(tmp_path):
    doc = {"metadata": {}, "environments": [], "resolutions": [], "summary": {}}
    for umask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
        old = os.umask(umask)
        try:
            path = audit.write_document(doc, str(tmp_path / oct(umask)))
        finally:
            os.umask(old)
        assert os.stat(path).st_mode & 0o777 == mode, oct(os.stat(path).st_mode)
        assert os.listdir(os.path.dirname(path)) == [audit.AUDIT_FILE], "no temp file left behind"


def test_audit_file_has_the_permissions_of_dbts_artifacts(build_b):
    project, _ = build_b
    mode = lambda name: (project.target / name).stat().st_mode & 0o777  # noqa: E731
    assert mode("dbt_defer_audit.json") == mode("manifest.json") == mode("run_results.json")


def test_unwritable_audit_file_warns_and_the_run_succeeds(envs):
    """target/dbt_defer_audit.json is a directory: one warning, the summary line, dbt's outcome."""
    blocker = envs.target / "dbt_defer_audit.json"
    blocker.unlink(missing_ok=True)
    blocker.mkdir()
    try:
        result = envs.dbt("run", "-s", "model_a", env=ENV)  # asserts success
        assert result.exception is None and "Traceback" not in result.text()
        assert result.node_results()[uid("model_a")].status == "success"
        [warning] = [m["msg"] for m in ours(result, "warn")]
        assert warning.startswith(f"dbt-defer: could not write the audit file {blocker} (")
        assert "the run is not affected" in warning and "\n" not in warning
        assert re.match(r"dbt-defer: 1 ref resolved", ours(result, "info")[-1]["msg"])
        assert [p.name for p in blocker.iterdir()] == [] and not list(envs.target.glob(".dbt_defer_audit.*"))
    finally:
        blocker.rmdir()


def test_the_audit_step_never_hides_the_runs_own_exception(monkeypatch):
    """dbt raises, then writing the audit fails too: the caller sees dbt's exception."""
    from types import SimpleNamespace

    from dbt_defer import events, patches, session

    logged = []

    class Boom(Exception):
        pass

    class FakeSession:
        merged = True

        def finish(self, error=None):
            raise OSError("disk on fire")

    task = SimpleNamespace(args=SimpleNamespace(defer=True))
    monkeypatch.setattr(session, "config_for_task", lambda t: SimpleNamespace(configured=True))
    monkeypatch.setattr(session.DeferSession, "start", classmethod(lambda cls, t, c: FakeSession()))
    monkeypatch.setattr(events, "log", lambda msg, level=None: logged.append(msg))
    monkeypatch.setitem(patches._ORIGINALS, "run", lambda t: (_ for _ in ()).throw(Boom("the run's own error")))
    with pytest.raises(Boom, match="the run's own error"):
        patches._run(task)
    assert logged == ["dbt-defer: the audit step failed (disk on fire); the run is not affected"]
    assert patches.active_session() is None

    monkeypatch.setitem(patches._ORIGINALS, "run", lambda t: "dbt's result")
    assert patches._run(task) == "dbt's result"  # and a successful run stays successful


def test_refused_run_with_an_unwritable_audit_keeps_its_refusal(envs):
    blocker = envs.target / "dbt_defer_audit.json"
    blocker.unlink(missing_ok=True)
    blocker.mkdir()
    try:
        result = envs.dbt("run", "-s", "model_a", "--vars", "{dbt_defer: {never_defer: ['bogus:x']}}",
                          env=ENV, expect=False)
        assert type(result.exception).__name__ == "DbtRuntimeError", repr(result.exception)
        assert "never_defer selector 'bogus:x'" in str(result.exception)
        assert any(m["msg"].startswith("dbt-defer: could not write the audit file") for m in ours(result, "warn"))
    finally:
        blocker.rmdir()


@pytest.mark.parametrize(
    "vars_, line, environments",
    [
        ("{dbt_defer: {never_defer: ['bogus:x']}}", "never_defer selector 'bogus:x' is not a valid dbt selector",
         ["staging", "prod"]),
        ("{dbt_defer: {limitz: 1}}", "unknown key(s) 'limitz' in vars: dbt_defer", []),
    ],
)
def test_refused_run_replaces_the_previous_audit(envs, vars_, line, environments):
    envs.dbt("compile", "-s", "model_b", env=ENV)
    previous = envs.audit()
    assert previous["resolutions"]
    result = envs.dbt("run", "-s", "model_b", "--vars", vars_, env=ENV, expect=False)
    assert line in str(result.exception)
    doc = envs.audit()
    meta = doc["metadata"]
    assert meta["invocation_id"] != previous["metadata"]["invocation_id"]
    assert meta["status"] == "refused" and meta["command"] == "run"
    assert meta["error"].startswith("dbt-defer: ") and line in meta["error"] and "\n" not in meta["error"]
    assert doc["resolutions"] == [] and doc["summary"] == {"limited": 0, "not_built": 0, "saved_seconds": None}
    assert [e["name"] for e in doc["environments"]] == environments
    # a refused run says nothing at the end (no summary line)
    assert not [m for m in ours(result, "info") if "resolved" in m["msg"]]


def test_a_run_that_selects_nothing_leaves_no_stale_audit(envs):
    envs.dbt("compile", "-s", "model_b", env=ENV)
    previous = envs.audit()
    envs.dbt("compile", "-s", "tag:no_such_tag", env=ENV)
    doc = envs.audit()
    assert doc["metadata"]["invocation_id"] != previous["metadata"]["invocation_id"]
    assert "status" not in doc["metadata"] and doc["resolutions"] == []


def test_explain_writes_nothing_even_with_the_audit_table(envs, capsys):
    """Explain compiles with deferral on; audit_table: true must not create a schema or a table."""
    from dbt_harness import _environment
    from dbt_defer import cli

    fresh = envs.schema("explain")
    add_target(envs, "explain", fresh)
    before = schemas(envs)
    assert fresh not in before
    capsys.readouterr()
    with _environment({k: v for k, v in ENV.items() if k != "DBT_DEFER"}):
        code = cli.main(["explain", "-s", "model_b", "--target", "explain", "--vars", TABLE_VARS,
                         "--project-dir", str(envs.root), "--profiles-dir", str(envs.root), "--output", "json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert {(r["node"], r["ref"]) for r in json.loads(out)["resolutions"]} >= {(uid("model_b"), uid("model_a"))}
    after = schemas(envs)
    assert fresh not in after
    assert after == before


def test_the_audit_table_is_never_written_into_an_environments_schema(envs):
    """A dev target pointed at prod's schema: dbt test runs (it writes nothing), and the audit
    table is not appended into prod's schema: one warning, the run's outcome unchanged."""
    add_target(envs, "devprod", envs.schema("prod"))
    before = schemas(envs)
    assert "dbt_defer_audit" not in before[envs.schema("prod")]
    result = envs.dbt("test", "-s", "model_a", "--target", "devprod", "--vars", TABLE_VARS, env=ENV)
    assert result.node_results() and all(r.status == "pass" for r in result.node_results().values())
    [warning] = [m["msg"] for m in ours(result, "warn") if "audit" in m["msg"]]
    assert warning.startswith("dbt-defer: not appending the audit to ")
    assert envs.schema("prod") in warning and "environment 'prod' records relations in that schema" in warning
    assert schemas(envs) == before
    assert re.match(r"dbt-defer: \d+ refs? resolved", ours(result, "info")[-1]["msg"])
    assert envs.audit()["resolutions"], "the file artifact is still written"


PG_COLUMNS = (
    "invocation_id text, generated_at timestamp, target_name text, command text, node text, ref text, "
    "env text, relation text, reason text, row_limit bigint, cross_environment boolean"
)


def _waiting_on_lock(schema: str) -> bool:
    with pg_connect() as conn, conn.cursor() as cur:
        cur.execute(
            "select count(*) from pg_stat_activity where wait_event_type = 'Lock' and pid <> pg_backend_pid() "
            "and query like %s",
            (f"%{schema}%dbt_defer_audit%",),
        )
        return cur.fetchone()[0] > 0


def test_audit_table_creation_that_loses_a_race_keeps_its_rows(envs):
    """Another invocation is creating the table (uncommitted) when this run creates it: Postgres
    blocks this run's create, then fails it with a duplicate key in pg_type once the other
    commits. The run retries and appends its rows."""
    if envs.adapter != "postgres":
        pytest.skip("the race is in Postgres' catalog")
    import threading

    schema = envs.schema("race")
    add_target(envs, "race", schema)
    execute(envs, f'create schema if not exists "{schema}"')
    other = pg_connect()
    outcome: dict = {}
    try:
        with other.cursor() as cur:  # the other invocation: table created, not committed yet
            cur.execute(f'create table "{schema}".dbt_defer_audit ({PG_COLUMNS})')
        runner = threading.Thread(
            target=lambda: outcome.update(result=envs.dbt(
                "compile", "-s", "model_b", "--target", "race", "--vars", TABLE_VARS, env=ENV, expect=None)),
        )
        runner.start()
        deadline = time.time() + 180
        while not _waiting_on_lock(schema):
            assert runner.is_alive() and time.time() < deadline, "the run never waited on the other creation"
            time.sleep(0.1)
        other.commit()
        runner.join(300)
    finally:
        other.close()
    result = outcome["result"]
    assert result.success, result.text()
    assert [m["msg"] for m in ours(result, "warn") if "audit" in m["msg"]] == []
    doc = envs.audit()
    rows = envs.query(f'select invocation_id, node, ref, env from "{schema}".dbt_defer_audit')
    assert sorted(rows) == sorted(
        (doc["metadata"]["invocation_id"], r["node"], r["ref"], r["env"]) for r in doc["resolutions"]
    ) and rows


def test_concurrent_invocations_creating_the_audit_table_lose_no_rows(envs):
    """N dbt processes at once, the table not there yet: every invocation's rows are in it."""
    if envs.adapter != "postgres":
        pytest.skip("Postgres only (DuckDB allows one writing process)")
    n = 4
    schema = envs.schema("crowd")
    add_target(envs, "crowd", schema)
    dbt = os.path.join(os.path.dirname(sys.executable), "dbt")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DBT_DEFER", "DBT_STATE", "DBT_TARGET"))}
    env.update(ENV, DBT_SEND_ANONYMOUS_USAGE_STATS="false")
    envs.dbt("parse", "--target", "crowd")  # a partial-parse file for all of them
    procs = [
        subprocess.Popen(
            [dbt, "compile", "-s", "model_b", "--target", "crowd", "--vars", TABLE_VARS,
             "--target-path", f"target_crowd_{i}", "--project-dir", str(envs.root), "--profiles-dir", str(envs.root)],
            env=env, cwd=str(envs.root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(n)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-3000:]
        assert "could not append the audit" not in output, output[-3000:]
    expected = []
    for i in range(n):
        doc = json.loads((envs.root / f"target_crowd_{i}" / "dbt_defer_audit.json").read_text())
        assert doc["resolutions"]
        expected += [(doc["metadata"]["invocation_id"], r["node"], r["ref"]) for r in doc["resolutions"]]
    rows = envs.query(f'select invocation_id, node, ref from "{schema}".dbt_defer_audit')
    assert sorted(rows) == sorted(expected)
    assert len({r[0] for r in rows}) == n
