"""The write guard's data-loss holes (issue 22 items 1-5, SPEC §7), each through real dbt on
DuckDB and Postgres (functions: Postgres, dbt >= 1.11):

1. ``dbt retry`` runs its task through the guard (run, seed, snapshot, build, clone, test with
   stored failures), and its ``--target-path`` is checked like any command's;
2. functions a chain manifest records are protected like relations;
3. a target pointed at a chain environment's schema writes nothing there, new models included;
4. a relation every environment shares (a legacy snapshot's fixed ``target_schema``) is refused
   by default, with the node's opt-in ``meta: {dbt_defer: {shared: true}}``;
5. a ref a hook renders that resolves to a chain environment fails the node (or warns, opted in).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from dbt.version import __version__ as dbt_version

from dbt_defer.testing.files import write_double_it

from conftest import built_environments
from dbt_harness import make_project
from test_chain_rules import CHAIN, PROJECT, execute  # noqa: F401

PROD_ONLY = {"DBT_DEFER": "1", "DBT_DEFER_PROD_STATE": "prod-artifacts"}


def statuses(result) -> dict:
    """node name (a test's name without its hash) -> status"""
    return {uid.split(".")[2]: str(r.status) for uid, r in result.node_results().items()}


def messages(result) -> dict:
    return {uid.split(".")[2]: str(r.message or "") for uid, r in result.node_results().items()}


def rows(p, env: str, name: str) -> list:
    return sorted(p.query(f'select * from "{p.schema(env)}"."{name}"'), key=repr)


@contextlib.contextmanager
def dev_pointed_at_prod(p):
    """The dev target of profiles.yml writes into prod's schema inside the block."""
    profiles = p.read("profiles.yml")
    with p.edited("profiles.yml", profiles.replace(f"schema: {p.schema('dev')}\n", f"schema: {p.schema('prod')}\n", 1)):
        yield


def prod_state(p) -> dict:
    """Every relation of prod and staging, and the rows of the relations the tests aim at."""
    return {
        "prod": p.list_relations("prod"),
        "staging": p.list_relations("staging"),
        "customers": rows(p, "prod", "customers"),
        "raw_customers": rows(p, "prod", "raw_customers"),
    }


# --- 1. dbt retry ------------------------------------------------------------------------------

RETRIED = [
    (("run", "-s", "customers"), "customers"),
    (("seed", "-s", "raw_customers"), "raw_customers"),
    (("snapshot",), "customers_snapshot"),
    (("build", "-s", "customers", "--exclude", "test_type:data"), "customers"),
    (("clone", "-s", "customers", "--state", "prod-artifacts"), "customers"),
    (("test", "-s", "customers", "--store-failures"), "unique_customers_customer_id"),
]


@pytest.mark.parametrize("command, node", RETRIED, ids=[c[0][0] for c in RETRIED])
def test_retry_goes_through_the_write_guard(envs, command, node):
    """A refused run, then `dbt retry` (a fresh process: dbt's selection global is empty): the
    retried nodes are refused again and nothing of prod changes."""
    p = envs
    before = prod_state(p)
    with dev_pointed_at_prod(p):
        first = p.dbt(*command, env=CHAIN, expect=False)
        assert statuses(first)[node] == "error", statuses(first)
        assert "dbt-defer: refusing to write" in messages(first)[node]
        retry = p.dbt("retry", env=CHAIN, expect=False)
        assert statuses(retry), retry.text()  # retry ran the failed nodes again...
        assert statuses(retry)[node] == "error", statuses(retry)
        assert "dbt-defer: refusing to write" in messages(retry)[node]  # ...through the guard
        assert set(statuses(retry).values()) <= {"error", "skipped"}, statuses(retry)
    assert prod_state(p) == before


def test_retry_in_a_new_process_is_refused(envs):
    """The real CLI: `dbt retry` in its own process after a refused run (Postgres: in-process
    runs hold DuckDB's file lock)."""
    p = envs
    if p.adapter != "postgres":
        pytest.skip("DuckDB's file is locked by this process's dbt runs")
    before = prod_state(p)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DBT_")}
    environ.update(CHAIN, DBT_SEND_ANONYMOUS_USAGE_STATS="false")
    with dev_pointed_at_prod(p):
        p.dbt("run", "-s", "customers", env=CHAIN, expect=False)
        proc = subprocess.run(
            [str(Path(sys.executable).parent / "dbt"), "retry", "--project-dir", str(p.root), "--profiles-dir", str(p.root)],
            env=environ, capture_output=True, text=True, timeout=300,
        )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "Traceback" not in out
    assert f"refusing to write {p.uid('customers')}" in out
    assert prod_state(p) == before


def test_retry_refuses_a_target_path_inside_a_state_folder(envs):
    """`dbt retry` parses (and writes manifest.json, run_results.json) into its --target-path,
    replaying the flags of the run it retries: here prod's job, run with deferral left on."""
    p = envs
    folder = p.root / "prod-artifacts"
    saved = {name: (folder / name).read_bytes() for name in ("manifest.json", "run_results.json")}
    try:
        results = json.loads(saved["run_results.json"])
        results["args"]["defer"] = True
        results["results"][0]["status"] = "error"  # something to retry
        (folder / "run_results.json").write_text(json.dumps(results))
        before = {name: (folder / name).read_bytes() for name in saved}
        res = p.dbt("retry", "--target-path", "prod-artifacts", env=CHAIN, expect=False)
        assert "dbt-defer: environment 'prod'" in str(res.exception), res.text()
        assert "is this run's own target path" in str(res.exception)
        assert {name: (folder / name).read_bytes() for name in saved} == before
        assert not res.node_results()
    finally:
        for name, data in saved.items():
            (folder / name).write_bytes(data)


# --- 3. a target pointed at a chain environment's schema ----------------------------------------


def test_mispointed_target_creates_no_new_relation_there(envs):
    p = envs
    before = prod_state(p)
    with dev_pointed_at_prod(p), \
            p.edited("models/new/brand_new.sql", "select 1 as id\n"), \
            p.edited("models/new/elsewhere.sql", "{{ config(schema='elsewhere') }}\nselect 2 as id\n"):
        res = p.dbt("run", "-s", "brand_new", "elsewhere", "customers", env=CHAIN, expect=False)
        assert statuses(res) == {"brand_new": "error", "customers": "error", "elsewhere": "success"}, statuses(res)
        line = messages(res)["brand_new"]
        assert f"refusing to write {p.uid('brand_new')} into" in line
        assert f"schema {p.database}.{p.schema('prod')} holds environment 'prod''s relations" in line
        assert "Point your target at a development schema" in line and "Nothing was written" in line
        # a node writing into a schema no environment builds goes on
        assert p.query(f'select id from "{p.schema("prod")}_elsewhere"."elsewhere"') == [(2,)]
    assert prod_state(p) == before
    assert not p.relation_exists("prod", "brand_new")


# --- 4. shared legacy snapshots ----------------------------------------------------------------

SHARED_SNAPSHOT = """
{{% snapshot shared_snapshot %}}
{{{{ config(target_schema='{schema}', unique_key='customer_id', strategy='check', check_cols=['written_by']) }}}}
select id as customer_id, '{{{{ target.name }}}}' as written_by from {{{{ ref('raw_customers') }}}}
{{% endsnapshot %}}
"""
SHARED_OPT_IN = """
snapshots:
  - name: shared_snapshot
    config:
      meta:
        dbt_defer:
          shared: true
"""


def test_shared_snapshot_is_refused_unless_the_node_opts_in(envs):
    p = envs
    shared_schema = p.schema("snapshots")  # the same schema from every target
    state = {name: (p.root / "prod-artifacts" / name).read_bytes() for name in ("manifest.json", "run_results.json")}
    try:
        with p.edited("snapshots/shared_snapshot.sql", SHARED_SNAPSHOT.format(schema=shared_schema)):
            p.dbt("snapshot", "--target", "prod", "-s", "shared_snapshot")
            p.save_artifacts("prod-artifacts")
            table = f'"{shared_schema}"."shared_snapshot"'
            before = sorted(p.query(f"select customer_id, written_by from {table}"))
            assert {w for _, w in before} == {"prod"}

            res = p.dbt("snapshot", "-s", "shared_snapshot", env=CHAIN, expect=False)
            assert statuses(res) == {"shared_snapshot": "error"}, statuses(res)
            line = messages(res)["shared_snapshot"]
            assert f"refusing to write {p.uid('shared_snapshot', 'snapshot')} into" in line
            assert "environment 'prod'" in line and "meta: {dbt_defer: {shared: true}}" in line
            assert sorted(p.query(f"select customer_id, written_by from {table}")) == before

            with p.edited("snapshots/_shared.yml", SHARED_OPT_IN):
                res = p.dbt("snapshot", "-s", "shared_snapshot", env=CHAIN)
                assert statuses(res) == {"shared_snapshot": "success"}
                assert any("opts in with meta: {dbt_defer: {shared: true}}" in m for m in res.lines())
            assert {w for _, w in p.query(f"select customer_id, written_by from {table}")} == {"prod", "dev"}
    finally:
        for name, data in state.items():
            (p.root / "prod-artifacts" / name).write_bytes(data)
        execute(p, f'drop schema if exists "{shared_schema}" cascade')


# --- 5. hooks ----------------------------------------------------------------------------------

DELETING_HOOK = """
{{ config(post_hook="delete from {{ ref('customers') }} where customer_id = 1") }}
select 1 as id
"""
READING_HOOK = """
{{ config(post_hook="select count(*) from {{ ref('customers') }}", meta={'dbt_defer': {'hooks': 'warn'}}) }}
select 1 as id
"""


def test_a_hook_that_renders_a_chain_relation_fails_its_node(envs):
    p = envs
    before = prod_state(p)
    assert not p.relation_exists("dev", "customers")  # the ref defers to prod
    with p.edited("models/new/hooked.sql", DELETING_HOOK), p.edited("models/new/reader.sql", READING_HOOK):
        res = p.dbt("run", "-s", "hooked", "reader", env=CHAIN, expect=False)
        assert statuses(res) == {"hooked": "error", "reader": "success"}, statuses(res)
        line = messages(res)["hooked"]
        assert f"dbt-defer: refusing to run a pre/post hook of {p.uid('hooked')}" in line
        assert f"renders ref('customers') as {p.database}.{p.schema('prod')}.customers of environment 'prod'" in line
        assert "> called by" not in line  # one line, no Jinja stack
        assert "environment 'prod'" in line and "meta: {dbt_defer: {hooks: warn}}" in line
        warning = [m for m in res.lines(level="warn") if "a pre/post hook of" in m]
        assert len(warning) == 1 and p.uid("reader") in warning[0] and "opts in" in warning[0]
        # native mode (dbt's own --defer): dbt's outcome, with the warning
        res = p.dbt("run", "-s", "reader", "--defer", "--state", "prod-artifacts", env={})
        assert statuses(res) == {"reader": "success"}
        assert any("a pre/post hook of" in m for m in res.lines(level="warn"))
    assert prod_state(p) == before


def test_a_project_hook_that_renders_a_chain_relation_is_refused(envs):
    p = envs
    before = prod_state(p)
    project = p.read("dbt_project.yml")
    hook = "on-run-end: [\"delete from {{ ref('customers') }} where customer_id = 2\"]\n"
    with p.edited("dbt_project.yml", project + hook), p.edited("models/new/plain.sql", "select 1 as id\n"):
        res = p.dbt("run", "-s", "plain", env=CHAIN, expect=False)
        assert "dbt-defer: refusing to run the project hook" in res.text(), res.text()
    assert prod_state(p) == before


# --- 2. functions (dbt >= 1.11; dbt-postgres) --------------------------------------------------


@pytest.mark.skipif(tuple(int(x) for x in dbt_version.split(".")[:2]) < (1, 11), reason="functions: dbt >= 1.11")
def test_a_function_prod_records_is_not_replaced(envs, tmp_path):
    if envs.adapter != "postgres":
        pytest.skip("dbt-duckdb has no function support")
    p = make_project(tmp_path, envs.adapter)
    try:
        write_double_it(p, "integer")
        built_environments(p)
        call = f'select "{p.schema("prod")}".double_it(21)'
        assert p.query(call) == [(42,)]
        write_double_it(p, "integer", "SELECT value * 3")
        with dev_pointed_at_prod(p):
            res = p.dbt("build", "-s", "double_it", env=CHAIN, expect=False)
        assert statuses(res) == {"double_it": "error"}, statuses(res)
        line = messages(res)["double_it"]
        assert f"refusing to write function.{PROJECT}.double_it into" in line
        assert "environment 'prod'" in line and "records that relation for it" in line
        assert p.query(call) == [(42,)]
    finally:
        p.drop_schemas()
