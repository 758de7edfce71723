"""Base classes for the resolution rules (SPEC §4): the chain per node, dev relations,
ephemeral models, versions and packages, custom schemas and identifiers.
"""

from __future__ import annotations

import json
import shutil

import pytest

from dbt_defer.testing.environments import DeferBase, assert_resolved, record
from dbt_defer.testing.files import CUSTOMERS, ORDERS, PACKAGE
from dbt_defer.testing.project import DeferProject, uid

class BaseChainPerNode(DeferBase):
    """SPEC §4.2, §4.5: each ref takes the first environment that has it, per node."""

    def test_each_ref_takes_the_first_environment_holding_it(self, project: DeferProject) -> None:
        res = project.deferred("run", "-s", "stg_customers", "customers", "customer_report", "orders")
        assert res.statuses() and set(res.statuses().values()) == {"success"}
        # staging built the staging layer: served from there; the marts only from prod
        assert_resolved(project, uid("stg_customers"), uid("raw_customers", "seed"), "staging", "deferred")
        assert_resolved(project, uid("int_order_totals"), uid("stg_orders"), "staging", "deferred")
        assert_resolved(project, uid("orders"), uid("stg_orders"), "staging", "deferred")
        assert_resolved(project, uid("customer_report"), uid("dim_customers.v1"), "prod", "deferred")
        assert_resolved(project, uid("customer_report"), uid("calendar_years", package=PACKAGE), "prod", "deferred")
        # selected parents are read from dev
        assert_resolved(project, uid("customers"), uid("stg_customers"), "dev", "selected")
        assert_resolved(project, uid("customer_report"), uid("customers"), "dev", "selected")
        assert project.relation("staging", uid("stg_orders")) in project.compiled(uid("orders"))
        dev_report, prod_report = project.relation("dev", uid("customer_report")), project.relation("prod", uid("customer_report"))
        assert project.counts(dev_report, prod_report) == [CUSTOMERS, CUSTOMERS]

    def test_an_environment_without_the_relation_or_with_a_failed_node_is_skipped(self, project: DeferProject) -> None:
        """staging's manifest lists stg_customers at a relation that does not exist, and its
        run_results record stg_orders as failed: both are read from prod."""
        edited = project.root / "staging-edited"
        shutil.copytree(project.root / "staging-artifacts", edited)
        manifest = json.loads((edited / "manifest.json").read_text())
        manifest["nodes"][uid("stg_customers")]["alias"] = "stg_customers_never_built"
        (edited / "manifest.json").write_text(json.dumps(manifest))
        results = json.loads((edited / "run_results.json").read_text())
        for result in results["results"]:
            if result["unique_id"] == uid("stg_orders"):
                result["status"] = "error"
        (edited / "run_results.json").write_text(json.dumps(results))

        # dev_relations: never, as the first test left stg_customers in dev
        project.deferred(
            "compile", "-s", "customers", DBT_DEFER_STAGING_STATE="staging-edited", DBT_DEFER_DEV_RELATIONS="never"
        )
        assert_resolved(project, uid("customers"), uid("stg_customers"), "prod", "deferred")
        assert_resolved(project, uid("int_order_totals"), uid("stg_orders"), "prod", "deferred")
        assert project.relation("prod", uid("stg_customers")) in project.compiled(uid("customers"))


class BaseDevRelations(DeferBase):
    """SPEC §4.4: the dev policies always / modified / never, on a leftover dev relation."""

    @pytest.fixture(scope="class")
    @classmethod
    def leftover(cls, project: DeferProject) -> DeferProject:
        project.deferred("run", "-s", "stg_customers")
        assert project.exists("dev", "stg_customers", "customers") == [True, False]
        return project

    @pytest.mark.parametrize(
        "policy, env, reason",
        [("always", "dev", "dev_exists"), ("modified", "staging", "deferred"), ("never", "staging", "deferred")],
    )
    def test_policy_on_an_unchanged_leftover(self, leftover: DeferProject, policy: str, env: str, reason: str) -> None:
        leftover.deferred("compile", "-s", "customers", DBT_DEFER_DEV_RELATIONS=policy)
        assert_resolved(leftover, uid("customers"), uid("stg_customers"), env, reason)
        assert leftover.relation(env, uid("stg_customers")) in leftover.compiled(uid("customers"))

    def test_modified_uses_the_dev_relation_of_a_changed_node(self, leftover: DeferProject) -> None:
        rel = "models/staging/stg_customers.sql"
        with leftover.edited(rel, leftover.read(rel) + "-- changed on this branch\n"):
            leftover.deferred("compile", "-s", "customers", DBT_DEFER_DEV_RELATIONS="modified")
        assert_resolved(leftover, uid("customers"), uid("stg_customers"), "dev", "dev_modified")
        # a node without a dev relation still comes from the chain
        assert_resolved(leftover, uid("int_order_totals"), uid("stg_orders"), "staging", "deferred")


class BaseEphemeral(DeferBase):
    """SPEC §4.1: an ephemeral ref is never deferred; its own refs are."""

    def test_ephemeral_is_inlined_and_its_refs_defer(self, project: DeferProject) -> None:
        project.deferred("run", "-s", "customers")
        r = record(project, uid("customers"), uid("int_order_totals"))
        assert (r["env"], r["reason"], r["limit"]) == ("ephemeral", "ephemeral", None), r
        assert "__dbt__cte__int_order_totals" in r["relation"]
        sql = project.compiled(uid("customers"))
        assert "__dbt__cte__int_order_totals" in sql
        assert "int_order_totals" not in sql.replace("__dbt__cte__int_order_totals", "")  # never a relation
        assert_resolved(project, uid("int_order_totals"), uid("stg_orders"), "staging", "deferred")
        assert project.relation("staging", uid("stg_orders")) in sql
        total = project.probe(
            scalars=[f"select sum(order_count) from {project.relation('dev', uid('customers'))}"]
        )["scalars"]
        assert [int(float(v)) for v in total] == [ORDERS]


class BaseVersionsAndPackages(DeferBase):
    """Versioned refs (v=, latest), two-argument refs into this project and into a package."""

    files = {"models/marts/customer_emails.sql": "select customer_id, email from {{ ref('dim_customers') }}\n"}

    def test_versions_and_two_argument_refs(self, project: DeferProject) -> None:
        project.deferred("run", "-s", "customer_report", "customer_emails", "orders")
        assert_resolved(project, uid("customer_report"), uid("dim_customers.v1"), "prod", "deferred")
        assert project.relation("prod", uid("dim_customers.v1")).replace('"', "").replace("`", "").endswith("dim_customers_v1")
        assert_resolved(project, uid("customer_emails"), uid("dim_customers.v2"), "prod", "deferred")  # latest
        assert_resolved(project, uid("customer_report"), uid("calendar_years", package=PACKAGE), "prod", "deferred")
        assert_resolved(project, uid("orders"), uid("stg_orders"), "staging", "deferred")  # ref('<project>', 'stg_orders')
        assert_resolved(project, uid("customer_report"), uid("customers"), "prod", "deferred")
        counts = project.counts(
            project.relation("dev", uid("customer_report")), project.relation("dev", uid("customer_emails")),
            project.relation("dev", uid("orders")),
        )
        assert counts == [CUSTOMERS, CUSTOMERS, ORDERS]


class BaseSchemasAndIdentifiers(DeferBase):
    """A parent in a custom schema of each environment, under a mixed-case alias: found where
    dbt put it, rendered as dbt renders it (quoting and case are the adapter's)."""

    files = {"models/marts/top_customers.sql": "select * from {{ ref('customer_totals') }} where total_amount > 20\n"}

    def test_custom_schema_and_mixed_case_alias(self, project: DeferProject) -> None:
        project.deferred("run", "-s", "top_customers")
        prod = project.manifest("prod")["nodes"][uid("customer_totals")]
        assert prod["schema"] == project.schemas["prod"] + "_extra" and prod["alias"] == "CustomerTotals"
        assert_resolved(project, uid("top_customers"), uid("customer_totals"), "prod", "deferred")
        assert project.relation("prod", uid("customer_totals")) in project.compiled(uid("top_customers"))
        assert project.counts(project.relation("dev", uid("top_customers"))) == [3]
