"""The portable mode's pure parts (SPEC §11): reading the user's dbt arguments, the engine's
structured lines. Real engine runs: tests/test_portable_v2.py."""

from __future__ import annotations

import pytest

from dbt_defer.portable.engine import EngineError, Listing, executable, marked
from dbt_defer.portable.run import parse_dbt_args


def test_dbt_arguments_are_passed_through_and_read():
    got = parse_dbt_args(["build", "-s", "a", "b+", "--exclude", "c", "--target", "ci", "--vars", "{x: 1}",
                          "--store-failures", "--defer", "--defer-state", "old", "--favor-state", "--state", "prod"])
    assert got.command == "build"
    assert got.select == ["a", "b+"] and got.exclude == ["c"]
    assert got.target == "ci" and got.vars == "{x: 1}" and got.store_failures and got.favor_state
    # the deferral flags are ours; dbt's --state (state: selectors) passes through
    assert got.passed == ["build", "-s", "a", "b+", "--exclude", "c", "--target", "ci", "--vars", "{x: 1}",
                          "--store-failures", "--state", "prod"]


def test_inline_values_and_the_command_after_options():
    got = parse_dbt_args(["--project-dir=proj", "compile", "--select=x", "--defer-state=s"])
    assert got.command == "compile" and got.select == ["x"] and got.project_dir == "proj"
    assert got.passed == ["--project-dir=proj", "compile", "--select=x"]


def test_lines_are_found_wherever_the_engine_prints_them():
    assert marked('\x1b[0m08:00:01  dbt-defer-ref {"node": "model.p.a"}', "dbt-defer-ref ") == {"node": "model.p.a"}
    assert marked("nothing here", "dbt-defer-ref ") is None
    assert marked("dbt-defer-ref {broken", "dbt-defer-ref ") is None


def test_the_listing_compares_names_exactly_ignoring_case():
    out = Listing.from_output(
        'dbt-defer-portable {"kind": "target", "name": "dev", "database": "wh", "schema": "dev"}\n'
        'x  dbt-defer-portable {"kind": "schema", "database": "wh", "schema": "Prod", "identifiers": ["Orders"]}\n'
    )
    assert out.target["name"] == "dev"
    assert out.exists(("wh", "prod", "orders"), None)
    assert out.exists((None, "PROD", "ORDERS"), "WH")
    assert not out.exists(("wh", "prod", "order"), None)
    assert not out.exists(("wh", "prod_", "orders"), None)
    with pytest.raises(EngineError, match="dbt_defer package installed"):
        Listing.from_output("no lines of ours\n")


def test_the_engine_is_configurable():
    assert executable({}) == ["dbt"]
    assert executable({"DBT_DEFER_DBT": "python -m mydbt"}) == ["python", "-m", "mydbt"]
