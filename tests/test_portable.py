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


def test_a_dbt_1x_command_without_dbt_core_says_what_to_install(tmp_path):
    """A dbt Core v2 user has no dbt-core 1.x: the commands that need it say so in one line."""
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "dbt_project.yml").write_text("name: p\nprofile: p\n")
    hide_dbt = (
        "import sys, importlib.abc\n"
        "class Hide(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('dbt', 'dbt_common', 'dbt_adapters', 'agate'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Hide())\n"
        "from dbt_defer.cli import main\n"
        "sys.exit(main(['status', '--project-dir', sys.argv[1]]))\n"
    )
    plugin = str(Path(__file__).resolve().parents[1] / "plugin")
    done = subprocess.run([sys.executable, "-c", hide_dbt, str(tmp_path)], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": plugin}, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "dbt-defer: 'dbt-defer status' needs dbt-core 1.x, which is not installed here (no module dbt); "
        "install it (pip install \"dbt-defer[dbt1]\") or, on dbt Core v2, use 'dbt-defer state' and 'dbt-defer run'"
    ]
