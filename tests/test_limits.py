"""Environment-specific limits (SPEC §6): by running target, per referenced model (meta), not in
data tests unless limit_tests, never on dev/selected/ephemeral/restricted refs; dbt's --empty and
--sample win. Real dbt runs on DuckDB and Postgres (Postgres needs the subquery alias).
"""

from __future__ import annotations

import json

import pytest
from dbt.version import __version__ as dbt_version

from test_audit import ENV, NEVER_DEV, REL_TEST, ours, rel, uid

LIMIT_VARS = "{dbt_defer: {limits: {dev: 2}}}"
FILES = {
    # raw_customers: never limited; raw_orders: 3 rows; stg_orders has an event_time (for --sample)
    "seeds/_limits.yml": """
version: 2
seeds:
  - name: raw_customers
    config:
      meta: {dbt_defer: {limit: null}}
  - name: raw_orders
    config:
      meta: {dbt_defer: {limit: 3}}
""",
    "models/limits/_limits.yml": """
version: 2
models:
  - name: stg_orders
    config:
      event_time: order_date
""",
    "models/limits/lim_customers.sql": "{{ config(materialized='table') }}\nselect * from {{ ref('stg_customers') }}",
    "models/limits/lim_raw_customers.sql": "{{ config(materialized='table') }}\nselect * from {{ ref('raw_customers') }}",
    "models/limits/lim_raw_orders.sql": "{{ config(materialized='table') }}\nselect * from {{ ref('raw_orders') }}",
    "models/limits/lim_stg_orders.sql": "{{ config(materialized='table') }}\nselect * from {{ ref('stg_orders') }}",
    "models/limits/lim_child.sql": "{{ config(materialized='view') }}\nselect * from {{ ref('lim_customers') }}",
}


def with_vars(**settings) -> str:
    return json.dumps({"dbt_defer": settings})


def count(project, name: str) -> int:
    return project.query(f"select count(*) from {project.schema('dev')}.{name}")[0][0]


def limited_sql(project, env: str, name: str, n: int) -> str:
    """What dbt's relation limit renders: Postgres requires an alias on the subquery."""
    alias = f" _dbt_limit_subq_{name}" if project.adapter == "postgres" else ""
    return f"(select * from {rel(project, env, name)} limit {n}){alias}"


def compiled_of(project, node: str) -> str:
    manifest = json.loads((project.target / "manifest.json").read_text())
    return (project.root / manifest["nodes"][node]["compiled_path"]).read_text()


@pytest.fixture(scope="module")
def lim(envs):
    """The limited dev build of models/limits, after an unlimited dev build of the models that later
    compiles select (a compile reads a selected node that is not in dev from the chain) and of the
    restricted pii_emails (read from dev only)."""
    for path, text in FILES.items():
        envs.write(path, text.lstrip())
    envs.dbt("run", "-s", "pii_emails", "model_a", "model_b", "customers", env=ENV)
    result = envs.dbt("run", "-s", "path:models/limits", "--vars", LIMIT_VARS, env=ENV)
    counts = {n: count(envs, n) for n in ("lim_customers", "lim_raw_customers", "lim_raw_orders", "lim_stg_orders")}
    return envs, result, envs.audit(), counts


def test_limited_dev_build(lim):
    project, result, doc, counts = lim
    # 5 customers, 8 orders in the seeds
    assert counts == {"lim_customers": 2, "lim_raw_customers": 5, "lim_raw_orders": 3, "lim_stg_orders": 2}

    got = {(r["node"], r["ref"]): (r["env"], r["limit"]) for r in doc["resolutions"]}
    assert got == {
        (uid("lim_customers"), uid("stg_customers")): ("staging", 2),
        (uid("lim_raw_customers"), uid("raw_customers", "seed")): ("staging", None),  # meta limit: null
        (uid("lim_raw_orders"), uid("raw_orders", "seed")): ("staging", 3),  # meta limit: 3
        (uid("lim_stg_orders"), uid("stg_orders")): ("staging", 2),
        (uid("lim_child"), uid("lim_customers")): ("dev", None),  # selected
    }
    assert doc["summary"]["limited"] == 3
    assert [m["msg"] for m in ours(result, "info")] == [
        "dbt-defer: 5 refs resolved: dev 1, staging 4; 3 limited to 2/3 rows"
    ]
    # the audit's relation is the plain relation; the SQL has dbt's limit wrapper around it
    assert [r["relation"] for r in doc["resolutions"] if r["ref"] == uid("stg_customers")] == [
        rel(project, "staging", "stg_customers")
    ]
    assert project.compiled("models/limits/lim_customers.sql").strip().endswith(
        "select * from " + limited_sql(project, "staging", "stg_customers", 2)
    )
    raw = project.compiled("models/limits/lim_raw_customers.sql")
    assert raw.strip().endswith("select * from " + rel(project, "staging", "raw_customers"))
    assert "limit" not in raw


def test_limits_follow_the_running_target(lim):
    project = lim[0]
    # target ci (same dev schema): limits for dev do not apply...
    project.dbt("compile", "-s", "lim_customers", "--target", "ci", "--vars", LIMIT_VARS, env=ENV)
    [record] = project.audit()["resolutions"]
    assert record["limit"] is None and record["env"] == "staging"
    assert "limit" not in project.compiled("models/limits/lim_customers.sql")
    # ...and limits for ci do
    project.dbt("compile", "-s", "lim_customers", "--target", "ci", "--vars", with_vars(limits={"ci": 4}), env=ENV)
    assert project.audit()["resolutions"][0]["limit"] == 4
    assert limited_sql(project, "staging", "stg_customers", 4) in project.compiled("models/limits/lim_customers.sql")
    # no limits var at all: nothing limited
    project.dbt("compile", "-s", "lim_customers", env=ENV)
    assert project.audit()["resolutions"][0]["limit"] is None


def test_limits_exactly_where_they_should_be(lim):
    """selected, dev-exists, restricted, ephemeral and test refs are never limited; deferred ones are."""
    project = lim[0]
    project.dbt(
        "compile", "-s", "model_a", "model_b", "customers", "pii_report", "lim_child", "lim_raw_orders",
        "lim_raw_customers", "--vars", LIMIT_VARS, env=ENV,
    )
    records = project.audit()["resolutions"]
    meta_limit = {uid("raw_customers", "seed"): None, uid("raw_orders", "seed"): 3}
    reasons = set()
    for r in records:
        reasons.add(r["reason"])
        deferred = r["env"] in ("staging", "prod")
        is_test = r["node"].startswith("test.")
        expected = meta_limit.get(r["ref"], 2) if deferred and not is_test else None
        assert r["limit"] == expected, r
        sql = compiled_of(project, r["node"])
        assert r["relation"] in sql, r
        if expected is None:
            assert f"{r['relation']} limit" not in sql, r
        else:
            assert limited_sql(project, r["env"], r["ref"].rsplit(".", 1)[1], expected) in sql, r
    assert {"selected", "dev_exists", "restricted", "ephemeral", "deferred"} <= reasons
    assert {r["ref"] for r in records if r["reason"] == "restricted"} == {uid("pii_emails")}
    assert {r["ref"] for r in records if r["reason"] == "dev_exists"} == {uid("lim_customers")}
    assert sum(1 for r in records if r["limit"] is not None) == project.audit()["summary"]["limited"] == 4


def test_data_tests_unlimited_unless_limit_tests(lim):
    project = lim[0]
    project.dbt("compile", "-s", "model_b", "--vars", LIMIT_VARS, env=NEVER_DEV)
    got = project.resolutions()
    assert got[(uid("model_b"), uid("model_a"))]["limit"] == 2
    assert got[(REL_TEST, uid("model_a"))]["limit"] is None
    assert got[(REL_TEST, uid("model_a"))]["env"] == "prod"
    assert f"{rel(project, 'prod', 'model_a')} limit" not in compiled_of(project, REL_TEST)

    project.dbt("compile", "-s", "model_b", "--vars", with_vars(limits={"dev": 2}, limit_tests=True), env=NEVER_DEV)
    got = project.resolutions()
    assert got[(REL_TEST, uid("model_a"))]["limit"] == 2
    assert got[(REL_TEST, uid("model_b"))]["limit"] is None  # selected: never limited
    assert limited_sql(project, "prod", "model_a", 2) in compiled_of(project, REL_TEST)


def test_meta_limit_must_be_a_whole_number(lim):
    project = lim[0]
    project.write("seeds/_limits.yml", FILES["seeds/_limits.yml"].replace("limit: 3", "limit: lots").lstrip())
    try:
        result = project.dbt("compile", "-s", "lim_raw_orders", "--vars", LIMIT_VARS, env=ENV, expect=False)
        assert "meta dbt_defer.limit of seed.dbt_defer_integration_tests.raw_orders is 'lots'" in result.text()
    finally:
        project.write("seeds/_limits.yml", FILES["seeds/_limits.yml"].lstrip())


def test_empty_wins(lim):
    project = lim[0]
    project.dbt("run", "-s", "lim_customers", "--empty", "--vars", LIMIT_VARS, env=ENV)
    sql = project.compiled("models/limits/lim_customers.sql")
    assert f"{rel(project, 'staging', 'stg_customers')} where false limit 0)" in sql
    assert "limit 2" not in sql
    assert project.audit()["resolutions"][0]["limit"] is None  # dbt's limit 0, not ours
    assert count(project, "lim_customers") == 0


@pytest.mark.skipif(tuple(int(p) for p in dbt_version.split(".")[:2]) < (1, 10), reason="--sample is dbt >= 1.10")
def test_sample_wins(lim):
    project = lim[0]
    project.dbt(
        "run", "-s", "lim_stg_orders", "--sample", "{'start': '2024-02-01', 'end': '2024-03-01'}",
        "--vars", LIMIT_VARS, env=ENV,
    )
    sql = project.compiled("models/limits/lim_stg_orders.sql")
    assert "order_date >= '2024-02-01" in sql and "limit 2" not in sql
    assert project.audit()["resolutions"][0]["limit"] is None
    assert count(project, "lim_stg_orders") == 3  # the three February orders, not 2
