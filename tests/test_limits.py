"""Environment-specific limits (SPEC §6): by running target, per referenced model (meta), not in
data tests unless limit_tests, never on dev/selected/ephemeral/restricted refs; dbt's --empty and
--sample win; the SQL around a limited ref keeps its meaning (aliases, qualified columns, subqueries).
Real dbt runs on DuckDB and Postgres, plus units of the SQL pass (plugin/dbt_defer/limits.py).
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
from hypothesis import given, settings, strategies as st
from dbt.version import __version__ as dbt_version

from dbt_defer import audit, limits
from dbt_harness import _environment
from test_audit import ENV, NEVER_DEV, REL_TEST, expected_savings, ours, rel, savings_tail, uid

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
    """The subquery a limited ref renders to (its alias depends on the SQL around the ref)."""
    return f"(select * from {rel(project, env, name)} limit {n})"


def assert_clean(sql: str) -> None:
    """No marker of dbt-defer and no alias of dbt's own is left in compiled SQL."""
    assert "dbt-defer-limited-ref" not in sql and "_dbt_limit_subq" not in sql, sql


def compiled_of(project, node: str) -> str:
    manifest = json.loads((project.target / "manifest.json").read_text())
    return (project.root / manifest["nodes"][node]["compiled_path"]).read_text()


# --- units: the SQL pass, the warnings (no dbt run) ------------------------------------------------

SUBQ = '(select * from "db"."s"."stg_x" limit 3)'


def marked(tail: str = " _dbt_limit_subq_stg_x", alias: str = '"stg_x"') -> str:
    return limits.mark(SUBQ + tail, alias)


@pytest.mark.parametrize(
    "after, own",
    [
        (" c join", False), (" as c", False), (" AS c", False), ("\n  c\nwhere", False), (' "C" where', False),
        (" `c`", False), (" -- note\n  /* more */ c on", False), (" t(a, b)", False), (" o,", False),
        (" where a > 0", True), (" WHERE", True), (")", True), ("", True), (",", True), (";", True),
        ("\nleft join y", True), (" inner join", True), (" join", True), (" group by 1", True), (" order by", True),
        (" union all select 1", True), (" limit 5", True), (" on a = b", True), (" -- c\n where", True),
        (" /* c */)", True), (" qualify x", True), (" cross join", True), (" natural join", True), (" 1", True),
        (" except select 1", True), (" window w as ()", True), (" having 1", True),
    ],
)
def test_resolve_takes_the_users_alias_or_else_its_own(after, own):
    for tail in (" _dbt_limit_subq_stg_x", ""):  # with dbt's subquery alias (Postgres) or without (DuckDB)
        got = limits.resolve("select * from " + marked(tail) + after)
        assert got == "select * from " + SUBQ + (' "stg_x"' if own else "") + after


def test_resolve_touches_only_the_marked_spans():
    users = "select '/* x */' as a, (select * from y limit 3) _dbt_limit_subq_y -- from x\n"
    assert limits.resolve(users) is users  # nothing marked: the very same string
    sql = users + "from " + marked() + " x1 join " + marked("") + " where q" + users
    assert limits.resolve(sql) == users + "from " + SUBQ + " x1 join " + SUBQ + ' "stg_x" where q' + users


def test_mark_leaves_unknown_renderings_alone():
    for rendered in ('"db"."s"."x"', "(select 1) a b", "(select 1) a;", "top 3 x"):
        assert limits.mark(rendered, '"x"') == rendered
    for alias in ("", "a*/b", "a\nb"):
        assert limits.mark(SUBQ, alias) == SUBQ
    # unresolved (e.g. a hook dbt renders at run time): dbt's rendering plus a comment, still SQL
    assert marked() == SUBQ + '/*dbt-defer-limited-ref 22 "stg_x"*/ _dbt_limit_subq_stg_x'


@given(st.text(alphabet=" \n\tabcxyz()-*/,;\"'_", max_size=40), st.sampled_from([" _dbt_limit_subq_stg_x", ""]))
@settings(max_examples=300, deadline=None, derandomize=os.environ.get("CI", "").lower() == "true")
def test_resolve_never_changes_text_around_a_span(around, tail):
    got = limits.resolve(around + marked(tail) + around)
    assert got in (around + SUBQ + around, around + SUBQ + ' "stg_x"' + around)


@pytest.mark.parametrize("adapter", ["duckdb", "postgres"])
def test_limited_relation_is_the_same_relation(adapter):
    if adapter == "duckdb":
        from dbt.adapters.duckdb.relation import DuckDBRelation as Relation
    else:
        from dbt.adapters.postgres.relation import PostgresRelation as Relation
    plain = Relation.create(database="db", schema="s", identifier="stg_x", limit=3)
    relation = limits.limited_relation(plain)
    assert isinstance(relation, Relation) and limits.limited_relation(relation) is relation
    assert (relation.identifier, relation.schema, relation.render(), relation.limit) == ("stg_x", "s", '"db"."s"."stg_x"', 3)
    assert str(relation).startswith(SUBQ + '/*dbt-defer-limited-ref ')
    assert limits.resolve("from " + str(relation)) == "from " + SUBQ + ' "stg_x"'
    assert str(dataclasses.replace(relation, limit=None)) == '"db"."s"."stg_x"'
    zero = dataclasses.replace(relation, limit=0)
    assert limits.resolve(str(zero) + " c") == '(select * from "db"."s"."stg_x" where false limit 0) c'
    unquoted = limits.limited_relation(plain.quote(identifier=False))
    assert limits.resolve(str(unquoted)).endswith(" limit 3) stg_x")


def test_unknown_limit_targets():
    assert limits.unknown_targets((("dev", 1), ("devv", 2), ("ci", None)), ["dev", "ci", "prod"]) == ["devv"]
    line = limits.unknown_targets_warning(["devv"], "shop", ["prod", "dev"])
    assert line.startswith("dbt-defer: ") and "\n" not in line
    assert "'devv'" in line and "'shop'" in line and "dev, prod" in line


def test_failing_tests_line_names_tests_on_limited_data():
    def r(node, ref, env, limit=None):
        return audit.Record(node=node, ref=ref, env=env, relation="x", reason="r", limit=limit, is_test=node.startswith("test."))

    records = [
        r("model.p.stg", "seed.p.raw", "prod", 10),
        r("model.p.mart", "model.p.stg", "dev"),  # built in this run from a capped stg
        r("model.p.other", "model.p.stg", "prod"),  # reads stg from prod: whole
        r("test.p.on_mart", "model.p.mart", "dev"),
        r("test.p.on_other", "model.p.other", "dev"),
        r("test.p.limited_itself", "model.p.x", "prod", 10),
    ]
    assert limits.limited_nodes(records) == {"model.p.stg", "model.p.mart", "test.p.on_mart", "test.p.limited_itself"}
    line = limits.failing_tests_line(records, ["test.p.on_mart", "test.p.on_other", "test.p.limited_itself"])
    assert line.startswith("dbt-defer: 2 data tests with failures") and "\n" not in line
    assert "test.p.limited_itself, test.p.on_mart)" in line and "on_other" not in line
    assert limits.failing_tests_line(records, ["test.p.on_other"]) is None
    assert limits.failing_tests_line([r("model.p.a", "model.p.b", "prod")], ["test.p.on_mart"]) is None


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
    upstream = [uid("raw_customers", "seed"), uid("raw_orders", "seed"), uid("stg_customers"), uid("stg_orders")]
    assert [m["msg"] for m in ours(result, "info")] == [
        "dbt-defer: 5 refs resolved: dev 1, staging 4; 3 limited to 2/3 rows" + savings_tail(4, *expected_savings(project, upstream))
    ]
    # the audit's relation is the plain relation; the SQL has dbt's limit wrapper around it
    assert [r["relation"] for r in doc["resolutions"] if r["ref"] == uid("stg_customers")] == [
        rel(project, "staging", "stg_customers")
    ]
    # the unaliased ref gets its own name as alias, on every adapter
    assert project.compiled("models/limits/lim_customers.sql").strip().endswith(
        "select * from " + limited_sql(project, "staging", "stg_customers", 2) + ' "stg_customers"'
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
        assert_clean(sql)
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


# --- SQL around a limited ref: aliases, qualified columns, subqueries (SPEC §6) --------------------

SHAPES = {
    "models/limit_shapes/shape_join_aliases.sql": """
select o.order_id, c.first_name
from {{ ref('stg_orders') }} as o
join {{ ref('stg_customers') }} c on c.customer_id = o.customer_id
""",
    "models/limit_shapes/shape_in_subquery.sql": """
select order_id, amount from {{ ref('stg_orders') }}
where customer_id in (select customer_id from {{ ref('stg_customers') }})
""",
    "models/limit_shapes/shape_qualified.sql": """
select stg_orders.order_id, stg_orders.amount
from {{ ref('stg_orders') }}
where stg_orders.amount > 0
""",
    "models/limit_shapes/shape_cte.sql": """
with o as (
    select * from {{ ref('stg_orders') }}
), c as (
    select * from {{ ref('stg_customers') }} -- every customer
)
select o.order_id, c.first_name from o left join c on c.customer_id = o.customer_id
""",
    "models/limit_shapes/shape_keywords.sql": """
select stg_customers.customer_id from {{ ref('stg_customers') }} join {{ ref('stg_orders') }} on stg_orders.customer_id = stg_customers.customer_id
union all
select customer_id from {{ ref('stg_customers') }} union all select customer_id from {{ ref('stg_orders') }} WHERE amount > 0
union all
select customer_id from {{ ref('stg_orders') }} group by customer_id
union all
select customer_id from (select customer_id from {{ ref('stg_customers') }}) as sub
""",
    "models/limit_shapes/shape_comments.sql": """
select c.first_name, stg_orders.amount
from {{ ref('stg_customers') }} /* customers, aliased below */
  -- the alias comes after two comments
  c
left join {{ ref('stg_orders') }} -- no alias: qualified by its own name
  on stg_orders.customer_id = c.customer_id
""",
    "models/limit_shapes/shape_quoted.sql": """
select "O".order_id from {{ ref('stg_orders') }} "O" where "O".amount > 0
""",
    "models/limit_shapes/shape_customers.sql": "select * from {{ ref('stg_customers') }}",
    # fails only when shape_customers was built from a capped stg_customers (5 customers in the seed)
    "tests/limit_shapes/assert_every_customer.sql": (
        "select count(*) as n from {{ ref('shape_customers') }} having count(*) < 5"
    ),
}
OWN, USERS = "own", "user's"
# per model, each ref in order: (model read, alias the limited subquery must end up with)
SHAPE_ALIASES = {
    "shape_join_aliases": [("stg_orders", USERS), ("stg_customers", USERS)],
    "shape_in_subquery": [("stg_orders", OWN), ("stg_customers", OWN)],
    "shape_qualified": [("stg_orders", OWN)],
    "shape_cte": [("stg_orders", OWN), ("stg_customers", OWN)],
    "shape_keywords": [
        ("stg_customers", OWN), ("stg_orders", OWN), ("stg_customers", OWN), ("stg_orders", OWN),
        ("stg_orders", OWN), ("stg_customers", OWN),
    ],
    "shape_comments": [("stg_customers", USERS), ("stg_orders", OWN)],
    "shape_quoted": [("stg_orders", USERS)],
    "shape_customers": [("stg_customers", OWN)],
}
# at most `limit` rows whatever rows the capped refs return
ONE_SOURCE = ("shape_join_aliases", "shape_in_subquery", "shape_qualified", "shape_cte", "shape_quoted", "shape_customers")
SHAPES_SELECT = ("-s", "path:models/limit_shapes")


def shape_sql(project, name: str) -> str:
    return project.compiled(f"models/limit_shapes/{name}.sql")


def rows_of(project, name: str) -> list:
    return sorted(map(tuple, project.query(f"select * from {project.schema('dev')}.{name}")), key=repr)


@pytest.fixture(scope="module")
def shapes(envs):
    """The shapes compiled and built three times, reading stg_* from staging (dev relations never):
    without limits, with a limit above every table's size, and with limits: {dev: 2}."""
    for path, text in SHAPES.items():
        table = "{{ config(materialized='table') }}\n" if path.startswith("models/") else ""
        envs.write(path, table + text.lstrip())
    envs.dbt("run", *SHAPES_SELECT, env=NEVER_DEV)
    unlimited = {name: shape_sql(envs, name) for name in SHAPE_ALIASES}
    full = {name: rows_of(envs, name) for name in SHAPE_ALIASES}
    envs.dbt("run", *SHAPES_SELECT, "--vars", with_vars(limits={"dev": 1000}), env=NEVER_DEV)
    above = {name: rows_of(envs, name) for name in SHAPE_ALIASES}
    result = envs.dbt("run", *SHAPES_SELECT, "--vars", LIMIT_VARS, env=NEVER_DEV)
    limited = {name: shape_sql(envs, name) for name in SHAPE_ALIASES}
    counts = {name: count(envs, name) for name in SHAPE_ALIASES}
    return envs, unlimited, full, above, limited, counts, result


def test_limited_shapes_change_only_the_refs(shapes):
    """Each limited ref becomes its subquery with the user's alias, or else its own name; the SQL
    around it is byte for byte what dbt compiles without limits."""
    project, unlimited, _, _, limited, _, result = shapes
    edges = {(name, model) for name, refs in SHAPE_ALIASES.items() for model, _ in refs}
    assert project.audit()["summary"]["limited"] == len(edges)  # one record per (node, ref)
    for name, refs in SHAPE_ALIASES.items():
        expected, at = unlimited[name], 0
        for model, alias in refs:
            plain = rel(project, "staging", model)
            at = expected.index(plain, at)
            wrapped = limited_sql(project, "staging", model, 2) + (f' "{model}"' if alias == OWN else "")
            expected = expected[:at] + wrapped + expected[at + len(plain):]
            at += len(wrapped)
        plain_refs = sum(unlimited[name].count(rel(project, "staging", m)) for m in ("stg_orders", "stg_customers"))
        assert plain_refs == len(refs), name  # every ref of the model is listed above
        assert limited[name] == expected, name
        assert_clean(limited[name])


def test_limited_shapes_mean_the_same(shapes):
    """With a limit above every table's size, each model holds exactly its unlimited rows."""
    _, _, full, above, _, _, _ = shapes
    assert all(full[name] for name in full), full
    assert above == full


def test_limited_shapes_hold_at_most_the_limit(shapes):
    project, _, full, _, _, counts, result = shapes
    for name in ONE_SOURCE:
        assert 0 < counts[name] <= 2, (name, counts[name])
    assert counts["shape_customers"] < len(full["shape_customers"]) == 5
    # every row of a limited build is a row of the unlimited one (no outer join: no new nulls)
    for name in set(SHAPE_ALIASES) - {"shape_cte", "shape_comments"}:
        assert set(rows_of(project, name)) <= set(full[name]), name


def test_show_and_inline_with_limits(shapes):
    project = shapes[0]
    res = project.dbt("show", "-s", "shape_comments", "--vars", LIMIT_VARS, env=NEVER_DEV)
    assert len(res.raw.results[0].agate_table.rows) <= 4
    inline = "select c.first_name from {{ ref('stg_customers') }} c where c.customer_id > 0"
    res = project.dbt("show", "--inline", inline, "--vars", LIMIT_VARS, env=NEVER_DEV)
    assert len(res.raw.results[0].agate_table.rows) == 2
    inline = "select stg_customers.first_name from {{ ref('stg_customers') }} where stg_customers.customer_id > 0"
    res = project.dbt("show", "--inline", inline, "--vars", LIMIT_VARS, env=NEVER_DEV)
    assert len(res.raw.results[0].agate_table.rows) == 2


def test_failing_test_on_limited_parents_says_so(shapes):
    project = shapes[0]
    res = project.dbt("build", "-s", "shape_customers", "--vars", LIMIT_VARS, env=NEVER_DEV, expect=False)
    [line] = [m for m in ours(res, "warn") if "row-limited" in m["msg"]]
    assert "1 data test with failures" in line["msg"]
    assert "test.dbt_defer_integration_tests.assert_every_customer" in line["msg"]
    assert "limits: {}" in line["msg"]
    assert res.messages.index(line) > max(i for i, m in enumerate(res.messages) if "refs resolved" in m["msg"])
    # without limits the same build passes, and nothing is said
    res = project.dbt("build", "-s", "shape_customers", env=NEVER_DEV)
    assert not [m for m in ours(res) if "row-limited" in m["msg"]]


def test_unknown_limits_key_warns_once(shapes, capsys):
    from dbt_defer import cli

    project = shapes[0]
    typo = with_vars(limits={"devv": 100})
    res = project.dbt("run", "-s", "shape_customers", "--vars", typo, env=NEVER_DEV)
    warned = [m["msg"] for m in ours(res, "warn") if "limits key" in m["msg"]]
    assert len(warned) == 1
    assert "'devv'" in warned[0] and "ci, dev, prod, staging" in warned[0]
    assert count(project, "shape_customers") == 5  # as the warning says: no limit applied

    argv = ["status", "--project-dir", str(project.root), "--profiles-dir", str(project.root), "--vars", typo]
    capsys.readouterr()
    with _environment(NEVER_DEV):
        code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert [line for line in err.splitlines() if "limits key" in line] == [warned[0]]
    with _environment(NEVER_DEV):
        cli.main([*argv, "--output", "json"])
    assert json.loads(capsys.readouterr().out)["unknown_limit_targets"] == ["devv"]
    # a known key: nothing said
    res = project.dbt("compile", "-s", "shape_customers", "--vars", LIMIT_VARS, env=NEVER_DEV)
    assert not [m for m in ours(res, "warn") if "limits key" in m["msg"]]


def test_explain_compiles_limited_shapes(shapes, capsys):
    from dbt_defer import cli

    project = shapes[0]
    argv = [
        "explain", "-s", "path:models/limit_shapes", "--target", "dev", "--output", "json", "--vars", LIMIT_VARS,
        "--project-dir", str(project.root), "--profiles-dir", str(project.root),
    ]
    capsys.readouterr()
    with _environment(NEVER_DEV):
        code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    records = json.loads(out)["resolutions"]
    assert {r["limit"] for r in records if r["node"].startswith("model.")} == {2}
