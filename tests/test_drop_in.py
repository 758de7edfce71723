"""Drop-in safety (SPEC §2–§4, §7; issue 9) on DuckDB and Postgres, with real dbt runs.

- the running target's own environment: a staging job defers to prod, a prod job with
  deferral left on is plain dbt;
- everything dbt reads from deferral follows the chain: unit tests, clone, ``graph``,
  functions — never an environment that only lists the node;
- a ref found nowhere renders dbt's own relation (compile and missing-relation macros work);
- the write guard fails the offending nodes only, covers sources, stored test failures and
  manifests without a database, and refuses a --target-path inside a state folder before dbt
  writes anything.
"""

from __future__ import annotations

import json
import textwrap

import pytest
from dbt.version import __version__ as dbt_version

from dbt_defer.testing.files import write_double_it

from conftest import built_environments
from dbt_harness import make_project
from test_chain_rules import CHAIN, PROJECT, count, dbt, execute, fresh, rel  # noqa: F401 (fixture)

PROD_ONLY = {"DBT_DEFER": "1", "DBT_DEFER_PROD_STATE": "prod-artifacts"}


def infos(result) -> list:
    return [m["msg"] for m in result.messages if "dbt-defer" in m["msg"]]


def statuses(result) -> dict:
    return {uid.split(".")[-1]: str(r.status) for uid, r in result.node_results().items()}


def point_dev_at_prod(p) -> None:
    profiles = p.read("profiles.yml")
    p.write("profiles.yml", profiles.replace(f"schema: {p.schema('dev')}\n", f"schema: {p.schema('prod')}\n", 1))


def prod_rows(p, name: str) -> list:
    return sorted(p.query(f'select * from "{p.schema("prod")}"."{name}"'), key=repr)


# --- SPEC §3: the running target's own environment ---------------------------------------------


def test_staging_job_defers_to_prod(fresh):
    p = fresh
    res = dbt(p, "run", "--target", "staging", "-s", "customers", "customer_report")
    assert any("target 'staging' builds environment 'staging': deferring to prod" in m for m in infos(res))
    assert statuses(res) == {"customers": "success", "customer_report": "success"}
    records = p.resolutions()
    # dim_customers v1 and the package model are not in staging: prod; stg_customers is built there
    assert records[(p.uid("customer_report"), p.uid("dim_customers.v1"))]["env"] == "prod"
    assert records[(p.uid("customer_report"), p.uid("dim_customers.v1"))]["relation"] == rel(p, "prod", "dim_customers_v1")
    stg = records[(p.uid("customers"), p.uid("stg_customers"))]
    assert (stg["env"], stg["reason"], stg["relation"]) == ("staging", "dev_exists", rel(p, "staging", "stg_customers"))
    assert p.audit()["metadata"]["target"] == "staging"
    assert [e["name"] for e in p.audit()["environments"]] == ["prod"]
    assert p.relation_exists("staging", "customer_report")


def test_environment_target_key_names_the_target_that_builds_it(fresh):
    p = fresh
    settings = {"dbt_defer": {"environments": [
        {"name": "staging", "state": "staging-artifacts", "target": "ci"},
        {"name": "prod", "state": "prod-artifacts"},
    ]}}
    # target 'ci' builds staging here (its schema is dev's in the harness): it defers to prod only
    res = dbt(p, "run", "--target", "ci", "-s", "customers", "--vars", json.dumps(settings), env={"DBT_DEFER": "1"})
    assert any("target 'ci' builds environment 'staging': deferring to prod" in m for m in infos(res))
    record = p.resolutions()[(p.uid("customers"), p.uid("stg_customers"))]
    assert (record["env"], record["relation"]) == ("prod", rel(p, "prod", "stg_customers"))


@pytest.mark.parametrize("env", [PROD_ONLY, CHAIN], ids=["prod-only", "staging-and-prod"])
def test_prod_job_with_deferral_left_on_is_plain_dbt(fresh, env):
    p = fresh
    p.write("models/marts/customers.sql", p.read("models/marts/customers.sql") + "where c.customer_id > 1\n")
    before = count(p, "prod", "customers")
    res = dbt(p, "run", "--target", "prod", "-s", "customers", env=env)
    assert statuses(res) == {"customers": "success"}
    assert any("builds environment 'prod', the last of the chain: nothing to defer to" in m for m in infos(res))
    assert count(p, "prod", "customers") == before - 1  # prod job built prod, as plain dbt does
    assert not (p.target / "dbt_defer_audit.json").exists()


# --- SPEC §4: everything dbt reads from deferral follows the chain -----------------------------

UNIT_TEST = """
unit_tests:
  - name: top_customers_keeps_buyers
    model: top_customers
    given:
      - input: ref('customers')
        rows:
          - {customer_id: 1, first_name: a, order_count: 1, total_amount: 10}
          - {customer_id: 2, first_name: b, order_count: 0, total_amount: 0}
    expect:
      rows:
        - {customer_id: 1}
"""


def test_unit_test_input_comes_from_the_environment_that_has_the_table(fresh):
    """staging's manifest lists customers, but only prod built it: the unit test must read prod."""
    p = fresh
    assert "model.dbt_defer_integration_tests.customers" in json.loads(p.read("staging-artifacts/manifest.json"))["nodes"]
    assert not p.relation_exists("staging", "customers")
    p.write("models/marts/top_customers.sql", "select customer_id from {{ ref('customers') }} where total_amount > 0\n")
    p.write("models/marts/_top_customers.yml", UNIT_TEST)
    res = dbt(p, "build", "-s", "top_customers")
    assert statuses(res) == {"top_customers_keeps_buyers": "pass", "top_customers": "success"}


def test_clone_reads_each_node_from_the_environment_that_has_it(fresh):
    p = fresh
    res = dbt(p, "clone", "-s", "stg_customers", "customers", "--state", "prod-artifacts")
    assert set(statuses(res).values()) == {"success"}, statuses(res)
    # stg_customers was built in staging, customers only in prod (staging's manifest lists it)
    assert count(p, "dev", "customers") == count(p, "prod", "customers")
    run = p.target / "run" / PROJECT / "models"
    assert f'"{p.schema("staging")}"."stg_customers"' in (run / "staging" / "stg_customers.sql").read_text()
    assert f'"{p.schema("prod")}"."customers"' in (run / "marts" / "customers.sql").read_text()
    # SPEC §5: one audit record per cloned node, naming the environment it was copied from
    records = {(r["node"], r["kind"]): r for r in p.audit()["resolutions"]}
    assert {k: (r["ref"], r["env"], r["reason"], r["relation"]) for k, r in records.items()} == {
        (p.uid("stg_customers"), "clone"): (p.uid("stg_customers"), "staging", "deferred", rel(p, "staging", "stg_customers")),
        (p.uid("customers"), "clone"): (p.uid("customers"), "prod", "deferred", rel(p, "prod", "customers")),
    }
    assert any(m.startswith("dbt-defer: 2 reads resolved (2 cloned nodes): staging 1, prod 1") for m in infos(res))


def test_clone_never_copies_a_restricted_node(fresh):
    p = fresh
    settings = json.dumps({"dbt_defer": {"never_defer": ["customers"]}})
    dbt(p, "clone", "-s", "customers", "--state", "prod-artifacts", "--vars", settings, expect=None)
    assert not p.relation_exists("dev", "customers")


def test_graph_defer_relation_is_the_chains_choice(fresh):
    p = fresh
    p.write(
        "models/marts/where_deferred.sql",
        "{% set d = graph.nodes['model.dbt_defer_integration_tests.customers'].defer_relation %}\n"
        "select '{{ d.schema if d else 'none' }}' as deferred_schema\n",
    )
    dbt(p, "run", "-s", "where_deferred")
    assert p.query(f'select deferred_schema from "{p.schema("dev")}"."where_deferred"') == [(p.schema("prod"),)]


DEFERRED_RECORDS = """
{% if execute %}{% for uid in var('uids') %}
{% do log('deferred-record ' ~ uid ~ ' ' ~ tojson(graph.nodes[uid].defer_relation, sort_keys=true), info=true) %}
{% endfor %}{% endif %}
select 1 as x
"""


def _deferred_records(result) -> dict:
    lines = [m["msg"].split(" ", 2) for m in result.messages if m["msg"].startswith("deferred-record ")]
    return {uid: json.loads(text) for _, uid, text in lines}


def test_graph_defer_relation_has_every_field_dbt_fills_from_its_state(fresh):
    """SPEC §4: the deferred record carries relation_name, compiled_code, description, meta,
    tags and config of the chosen environment's node, exactly as dbt's --defer from that state."""
    p = fresh
    uids = [p.uid("customers"), p.uid("stg_customers"), p.uid("raw_orders", "seed"),
            p.uid("customers_snapshot", "snapshot")]
    # the project's own version differs from prod's: its code, meta, tags and config
    p.write("models/marts/customers.sql", "{{ config(materialized='view', tags=['branch'], meta={'owner': 'me'}) }}\n"
            + p.read("models/marts/customers.sql"))
    p.write("models/marts/deferred_records.sql", DEFERRED_RECORDS)
    settings = ["--vars", json.dumps({"uids": uids})]
    native = _deferred_records(dbt(p, "run", "-s", "deferred_records", "--defer", "--state", "prod-artifacts",
                                   *settings, env={}))
    chain = _deferred_records(dbt(p, "run", "-s", "deferred_records", *settings, env=PROD_ONLY))
    assert sorted(native) == sorted(chain) == sorted(uids)
    assert native[p.uid("customers")]["relation_name"] == rel(p, "prod", "customers")
    assert native[p.uid("customers")]["config"]["materialized"] == "table"
    assert native[p.uid("stg_customers")]["compiled_code"]
    for uid in uids:
        assert chain[uid] == native[uid], uid


@pytest.mark.skipif(tuple(int(x) for x in dbt_version.split(".")[:2]) < (1, 11), reason="functions: dbt >= 1.11")
def test_functions_are_deferred_through_the_chain(envs, tmp_path):
    if envs.adapter != "postgres":
        pytest.skip("dbt-duckdb has no function support")
    p = make_project(tmp_path, envs.adapter)
    try:
        write_double_it(p, "float")
        p.write("models/fn/double_it_model.sql", "select {{ function('double_it') }}(1) as doubled\n")
        built_environments(p)
        dbt(p, "run", "-s", "double_it_model")
        assert p.query(f'select doubled from "{p.schema("dev")}"."double_it_model"') == [(2.0,)]
        compiled = (p.target / "compiled" / PROJECT / "models" / "fn" / "double_it_model.sql").read_text()
        assert f'"{p.schema("prod")}"' in compiled or f'"{p.schema("staging")}"' in compiled, compiled
        # SPEC §5: the function() call is an audit record like a ref
        [read] = [r for r in p.audit()["resolutions"] if r["kind"] == "function"]
        assert (read["node"], read["ref"], read["reason"]) == (
            p.uid("double_it_model"), f"function.{PROJECT}.double_it", "deferred")
        assert read["env"] in ("staging", "prod") and f'"{p.schema(read["env"])}"' in read["relation"]
        assert read["relation"] in compiled
    finally:
        p.drop_schemas()


FOREIGN_KEY = """
models:
  - name: order_facts
    config: {contract: {enforced: true}, materialized: table}
    columns:
      - name: order_id
        data_type: integer
      - name: customer_id
        data_type: integer
        constraints:
          - type: foreign_key
            to: ref('customers')
            to_columns: [customer_id]
"""


@pytest.mark.skipif(tuple(int(x) for x in dbt_version.split(".")[:2]) < (1, 9), reason="foreign key to: dbt >= 1.9")
def test_a_foreign_key_to_an_unselected_ref_is_an_audit_record(fresh):
    p = fresh
    p.write("models/marts/order_facts.sql", "select 1 as order_id, 1 as customer_id\n")
    p.write("models/marts/_order_facts.yml", FOREIGN_KEY)
    res = dbt(p, "compile", "-s", "order_facts")
    [read] = [r for r in p.audit()["resolutions"] if r["kind"] == "foreign_key"]
    node = json.loads((p.target / "manifest.json").read_text())["nodes"][p.uid("order_facts")]
    [rendered] = [c["to"] for col in node["columns"].values() for c in col["constraints"] if c["type"] == "foreign_key"]
    assert (read["node"], read["ref"], read["relation"]) == (p.uid("order_facts"), p.uid("customers"), rendered)
    # staging lists customers but only prod built it; dbt >= 1.12 reads the deferred relation
    if tuple(int(x) for x in dbt_version.split(".")[:2]) >= (1, 12):
        assert (read["env"], read["reason"], rendered) == ("prod", "deferred", rel(p, "prod", "customers"))
    assert any(m.startswith("dbt-defer: 1 read resolved (1 foreign key)") for m in infos(res)), infos(res)


# --- SPEC §4.6: nothing found renders dbt's own relation ---------------------------------------


def test_a_ref_found_nowhere_renders_dbts_relation_and_warns(fresh):
    p = fresh
    p.write("models/new/new_parent.sql", "select 1 as id\n")
    p.write(
        "models/new/guarded_child.sql",
        "{% set parent = load_relation(ref('new_parent')) %}\n"
        "{% if parent is none %}select 0 as id{% else %}select id from {{ ref('new_parent') }}{% endif %}\n",
    )
    res = dbt(p, "run", "-s", "guarded_child")
    assert statuses(res) == {"guarded_child": "success"}
    assert p.query(f'select id from "{p.schema("dev")}"."guarded_child"') == [(0,)]
    record = p.resolutions()[(p.uid("guarded_child"), p.uid("new_parent"))]
    assert (record["env"], record["reason"], record["relation"]) == ("missing", "missing", rel(p, "dev", "new_parent"))
    warning = [m for m in infos(res) if "exists nowhere" in m]
    assert len(warning) == 1
    assert "staging: no enabled model/seed/snapshot" in warning[0] and "+guarded_child" in warning[0]

    p.write("models/new/new_child.sql", "select id from {{ ref('new_parent') }}\n")
    dbt(p, "compile", "-s", "new_child")  # dbt compiles a model whose parent is not built yet
    assert p.resolutions()[(p.uid("new_child"), p.uid("new_parent"))]["env"] == "missing"


# --- SPEC §7: the write guard ------------------------------------------------------------------


def test_guard_fails_the_offending_nodes_and_the_rest_goes_on(fresh):
    """A dev target pointed at prod's schema writes nothing there, not even a new model no
    manifest lists (issue 22); a node writing into a schema no environment builds goes on."""
    p = fresh
    point_dev_at_prod(p)
    p.write("models/new/brand_new.sql", "select 1 as id\n")
    p.write("models/new/elsewhere.sql", "{{ config(schema='elsewhere') }}\nselect 1 as id\n")
    before = prod_rows(p, "customers")
    res = dbt(p, "run", "-s", "customers", "customer_report", "brand_new", "elsewhere", expect=False)
    assert statuses(res) == {"customers": "error", "customer_report": "skipped", "brand_new": "error",
                             "elsewhere": "success"}
    message = str(res.node_results()[p.uid("customers")].message)
    assert "refusing to write model.dbt_defer_integration_tests.customers" in message
    assert "environment 'prod'" in message
    assert "holds environment 'prod''s relations" in str(res.node_results()[p.uid("brand_new")].message)
    assert prod_rows(p, "customers") == before
    assert not p.relation_exists("prod", "brand_new")
    assert p.query(f'select id from "{p.schema("prod")}_elsewhere"."elsewhere"') == [(1,)]


def test_guard_covers_sources(fresh):
    """A dev model named like a prod source table, with the dev schema pointed at prod's."""
    p = fresh
    execute(p, f'create table "{p.schema("prod")}"."raw_events" as select 1 as id union all select 2')
    p.write("models/sources.yml", textwrap.dedent(f"""
        sources:
          - name: raw
            schema: {p.schema('prod')}
            tables: [{{name: raw_events}}]
    """))
    p.dbt("parse", "--target", "prod")
    p.save_artifacts("prod-artifacts")
    point_dev_at_prod(p)
    p.write("models/new/raw_events.sql", "select 99 as id\n")
    before = prod_rows(p, "raw_events")
    assert before == [(1,), (2,)]
    res = dbt(p, "run", "-s", "raw_events", env=PROD_ONLY, expect=False)
    assert statuses(res) == {"raw_events": "error"}
    assert "source.dbt_defer_integration_tests.raw.raw_events" in str(res.node_results()[p.uid("raw_events")].message)
    assert prod_rows(p, "raw_events") == before
    kind = "BASE TABLE" if p.adapter == "postgres" else None
    if kind:  # still the table (not replaced by a view, which would cascade to views on it)
        assert p.query(f"select table_type from information_schema.tables where table_schema = "
                       f"'{p.schema('prod')}' and table_name = 'raw_events'") == [(kind,)]


def test_guard_covers_stored_test_failures(fresh):
    p = fresh
    p.dbt("test", "--target", "prod", "-s", "customers", "--store-failures")
    p.save_artifacts("prod-artifacts")
    audit_schema = f"{p.schema('prod')}_dbt_test__audit"
    tables_before = sorted(p.query(
        f"select table_name from information_schema.tables where table_schema = '{audit_schema}'"))
    assert tables_before
    contents_before = {t: sorted(p.query(f'select * from "{audit_schema}"."{t}"'), key=repr) for (t,) in tables_before}
    point_dev_at_prod(p)
    for command in ("test", "build"):
        res = dbt(p, command, "-s", "customers" if command == "test" else "test_type:data,customers",
                  "--store-failures", env=PROD_ONLY, expect=False)
        tests = {k: v for k, v in statuses(res).items() if k != "customers"}
        assert tests and set(tests.values()) == {"error"}, statuses(res)
        assert all("refusing to write test." in str(r.message)
                   for uid, r in res.node_results().items() if uid.startswith("test."))
    tables_after = sorted(p.query(
        f"select table_name from information_schema.tables where table_schema = '{audit_schema}'"))
    assert tables_after == tables_before
    assert {t: sorted(p.query(f'select * from "{audit_schema}"."{t}"'), key=repr) for (t,) in tables_after} == contents_before


def test_guard_treats_a_missing_database_as_the_default(fresh):
    p = fresh
    path = p.root / "prod-artifacts" / "manifest.json"
    manifest = json.loads(path.read_text())
    for node in manifest["nodes"].values():
        node["database"] = None
    path.write_text(json.dumps(manifest))
    point_dev_at_prod(p)
    before = prod_rows(p, "customers")
    res = dbt(p, "run", "-s", "customers", env=PROD_ONLY, expect=False)
    assert statuses(res) == {"customers": "error"}
    assert prod_rows(p, "customers") == before


def test_target_path_inside_a_state_folder_is_refused_before_dbt_writes(fresh):
    p = fresh
    state = p.root / "prod-artifacts" / "manifest.json"
    before = state.read_bytes()
    res = p.dbt("compile", "--target-path", "prod-artifacts", env=CHAIN, expect=False)
    assert "dbt-defer: environment 'prod'" in str(res.exception)
    assert state.read_bytes() == before
    res = p.dbt("compile", "--target-path", "prod-artifacts/inner", env=CHAIN, expect=False)
    assert "a folder holding this run's target path" in str(res.exception)
    assert not (p.root / "prod-artifacts" / "inner").exists()


def test_native_mode_only_warns_where_dbt_allows(fresh):
    """dbt allows --state target and a job deferring to its own previous state: so do we."""
    p = fresh
    p.dbt("run", "--target", "prod", "-s", "stg_customers")
    res = p.dbt("run", "--target", "prod", "-s", "stg_customers", "--defer", "--state", "target")
    assert statuses(res) == {"stg_customers": "success"}
    assert any("(dbt's own --defer: not refused)" in m for m in infos(res))
