"""Integration tests of SPEC §2–§4 on DuckDB and Postgres: real dbt, real warehouse.

The shared ``envs`` project (per adapter) has prod built in full and staging built in part:
raw_customers, raw_orders, stg_customers, stg_orders and orders only. Tests that only read the
shared project reset its dev schema first (``clean_dev``); tests that edit files or rebuild an
environment get a ``fresh`` project of their own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from conftest import built_environments
from dbt_harness import REPO, make_project, pg_connect

CHAIN = {
    "DBT_DEFER": "1",
    "DBT_DEFER_STAGING_STATE": "staging-artifacts",
    "DBT_DEFER_PROD_STATE": "prod-artifacts",
}
PROJECT = "dbt_defer_integration_tests"
KINDS = ("model.", "seed.", "snapshot.")


# --- helpers -------------------------------------------------------------------------------------


def rel(p, env: str, name: str) -> str:
    """A relation as dbt renders it into SQL on both adapters."""
    return f'"{p.database}"."{p.schema(env)}"."{name}"'


def execute(p, sql: str) -> None:
    """Run a statement against the project's warehouse (outside dbt)."""
    if p.adapter == "postgres":
        conn = pg_connect()
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
            conn.commit()
        finally:
            conn.close()
        return
    import duckdb

    with duckdb.connect(str(p.duckdb_path)) as con:
        con.execute(sql)


def reset_dev(p) -> None:
    execute(p, f'drop schema if exists "{p.schema("dev")}" cascade')
    assert p.list_relations("dev") == []


def dbt(p, *args, env=None, expect=True):
    """dbt with the chain configured (staging then prod); a stale audit file never survives."""
    audit = p.target / "dbt_defer_audit.json"
    if audit.exists():
        audit.unlink()
    return p.dbt(*args, env=CHAIN if env is None else env, expect=expect)


def record(p, node: str, ref: str, node_kind: str = "model") -> dict:
    res = p.resolutions()
    key = (p.uid(node, node_kind), ref if ref.startswith(KINDS) else p.uid(ref))
    assert key in res, f"no audit record for {key}; have {sorted(res)}"
    return res[key]


def assert_resolved(p, node, ref, env, reason, relation_env=None, relation_name=None, node_kind="model"):
    r = record(p, node, ref, node_kind)
    assert (r["env"], r["reason"]) == (env, reason), r
    name = relation_name or (ref.split(".")[-1] if ref.startswith(KINDS) else ref)
    assert r["relation"] == rel(p, relation_env or env, name), r
    return r


def data_test_uid(p, prefix: str) -> str:
    """unique_id of the one test node whose id starts with ``prefix`` (from the compiled manifest)."""
    nodes = json.loads((p.target / "manifest.json").read_text())["nodes"]
    found = [uid for uid in nodes if uid.startswith(f"test.{PROJECT}.{prefix}")]
    assert len(found) == 1, found
    return found[0]


def manifest_nodes(p, folder: str) -> dict:
    return json.loads((p.root / folder / "manifest.json").read_text())["nodes"]


def count(p, env: str, name: str) -> int:
    return p.query(f'select count(*) from "{p.schema(env)}"."{name}"')[0][0]


@pytest.fixture
def clean_dev(envs):
    reset_dev(envs)
    return envs


@pytest.fixture
def leftover_dev(envs):
    """The shared project whose dev schema holds exactly one leftover: an unchanged stg_customers."""
    if envs.list_relations("dev") != ["stg_customers"]:
        reset_dev(envs)
        dbt(envs, "run", "-s", "stg_customers")
        assert envs.list_relations("dev") == ["stg_customers"]
    return envs


@pytest.fixture
def fresh(envs, tmp_path):
    """A project of its own (same adapter as ``envs``): prod in full, staging in part."""
    p = make_project(tmp_path, envs.adapter)
    built_environments(p)
    yield p
    p.drop_schemas()


# --- 1. ephemeral, 2. selected ----------------------------------------------------------------


def test_ephemeral_is_never_deferred(clean_dev):
    p = clean_dev
    dbt(p, "run", "-s", "customers")
    r = record(p, "customers", "int_order_totals")
    assert (r["env"], r["reason"], r["relation"]) == ("ephemeral", "ephemeral", "__dbt__cte__int_order_totals")
    sql = p.compiled("models/marts/customers.sql")
    assert "with __dbt__cte__int_order_totals as" in sql
    assert "int_order_totals\"" not in sql  # never a relation, in any schema
    # the ephemeral model's own refs go through the chain
    assert_resolved(p, "int_order_totals", "stg_orders", "staging", "deferred")
    assert rel(p, "staging", "stg_orders") in sql
    assert p.query(f'select sum(order_count) from "{p.schema("dev")}"."customers"')[0][0] == count(
        p, "prod", "stg_orders"
    )


def test_selected_resolves_to_dev(clean_dev):
    p = clean_dev
    dbt(p, "run", "-s", "stg_customers", "customers")
    assert_resolved(p, "customers", "stg_customers", "dev", "selected")
    assert rel(p, "dev", "stg_customers") in p.compiled("models/marts/customers.sql")
    # the selected parent reads its own unselected parent through the chain
    assert_resolved(p, "stg_customers", p.uid("raw_customers", "seed"), "staging", "deferred")
    assert p.list_relations("dev") == ["customers", "stg_customers"]
    assert count(p, "dev", "customers") == count(p, "prod", "customers")


# --- 3. restricted -----------------------------------------------------------------------------


def test_restricted_reads_only_dev(clean_dev):
    p = clean_dev
    res = dbt(p, "run", "-s", "pii_report", expect=False)
    text = res.text()
    assert "pii_emails" in text and "restricted" in text and f'{p.schema("dev")}' in text
    assert not p.relation_exists("dev", "pii_report")  # failed before executing; prod was not read
    dbt(p, "run", "-s", "pii_emails")
    for extra in ([], ["--favor-state"]):
        dbt(p, "run", "-s", "pii_report", *extra)
        assert_resolved(p, "pii_report", "pii_emails", "dev", "restricted")
        assert rel(p, "dev", "pii_emails") in p.compiled("models/restricted/pii_report.sql")


# --- 4. dev relations -------------------------------------------------------------------------


def test_leftover_dev_relation_is_used_by_default(leftover_dev):
    p = leftover_dev
    dbt(p, "compile", "-s", "customers")
    assert_resolved(p, "customers", "stg_customers", "dev", "dev_exists")
    assert rel(p, "dev", "stg_customers") in p.compiled("models/marts/customers.sql")
    # stg_orders has no dev relation: the chain serves it
    assert_resolved(p, "int_order_totals", "stg_orders", "staging", "deferred")


@pytest.mark.parametrize(
    "how, args, extra_env",
    [
        ("always via env var", [], {"DBT_DEFER_DEV_RELATIONS": "always"}),
        ("env var overrides var never", ["--vars", "{dbt_defer: {dev_relations: never}}"],
         {"DBT_DEFER_DEV_RELATIONS": "always"}),
    ],
)
def test_dev_relations_always(leftover_dev, how, args, extra_env):
    p = leftover_dev
    dbt(p, "compile", "-s", "customers", *args, env={**CHAIN, **extra_env})
    assert_resolved(p, "customers", "stg_customers", "dev", "dev_exists")


@pytest.mark.parametrize(
    "how, args, extra_env",
    [
        ("--favor-state", ["--favor-state"], {}),
        ("DBT_FAVOR_STATE=1", [], {"DBT_FAVOR_STATE": "1"}),
        ("DBT_DEFER_DEV_RELATIONS=never", [], {"DBT_DEFER_DEV_RELATIONS": "never"}),
        ("var dev_relations: never", ["--vars", "{dbt_defer: {dev_relations: never}}"], {}),
        ("env var overrides var always", ["--vars", "{dbt_defer: {dev_relations: always}}"],
         {"DBT_DEFER_DEV_RELATIONS": "never"}),
        ("--favor-state wins over DBT_DEFER_DEV_RELATIONS", ["--favor-state"], {"DBT_DEFER_DEV_RELATIONS": "always"}),
    ],
)
def test_dev_relations_never(leftover_dev, how, args, extra_env):
    p = leftover_dev
    dbt(p, "run", "-s", "customers", *args, env={**CHAIN, **extra_env})
    assert_resolved(p, "customers", "stg_customers", "staging", "deferred")
    sql = p.compiled("models/marts/customers.sql")
    assert rel(p, "staging", "stg_customers") in sql and rel(p, "dev", "stg_customers") not in sql


def test_dev_relations_modified_ignores_an_unchanged_leftover(leftover_dev):
    p = leftover_dev
    dbt(p, "compile", "-s", "customers", env={**CHAIN, "DBT_DEFER_DEV_RELATIONS": "modified"})
    assert_resolved(p, "customers", "stg_customers", "staging", "deferred")
    assert rel(p, "dev", "stg_customers") not in p.compiled("models/marts/customers.sql")


def test_dev_relations_modified_uses_changed_nodes_only(fresh):
    p = fresh
    # code change: stg_customers; config-only change (yml): stg_orders; unchanged: customers
    p.write(
        "models/staging/stg_customers.sql",
        p.read("models/staging/stg_customers.sql").replace("first_name,", "upper(first_name) as first_name,"),
    )
    p.write(
        "models/staging/_staging.yml",
        "version: 2\nmodels:\n  - name: stg_orders\n    config:\n      tags: ['edited']\n",
    )
    dbt(p, "run", "-s", "stg_customers", "stg_orders", "customers")
    assert p.list_relations("dev") == ["customers", "stg_customers", "stg_orders"]

    modified = {**CHAIN, "DBT_DEFER_DEV_RELATIONS": "modified"}
    dbt(p, "run", "-s", "model_a", "orders", "customer_report", env=modified)
    assert_resolved(p, "model_a", "stg_customers", "dev", "dev_modified")
    assert_resolved(p, "orders", "stg_orders", "dev", "dev_modified")
    # customers is unchanged: its leftover dev relation is ignored (staging never built it -> prod)
    assert_resolved(p, "customer_report", "customers", "prod", "deferred")
    assert rel(p, "prod", "customers") in p.compiled("models/marts/customer_report.sql")
    assert rel(p, "dev", "stg_customers") in p.compiled("models/docs_example/model_a.sql")
    # the dev data really is the developer's version
    names = {r[0] for r in p.query(f'select first_name from "{p.schema("dev")}"."stg_customers"')}
    assert names and all(n == n.upper() for n in names)

    # same state, default policy: every leftover is used
    dbt(p, "compile", "-s", "customer_report")
    assert_resolved(p, "customer_report", "customers", "dev", "dev_exists")


# --- 5. the chain -----------------------------------------------------------------------------


def test_node_in_staging_manifest_but_never_built_there_falls_through_to_prod(clean_dev):
    p = clean_dev
    assert f"model.{PROJECT}.customers" in manifest_nodes(p, "staging-artifacts")
    assert not p.relation_exists("staging", "customers")
    dbt(p, "run", "-s", "customer_report")
    assert_resolved(p, "customer_report", "customers", "prod", "deferred")
    assert rel(p, "prod", "customers") in p.compiled("models/marts/customer_report.sql")
    assert count(p, "dev", "customer_report") == count(p, "prod", "customer_report") > 0


def test_errored_node_in_staging_falls_through_to_prod(fresh):
    p = fresh
    # orders was built in staging; a later staging run of orders errors (the old table stays behind)
    p.dbt("run", "--target", "staging", "-s", "orders", "--vars", "{break_orders: true}", expect=False)
    p.save_artifacts("staging-artifacts")
    results = json.loads((p.root / "staging-artifacts" / "run_results.json").read_text())["results"]
    assert [(r["unique_id"], r["status"]) for r in results] == [(p.uid("orders"), "error")]
    assert p.relation_exists("staging", "orders")
    execute(p, f'delete from "{p.schema("staging")}"."orders" where order_id > 2')  # make it tell-tale

    p.write("models/marts/order_count.sql", "select count(*) as n from {{ ref('orders') }}\n")
    dbt(p, "run", "-s", "order_count")
    assert_resolved(p, "order_count", "orders", "prod", "deferred")
    assert rel(p, "prod", "orders") in p.compiled("models/marts/order_count.sql")
    assert p.query(f'select n from "{p.schema("dev")}"."order_count"')[0][0] == count(p, "prod", "orders") == 8


def test_relationships_test_reads_unbuilt_parent_from_the_chain(clean_dev):
    """The model_a/model_b example of dbt's defer docs, across the chain."""
    p = clean_dev
    dbt(p, "run", "-s", "model_b")
    assert_resolved(p, "model_b", "model_a", "prod", "deferred")
    assert p.list_relations("dev") == ["model_b"]

    res = dbt(p, "test", "-s", "model_b")
    test_id = data_test_uid(p, "relationships_model_b_id__id__ref_model_a_")
    statuses = {uid: str(r.status) for uid, r in res.node_results().items()}
    assert statuses == {test_id: "pass"}
    res = p.resolutions()
    assert (res[(test_id, p.uid("model_a"))]["env"], res[(test_id, p.uid("model_a"))]["reason"]) == (
        "prod",
        "deferred",
    )
    assert res[(test_id, p.uid("model_a"))]["relation"] == rel(p, "prod", "model_a")
    assert res[(test_id, p.uid("model_b"))]["env"] == "dev"
    assert res[(test_id, p.uid("model_b"))]["relation"] == rel(p, "dev", "model_b")
    compiled = next((p.target / "compiled" / PROJECT / "models" / "docs_example").rglob("relationships_*.sql"))
    sql = compiled.read_text()
    assert rel(p, "prod", "model_a") in sql and rel(p, "dev", "model_b") in sql


# --- 6. nothing found -------------------------------------------------------------------------


def test_new_model_warning_names_child_parent_places_and_fix(fresh):
    """SPEC §4.6: dbt's own relation is rendered; the warehouse error comes with our warning."""
    p = fresh
    p.write("models/new/new_parent.sql", "select 1 as id\n")
    p.write("models/new/new_child.sql", "select id from {{ ref('new_parent') }}\n")
    res = dbt(p, "run", "-s", "new_child", expect=False)
    text = "\n".join(m["msg"] for m in res.messages if m["level"] == "warn")
    assert f"model.{PROJECT}.new_child" in text
    assert f"model.{PROJECT}.new_parent" in text
    assert f'dev: {p.database}.{p.schema("dev")}.new_parent does not exist' in text
    assert "staging: no enabled model/seed/snapshot" in text and str(p.root / "staging-artifacts") in text
    assert "prod: no enabled model/seed/snapshot" in text and str(p.root / "prod-artifacts") in text
    assert "+new_child" in text
    assert not p.relation_exists("dev", "new_child")
    statuses = {uid: str(r.status) for uid, r in res.node_results().items()}
    assert statuses == {p.uid("new_child"): "error"}

    # compile builds nothing, so selecting the parent there renders it in dev (as dbt would)
    dbt(p, "compile", "-s", "new_parent", "new_child")
    assert_resolved(p, "new_child", "new_parent", "dev", "selected")
    # the fix the message suggests works
    dbt(p, "run", "-s", "+new_child")
    assert_resolved(p, "new_child", "new_parent", "dev", "selected")
    assert p.list_relations("dev") == ["new_child", "new_parent"]


# --- slim CI ----------------------------------------------------------------------------------


def test_slim_ci_builds_modified_plus_and_defers_the_rest(fresh):
    p = fresh
    p.write(
        "models/marts/customers.sql",
        p.read("models/marts/customers.sql").replace(
            "coalesce(t.total_amount, 0) as total_amount",
            "coalesce(t.total_amount, 0) as total_amount, 'ci' as built_by",
        ),
    )
    listed = p.dbt(
        "ls", "-s", "state:modified+", "--state", "prod-artifacts", "--output", "json",
        "--output-keys", "unique_id", env={},
    ).raw
    expected = {json.loads(line)["unique_id"] for line in listed}
    assert {p.uid("customers"), p.uid("customer_report")} <= expected
    assert p.uid("stg_customers") not in expected and p.uid("dim_customers.v1") not in expected

    res = dbt(p, "build", "-s", "state:modified+", "--state", "prod-artifacts", "--target", "ci")
    assert set(res.node_results()) == expected
    assert all(str(r.status) in ("success", "pass") for r in res.node_results().values())
    assert p.uid("assert_totals_not_negative", "test") in expected
    built = sorted(uid.split(".")[-1] for uid in expected if uid.startswith(("model.", "snapshot.", "seed.")))
    assert p.list_relations("dev") == built  # only modified+ was built in dev

    audit = p.audit()
    assert [e["name"] for e in audit["environments"]] == ["staging", "prod"]
    assert_resolved(p, "customers", "stg_customers", "staging", "deferred")
    assert_resolved(p, "int_order_totals", "stg_orders", "staging", "deferred")
    # records of the current target carry the running target's name (SPEC §3): ci, in dev's schema
    assert_resolved(p, "customer_report", "customers", "ci", "selected", relation_env="dev")
    assert_resolved(p, "customer_report", "dim_customers.v1", "prod", "deferred", relation_name="dim_customers_v1")
    assert_resolved(p, "customer_report", "model.shop_calendar.calendar_years", "prod", "deferred")
    assert_resolved(p, "assert_totals_not_negative", "customers", "ci", "selected", relation_env="dev", node_kind="test")
    assert list(audit["summary"])[:3] == ["ci", "staging", "prod"]
    assert p.query(f'select distinct built_by from "{p.schema("dev")}"."customers"') == [("ci",)]
    assert count(p, "dev", "customer_report") == count(p, "prod", "customer_report")


# --- versions, two-argument refs, packages ------------------------------------------------------


def test_versioned_two_argument_and_package_refs(clean_dev):
    p = clean_dev
    dbt(p, "run", "-s", "orders", "customer_report")
    assert_resolved(p, "orders", "stg_orders", "staging", "deferred")  # ref('pkg', 'name')
    assert_resolved(p, "customer_report", "dim_customers.v1", "prod", "deferred", relation_name="dim_customers_v1")
    assert_resolved(p, "customer_report", "model.shop_calendar.calendar_years", "prod", "deferred")
    sql = p.compiled("models/marts/customer_report.sql")
    assert rel(p, "prod", "dim_customers_v1") in sql and "dim_customers_v2" not in sql
    assert rel(p, "prod", "calendar_years") in sql
    assert rel(p, "staging", "stg_orders") in p.compiled("models/marts/orders.sql")
    assert count(p, "dev", "orders") == count(p, "prod", "orders")


# --- every command ----------------------------------------------------------------------------


def test_build_defers_parents_and_tests_read_the_selected_model(clean_dev):
    p = clean_dev
    res = dbt(p, "build", "-s", "customers")
    assert all(str(r.status) in ("success", "pass") for r in res.node_results().values())
    assert_resolved(p, "customers", "stg_customers", "staging", "deferred")
    unique = data_test_uid(p, "unique_customers_customer_id")
    r = p.resolutions()[(unique, p.uid("customers"))]
    assert (r["env"], r["reason"], r["relation"]) == ("dev", "selected", rel(p, "dev", "customers"))


def test_generic_and_singular_tests_defer(clean_dev):
    p = clean_dev
    res = dbt(p, "test", "-s", "customers")
    assert {str(r.status) for r in res.node_results().values()} == {"pass"}
    unique = data_test_uid(p, "unique_customers_customer_id")
    assert_resolved(p, unique.split(".", 2)[2], "customers", "prod", "deferred", node_kind="test")
    assert_resolved(p, "assert_totals_not_negative", "customers", "prod", "deferred", node_kind="test")
    compiled = p.target / "compiled" / PROJECT / "tests" / "assert_totals_not_negative.sql"
    assert rel(p, "prod", "customers") in compiled.read_text()


def test_compile(clean_dev):
    p = clean_dev
    dbt(p, "compile", "-s", "customers", "model_a")
    assert_resolved(p, "customers", "stg_customers", "staging", "deferred")
    assert_resolved(p, "model_a", "stg_customers", "staging", "deferred")
    assert rel(p, "staging", "stg_customers") in p.compiled("models/docs_example/model_a.sql")
    # compile builds nothing: a selected model that is not in dev is read from the chain
    unique = data_test_uid(p, "unique_customers_customer_id")
    r = p.resolutions()[(unique, p.uid("customers"))]
    assert (r["env"], r["reason"], r["relation"]) == ("prod", "deferred", rel(p, "prod", "customers"))
    assert p.list_relations("dev") == []
    # ... and from dev once it is there
    dbt(p, "run", "-s", "customers")
    dbt(p, "compile", "-s", "customers", "--favor-state")
    r = p.resolutions()[(unique, p.uid("customers"))]
    assert (r["env"], r["reason"], r["relation"]) == ("dev", "selected", rel(p, "dev", "customers"))


def test_seed_then_chain_prefers_the_dev_seed(clean_dev):
    p = clean_dev
    dbt(p, "seed", "-s", "raw_customers")
    assert p.audit()["metadata"]["command"] == "seed"
    assert p.audit()["resolutions"] == []
    assert p.list_relations("dev") == ["raw_customers"]
    dbt(p, "run", "-s", "stg_customers")
    assert_resolved(p, "stg_customers", p.uid("raw_customers", "seed"), "dev", "dev_exists")
    assert rel(p, "dev", "raw_customers") in p.compiled("models/staging/stg_customers.sql")


def test_snapshot(clean_dev):
    p = clean_dev
    dbt(p, "snapshot")
    assert_resolved(p, "customers_snapshot", "stg_customers", "staging", "deferred", node_kind="snapshot")
    run_path = p.target / "run" / PROJECT / "snapshots" / "customers_snapshot.sql"
    # dbt >= 1.12 writes a folder of that name holding the snapshot's statements
    run_sql = ("".join(f.read_text() for f in sorted(run_path.rglob("*.sql")) if f.is_file())
               if run_path.is_dir() else run_path.read_text())
    assert rel(p, "staging", "stg_customers") in run_sql
    assert count(p, "dev", "customers_snapshot") == count(p, "staging", "stg_customers")


def test_show(clean_dev):
    p = clean_dev
    res = dbt(p, "show", "-s", "customers")
    assert_resolved(p, "customers", "stg_customers", "staging", "deferred")
    preview = next(r for uid, r in res.node_results().items() if uid == p.uid("customers"))
    assert sorted(row["first_name"] for row in preview.agate_table.rows) == sorted(
        r[0] for r in p.query(f'select first_name from "{p.schema("staging")}"."stg_customers"')
    )
    # show builds nothing: its selected tests read customers from where it exists (prod), not dev
    unique = data_test_uid(p, "unique_customers_customer_id")
    r = p.resolutions()[(unique, p.uid("customers"))]
    assert (r["env"], r["reason"], r["relation"]) == ("prod", "deferred", rel(p, "prod", "customers"))
    assert p.list_relations("dev") == []


def test_docs_generate(clean_dev):
    p = clean_dev
    dbt(p, "docs", "generate", "-s", "customers")
    assert_resolved(p, "customers", "stg_customers", "staging", "deferred")
    assert rel(p, "staging", "stg_customers") in p.compiled("models/marts/customers.sql")
    assert (p.target / "catalog.json").exists()


# --- §2, §3 through dbt -------------------------------------------------------------------------

WRAPPER = textwrap.dedent(
    """
    import importlib, json, os, pkgutil, sys

    mode, argv = sys.argv[1], sys.argv[2:]
    if mode == "without":  # the plugin is not discoverable
        plugin_dir = os.path.realpath(os.path.join(REPO, "plugin"))
        sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != plugin_dir]
        from dbt.plugins.manager import PluginManager

        def get_prefixed_modules(cls):
            return {
                name: importlib.import_module(name)
                for _, name, _ in pkgutil.iter_modules()
                if name.startswith(cls.PLUGIN_MODULE_PREFIX) and name != "dbt_defer"
            }

        PluginManager.get_prefixed_modules = classmethod(get_prefixed_modules)

    from dbt.cli.main import cli

    sys.argv = ["dbt", *argv]
    try:
        code = cli()
    except SystemExit as exc:
        code = exc.code
    print("WRAPPER " + json.dumps({"code": code, "loaded": "dbt_defer" in sys.modules}))
    sys.exit(code)
    """
).replace("REPO", repr(str(REPO)))


def _subprocess_dbt(p, wrapper: Path, mode: str, *args: str):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DBT_DEFER", "DBT_STATE", "DBT_FAVOR"))}
    env["DBT_SEND_ANONYMOUS_USAGE_STATS"] = "false"
    argv = [*args, "--project-dir", str(p.root), "--profiles-dir", str(p.root)]
    proc = subprocess.run(
        [sys.executable, str(wrapper), mode, *argv], cwd=p.root, env=env, capture_output=True, text=True, timeout=300
    )
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("WRAPPER ")]
    assert line, proc.stdout[-3000:] + proc.stderr[-3000:]
    info = json.loads(line[-1][len("WRAPPER "):])
    assert info["code"] == proc.returncode
    info["output"] = proc.stdout[-4000:] + proc.stderr[-2000:]
    return info


def _release_duckdb(p) -> None:
    """dbt-duckdb keeps its database open in-process; a subprocess needs the file lock."""
    if p.adapter != "duckdb":
        return
    import gc

    from dbt.adapters.duckdb.connections import DuckDBConnectionManager

    DuckDBConnectionManager.close_all_connections()
    gc.collect()


def _compiled_files(folder: Path) -> dict:
    # dbt >= 1.12 writes a snapshot's SQL into a folder named like the file: files only
    return {str(f.relative_to(folder)): f.read_text() for f in sorted(folder.rglob("*.sql")) if f.is_file()}


def _exit_code(result) -> int:
    """dbt's CLI exit codes: 0 success, 1 failure, 2 exception."""
    return 0 if result.success else (2 if result.exception is not None else 1)


def test_deferral_off_is_inert(clean_dev, tmp_path):
    """Deferral off: same compiled SQL, exit codes and run results as with the plugin not discoverable."""
    from dbt.task.runnable import GraphRunnableTask

    from dbt_defer import patches

    p = clean_dev
    wrapper = tmp_path / "run_wrapped.py"  # not dbt_*: dbt would import it as a plugin
    wrapper.write_text(WRAPPER)
    assert GraphRunnableTask.run is patches._run  # in this process the plugin is installed and active

    def snapshot_outputs(compile_code, run_code):
        results = json.loads((p.target / "run_results.json").read_text())["results"]
        assert not (p.target / "dbt_defer_audit.json").exists()
        return (
            compile_code,
            run_code,
            sorted((r["unique_id"], r["status"]) for r in results),
            compiled,
        )

    def reset_target():
        shutil.rmtree(p.target / "compiled", ignore_errors=True)
        (p.target / "dbt_defer_audit.json").unlink(missing_ok=True)

    # with the plugin (in-process, deferral off)
    reset_target()
    compile_code = _exit_code(p.dbt("compile", env={}, expect=None))
    compiled = _compiled_files(p.target / "compiled")
    # a failing run too: dev has no raw_customers, so stg_customers errors without deferral
    run_code = _exit_code(p.dbt("run", "-s", "stg_customers", env={}, expect=None))
    with_plugin = snapshot_outputs(compile_code, run_code)

    # without the plugin (subprocess where dbt cannot discover dbt_defer)
    _release_duckdb(p)
    reset_target()
    compile_info = _subprocess_dbt(p, wrapper, "without", "compile")
    assert compile_info["loaded"] is False, compile_info
    compiled = _compiled_files(p.target / "compiled")
    run_info = _subprocess_dbt(p, wrapper, "without", "run", "-s", "stg_customers")
    without_plugin = snapshot_outputs(compile_info["code"], run_info["code"])

    assert with_plugin[:3] == without_plugin[:3] == (0, 1, [(p.uid("stg_customers"), "error")])
    assert len(with_plugin[3]) > 10
    assert with_plugin[3] == without_plugin[3]
    # no deferral: refs compile to the dev target
    assert rel(p, "dev", "stg_customers") in with_plugin[3][f"{PROJECT}/models/marts/customers.sql"]
    assert p.list_relations("dev") == []


def test_defer_without_any_environment_gives_dbts_own_error(clean_dev):
    p = clean_dev
    res = dbt(p, "run", "-s", "customers", env={"DBT_DEFER": "1"}, expect=False)
    assert "--state or --defer-state are required" in res.text()
    assert not (p.target / "dbt_defer_audit.json").exists()
    assert p.list_relations("dev") == []


def test_defer_with_state_alone_is_the_single_prod_environment(clean_dev):
    p = clean_dev
    dbt(p, "run", "-s", "customers", "--defer", "--state", "prod-artifacts", env={})
    audit = p.audit()
    assert [(e["name"], e["state"]) for e in audit["environments"]] == [("prod", str(p.root / "prod-artifacts"))]
    # staging holds stg_customers, but it is not in this chain
    assert_resolved(p, "customers", "stg_customers", "prod", "deferred")
    assert rel(p, "prod", "stg_customers") in p.compiled("models/marts/customers.sql")


def test_defer_state_wins_over_state_and_vars_chain_is_read(clean_dev):
    p = clean_dev
    dbt(
        p, "compile", "-s", "customers", "--defer", "--defer-state", "staging-artifacts",
        "--state", "prod-artifacts", env={},
    )
    assert [e["name"] for e in p.audit()["environments"]] == ["prod"]
    assert p.audit()["environments"][0]["state"] == str(p.root / "staging-artifacts")
    assert_resolved(p, "customers", "stg_customers", "prod", "deferred", relation_env="staging")

    chain_vars = (
        "{dbt_defer: {environments: [{name: qa, state: staging-artifacts}, {name: prod, state: prod-artifacts}]}}"
    )
    dbt(p, "compile", "-s", "customers", "--vars", chain_vars, env={"DBT_DEFER": "1"})
    assert [e["name"] for e in p.audit()["environments"]] == ["qa", "prod"]
    assert_resolved(p, "customers", "stg_customers", "qa", "deferred", relation_env="staging")
    assert_resolved(p, "int_order_totals", "stg_orders", "qa", "deferred",
                    relation_env="staging")

    # an empty DBT_DEFER_<NAME>_STATE skips that environment
    dbt(p, "compile", "-s", "customers", env={**CHAIN, "DBT_DEFER_STAGING_STATE": ""})
    assert [e["name"] for e in p.audit()["environments"]] == ["prod"]
    assert_resolved(p, "customers", "stg_customers", "prod", "deferred")


@pytest.mark.parametrize("value, on", [("1", True), ("true", True), ("0", False), ("false", False)])
def test_dbt_defer_values_follow_dbt(clean_dev, value, on):
    p = clean_dev
    dbt(p, "compile", "-s", "customers", env={**CHAIN, "DBT_DEFER": value})
    audit = p.target / "dbt_defer_audit.json"
    assert audit.exists() == on
    env = "staging" if on else "dev"
    assert rel(p, env, "stg_customers") in p.compiled("models/marts/customers.sql")


def test_state_may_be_the_manifest_file_itself(clean_dev):
    p = clean_dev
    env = {**CHAIN, "DBT_DEFER_STAGING_STATE": "staging-artifacts/manifest.json"}
    dbt(p, "compile", "-s", "customers", "customer_report", env=env)
    assert p.audit()["environments"][0]["state"] == str(p.root / "staging-artifacts" / "manifest.json")
    assert_resolved(p, "customers", "stg_customers", "staging", "deferred")
    assert_resolved(p, "customer_report", "customers", "prod", "deferred")


# --- cost ---------------------------------------------------------------------------------------


def test_at_most_one_metadata_query_per_schema(clean_dev, monkeypatch):
    p = clean_dev
    if p.adapter == "postgres":
        from dbt.adapters.postgres import PostgresAdapter as adapter_class
    else:
        from dbt.adapters.duckdb import DuckDBAdapter as adapter_class
    original = adapter_class.list_relations_without_caching
    calls = Counter()

    def counting(self, schema_relation):
        calls[((schema_relation.database or "").lower(), (schema_relation.schema or "").lower())] += 1
        return original(self, schema_relation)

    monkeypatch.setattr(adapter_class, "list_relations_without_caching", counting)
    res = dbt(p, "build", "-s", "marts", "docs_example", "--threads", "4")
    assert all(str(r.status) in ("success", "pass") for r in res.node_results().values())
    summary = p.audit()["summary"]
    assert summary.get("staging", 0) >= 2 and summary.get("prod", 0) >= 1, summary
    schemas = {s for (_, s) in calls}
    assert {p.schema("staging"), p.schema("prod")} <= schemas, calls
    assert max(calls.values()) <= 1, calls


# --- the root shim (SPEC §1) ---------------------------------------------------------------------


def test_missing_shim_is_reported_once_and_refs_still_follow_the_chain(clean_dev):
    p = clean_dev
    shim = p.root / "macros" / "ref.sql"
    saved = shim.read_text()
    shim.unlink()
    try:
        result = dbt(p, "run", "-s", "customers", "customer_report")
        warnings = [m for m in result.messages if "no ref shim" in m["msg"]]
        assert len(warnings) == 1, warnings
        assert warnings[0]["level"] == "warn"
        assert "{% macro ref() %}{{ return(dbt_defer.ref(*varargs, **kwargs)) }}{% endmacro %}" in warnings[0]["msg"]
        assert_resolved(p, "customers", "stg_customers", "staging", "deferred")
    finally:
        shim.write_text(saved)
    result = dbt(p, "run", "-s", "customers")
    assert not [m for m in result.messages if "no ref shim" in m["msg"]]
    assert_resolved(p, "customers", "stg_customers", "staging", "deferred")
