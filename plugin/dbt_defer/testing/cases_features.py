"""Base classes for what dbt-defer adds on top of the rules: limits (SPEC §6), restricted
models and the write guard (§7), the audit (§5), metadata queries (§10), unit tests, explain.
"""

from __future__ import annotations

import json
import re
import threading
from typing import Any, Dict, Tuple

from dbt_defer.testing.environments import DeferBase, assert_resolved, record
from dbt_defer.testing.files import CUSTOMERS, ENVIRONMENTS, ORDERS, PACKAGE, dbt_defer_meta
from dbt_defer.testing.project import DeferProject, uid

LIMIT_VARS = json.dumps({"dbt_defer": {"limits": {"dev": 2}, "never_defer": ["tag:pii"]}})


class BaseLimits(DeferBase):
    """SPEC §6: limits by running target, per model (meta), not in data tests; aliased refs."""

    files = {
        "seeds/_seeds.yml": dbt_defer_meta("seeds", "raw_customers", "{limit: null}"),
        "models/limits/lim_plain.sql": "select * from {{ ref('stg_customers') }}\n",
        "models/limits/lim_unlimited.sql": "select * from {{ ref('raw_customers') }}\n",
        "models/limits/_limits.yml": """version: 2
models:
  - name: lim_plain
    columns:
      - name: customer_id
        data_tests:
          - relationships:
              to: ref('stg_customers')
              field: customer_id
""",
        # aliased, qualified and subquery refs around a limited ref (SPEC §6)
        "models/aliased/lim_alias.sql": "select c.customer_id from {{ ref('stg_customers') }} c\n",
        "models/aliased/lim_as_alias.sql": "select c.customer_id from {{ ref('stg_customers') }} as c\n",
        "models/aliased/lim_qualified.sql": "select stg_customers.customer_id from {{ ref('stg_customers') }}\n",
        "models/aliased/lim_in_subquery.sql": (
            "select order_id from {{ ref('stg_orders') }}\n"
            "where customer_id in (select customer_id from {{ ref('stg_customers') }})\n"
        ),
    }

    def test_limited_dev_build(self, project: DeferProject) -> None:
        res = project.deferred("build", "-s", "path:models/limits", "--vars", LIMIT_VARS)
        plain, unlimited = uid("lim_plain"), uid("lim_unlimited")
        assert_resolved(project, plain, uid("stg_customers"), "staging", "deferred", limit=2)
        assert_resolved(project, unlimited, uid("raw_customers", "seed"), "staging", "deferred")  # meta limit: null
        [test] = project.test_ids("relationships_lim_plain")
        assert res.statuses()[test] == "pass"
        assert_resolved(project, test, uid("stg_customers"), "staging", "deferred")  # no limit in data tests
        assert_resolved(project, test, plain, "dev", "selected")
        assert project.audit()["summary"]["limited"] == 1
        sql = project.compiled(plain)
        assert project.relation("staging", uid("stg_customers")) in sql and re.search(r"\blimit\s+2\b", sql), sql
        counts = project.counts(project.relation("dev", plain), project.relation("dev", unlimited))
        assert counts == [2, CUSTOMERS]

    def test_limits_follow_the_running_target(self, project: DeferProject) -> None:
        project.deferred("compile", "-s", "lim_plain", "--target", "ci", "--vars", LIMIT_VARS)
        assert_resolved(project, uid("lim_plain"), uid("stg_customers"), "staging", "deferred", limit=None)

    def test_aliased_qualified_and_subquery_refs(self, project: DeferProject) -> None:
        res = project.deferred("run", "-s", "path:models/aliased", "--vars", LIMIT_VARS, expect=None)
        failed = {u: s for u, s in res.statuses().items() if s != "success"}
        assert not failed, f"limited refs broke the SQL: {failed}\n" + res.text()[-3000:]
        names = ("lim_alias", "lim_as_alias", "lim_qualified", "lim_in_subquery")
        for name in names:
            r = record(project, uid(name), uid("stg_customers"))
            assert (r["env"], r["limit"]) == ("staging", 2), r
        counts = project.counts(*(project.relation("dev", uid(n)) for n in names))
        assert counts[:3] == [2, 2, 2]
        assert counts[3] <= 2  # two limited orders whose customers are among two limited customers


class BaseNeverDefer(DeferBase):
    """SPEC §7 never_defer (tag selector var) and meta dbt_defer.defer: false."""

    files = {
        "models/staging/_staging.yml": dbt_defer_meta("models", "stg_orders", "{defer: false}"),
    }

    def test_restricted_parents_missing_in_dev_stop_the_run(self, project: DeferProject) -> None:
        res = project.deferred("run", "-s", "pii_report", expect=False)
        text = res.text()
        assert uid("pii_emails") in text and "restricted" in text and project.schemas["dev"] in text
        res = project.deferred("compile", "-s", "orders", expect=False)
        assert uid("stg_orders") in res.text() and "restricted" in res.text()
        assert project.exists("dev", "pii_report", "orders") == [False, False]

    def test_restricted_parents_are_read_from_dev(self, project: DeferProject) -> None:
        project.deferred("run", "-s", "pii_emails", "stg_orders")
        project.deferred("run", "-s", "pii_report", "orders", "--favor-state")
        assert_resolved(project, uid("pii_report"), uid("pii_emails"), "dev", "restricted")
        assert_resolved(project, uid("orders"), uid("stg_orders"), "dev", "restricted")
        assert project.relation("dev", uid("pii_emails")) in project.compiled(uid("pii_report"))


class BaseWriteGuard(DeferBase):
    """SPEC §7: a deferred run never writes into a relation that a chain environment records."""

    def test_a_run_with_the_prod_target_writes_nothing(self, project: DeferProject) -> None:
        rel = "models/marts/orders.sql"
        prod_orders = project.relation("prod", uid("orders"))
        with project.edited(rel, "select * from (" + project.read(rel) + ") x where 1 = 0\n"):
            res = project.deferred("run", "-s", "orders", "--target", "oops", expect=False)
        text = res.text()
        assert "refusing to write" in text and uid("orders") in text and "Nothing was written" in text
        assert project.counts(prod_orders) == [ORDERS]

    def test_read_only_commands_and_other_schemas_go_on(self, project: DeferProject) -> None:
        project.deferred("compile", "-s", "orders", "--target", "oops")
        project.deferred("run", "-s", "orders")
        assert project.exists("dev", "orders") == [True]


class BaseAuditExactness(DeferBase):
    """SPEC §5: exactly one record per (node, ref), each with env, reason, relation, limit."""

    def test_every_resolution_of_a_build_exactly(self, project: DeferProject) -> None:
        res = project.deferred("build", "-s", "customers", "customer_report")
        doc = project.audit()
        tests = project.test_ids("")
        on_customers = [t for t in tests if re.search(r"\.(unique|not_null)_customers_customer_id\.", t)]
        on_customers += [t for t in tests if ".assert_totals_not_negative" in t]
        # eager indirect selection: orders' relationships test to customers runs too
        [crossing] = [t for t in tests if ".relationships_orders_customer_id" in t]
        assert len(on_customers) == 3, tests

        def row(node: str, ref: str, env: str, reason: str, cross: bool = False) -> Dict[str, Any]:
            relation = "__dbt__cte__int_order_totals" if env == "ephemeral" else project.relation(env, ref)
            return {"node": node, "ref": ref, "env": env, "relation": relation, "reason": reason,
                    "limit": None, "cross_environment": cross}

        expected = [
            row(uid("customer_report"), uid("calendar_years", package=PACKAGE), "prod", "deferred"),
            row(uid("customer_report"), uid("customers"), "dev", "selected"),
            row(uid("customer_report"), uid("dim_customers.v1"), "prod", "deferred"),
            row(uid("customers"), uid("int_order_totals"), "ephemeral", "ephemeral"),
            row(uid("customers"), uid("stg_customers"), "staging", "deferred"),
            row(uid("int_order_totals"), uid("stg_orders"), "staging", "deferred"),
            *(row(t, uid("customers"), "dev", "selected") for t in on_customers),
            row(crossing, uid("customers"), "dev", "selected", cross=True),
            row(crossing, uid("orders"), "staging", "deferred", cross=True),
        ]
        expected.sort(key=lambda r: (r["node"], r["ref"]))
        fields = ("node", "ref", "env", "relation", "reason", "limit", "cross_environment")
        assert [{k: r.get(k) for k in fields} for r in doc["resolutions"]] == expected
        summary = doc["summary"]
        assert {k: summary.get(k) for k in ("dev", "staging", "prod", "ephemeral", "limited")} == {
            "dev": 5, "staging": 3, "prod": 2, "ephemeral": 1, "limited": 0
        }
        assert doc["metadata"]["target"] == "dev" and doc["metadata"]["command"] == "build"
        assert [e["name"] for e in doc["environments"]] == list(ENVIRONMENTS)
        assert set(res.statuses().values()) <= {"success", "pass"}, res.statuses()
        # one debug line per deferred ref, one summary line, one cross-environment warning
        debug = res.lines("dbt-defer: ", level="debug")
        for r in expected:
            if r["env"] in ENVIRONMENTS:
                assert len([m for m in debug if m.startswith(f"dbt-defer: {r['node']} -> {r['ref']}:")]) == 1, debug
        assert len([m for m in res.lines("dbt-defer: ") if "refs resolved" in m]) == 1
        assert len([m for m in res.lines("dbt-defer: ", level="warn") if crossing in m]) == 1

    def test_the_warehouse_audit_table(self, project: DeferProject) -> None:
        """vars: dbt_defer: audit_table: true appends the records to <target schema>.dbt_defer_audit."""
        settings = json.dumps({"dbt_defer": {"audit_table": True, "never_defer": ["tag:pii"]}})
        res = project.deferred("compile", "-s", "customers", "--vars", settings)
        assert not res.lines("dbt-defer: could not append"), res.lines("dbt-defer: could not append")
        first = len(project.audit()["resolutions"])
        project.deferred("compile", "-s", "orders", "--vars", settings)
        second = len(project.audit()["resolutions"])
        assert project.probe(counts=[("dev", "dbt_defer_audit")])["counts"] == [first + second]


class BaseMetadataQueries(DeferBase):
    """SPEC §4 cost: existence checks list each (database, schema) at most once per invocation,
    whatever the number of refs and threads (and share dbt's relation cache)."""

    def test_at_most_one_metadata_query_per_schema(self, project: DeferProject, monkeypatch: Any) -> None:
        from dbt.adapters.factory import FACTORY

        adapter_type = project.profile_target["type"]
        FACTORY.load_plugin(adapter_type)
        adapter_class = FACTORY.get_adapter_class_by_name(adapter_type)
        original = adapter_class.list_relations_without_caching
        calls: Dict[Tuple[str, str], int] = {}
        lock = threading.Lock()

        def counting(adapter: Any, schema_relation: Any) -> Any:
            key = ((schema_relation.database or "").lower(), (schema_relation.schema or "").lower())
            with lock:
                calls[key] = calls.get(key, 0) + 1
            return original(adapter, schema_relation)

        monkeypatch.setattr(adapter_class, "list_relations_without_caching", counting)
        res = project.deferred("build", "-s", "customers", "customer_report", "orders", "pii_emails", "--threads", "4")
        monkeypatch.undo()
        assert set(res.statuses().values()) <= {"success", "pass"}, res.statuses()
        summary = project.audit()["summary"]
        assert summary.get("staging", 0) >= 3 and summary.get("prod", 0) >= 2, summary
        schemas = {schema for (_, schema) in calls}
        assert {project.schemas["staging"], project.schemas["prod"]} <= schemas, calls
        assert max(calls.values()) == 1, calls


class BaseUnitTests(DeferBase):
    """dbt unit tests of a model whose input is not in dev: its column types come from the chain."""

    files = {
        "models/marts/order_amounts.sql": (
            "select customer_id, sum(amount) as amount from {{ ref('stg_orders') }} group by customer_id\n"
        ),
        "models/marts/_unit.yml": """version: 2
unit_tests:
  - name: order_amounts_sums_per_customer
    model: order_amounts
    given:
      - input: ref('stg_orders')
        rows:
          - {order_id: 1, customer_id: 1, amount: 10}
          - {order_id: 2, customer_id: 1, amount: 25}
          - {order_id: 3, customer_id: 2, amount: 7}
    expect:
      rows:
        - {customer_id: 1, amount: 35}
        - {customer_id: 2, amount: 7}
""",
    }

    def test_unit_test_reads_input_types_through_the_chain(self, project: DeferProject) -> None:
        res = project.deferred("build", "-s", "order_amounts")
        unit = [u for u in res.statuses() if u.startswith("unit_test.")]
        assert unit and all(res.statuses()[u] == "pass" for u in unit), res.statuses()
        assert_resolved(project, uid("order_amounts"), uid("stg_orders"), "staging", "deferred")
        assert project.exists("dev", "stg_orders", "order_amounts") == [False, True]


class BaseExplain(DeferBase):
    """SPEC §8 dbt-defer explain: the resolution table, computed without writing anything."""

    def test_explain_matches_a_compile_and_writes_nothing(self, project: DeferProject) -> None:
        code, out, err = project.explain("-s", "customers", "--target", "dev", "--output", "json")
        assert code == 0, err
        doc = json.loads(out)
        explained = {(r["node"], r["ref"]): (r["env"], r["reason"], r["relation"]) for r in doc["resolutions"]}
        assert explained[(uid("customers"), uid("stg_customers"))][:2] == ("staging", "deferred")
        assert explained[(uid("customers"), uid("int_order_totals"))][:2] == ("ephemeral", "ephemeral")
        assert project.probe(schemas=["dev"])["schemas"] == [False]  # nothing created, not even the schema
        assert not (project.target / "dbt_defer_audit.json").exists()

        # what the build of the same selection then does
        project.deferred("build", "-s", "customers", "--target", "dev")
        built = {k: (r["env"], r["reason"], r["relation"]) for k, r in project.resolutions().items()}
        assert explained == built
        assert explained[(uid("customers"), uid("stg_customers"))][2] == project.relation("staging", uid("stg_customers"))

    def test_explain_table_and_write_guard(self, project: DeferProject) -> None:
        code, out, err = project.explain("-s", "customer_report", "--target", "dev", "--vars", LIMIT_VARS)
        assert code == 0, err
        header = next(line for line in out.splitlines() if line.startswith("| node"))
        assert [c.strip() for c in header.strip("|").split("|")] == ["node", "ref", "env", "relation", "reason", "limit"]
        row = next(line for line in out.splitlines() if "dim_customers.v1" in line)
        assert "| prod" in row and "deferred" in row and "| 2" in row
        code, _, err = project.explain("-s", "customers", "--target", "oops")
        assert code == 1 and "refusing to write" in err and len(err.strip().splitlines()) == 1, err
