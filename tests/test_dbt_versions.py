"""The dbt versions dbt-defer runs on: the supported range is declared where pip and dbt read it,
and on a dbt whose internals dbt-defer cannot patch (a later 1.x minor that changed one) the
plugin patches nothing and dbt's own ``--defer`` runs, with one line naming what it could not
patch — no traceback, no half-patched dbt. Real dbt runs on DuckDB, in a subprocess whose dbt
has one patch point changed before the plugin is imported."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet

from conftest import built_environments
from dbt_harness import make_project
from test_audit import release_duckdb

REPO = Path(__file__).resolve().parents[1]


def _pyproject_dependency(name: str) -> SpecifierSet:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith(name) for d in project["dependencies"])  # a dbt Core v2 user gets no dbt 1.x
    deps = project["optional-dependencies"]["dbt1"]  # pip checks the range with [dbt1] or an adapter extra
    assert all(name in " ".join(project["optional-dependencies"][x]) for x in ("duckdb", "postgres", "spark"))
    spec = next(d for d in deps if d.startswith(name + ">") or d.startswith(name + "="))
    return SpecifierSet(spec[len(name):])


@pytest.mark.parametrize("version", ["1.8.0", "1.9.4", "1.10.11", "1.11.2", "1.12.0", "1.12.6", "1.13.0"])
def test_supported_and_later_1x_versions_install_and_parse(version):
    assert version in _pyproject_dependency("dbt-core")
    required = yaml.safe_load((REPO / "dbt_project.yml").read_text())["require-dbt-version"]
    assert all(version in SpecifierSet(r.replace(".0.0", ".0")) for r in required), required


def test_older_dbt_is_refused_by_pip():
    assert "1.7.19" not in _pyproject_dependency("dbt-core")


def test_every_checked_version_is_listed_and_the_installed_one_is_patched():
    from dbt_defer import patches

    assert patches.CHECKED_ON == ("1.8", "1.9", "1.10", "1.11", "1.12")
    assert patches.unpatched() == []  # this suite runs on a checked dbt: every patch is installed
    assert patches.checked_on(patches.dbt_version())


_CHANGED_DBT = textwrap.dedent(
    """
    import sys
    import dbt.compilation as compilation
    original = compilation.Compiler._compile_code
    def _compile_code(self, *args, **kwargs):  # the same work, another shape
        return original(self, *args, **kwargs)
    compilation.Compiler._compile_code = _compile_code
    from dbt.cli.main import dbtRunner
    result = dbtRunner().invoke(sys.argv[1:])
    print("dbt success:", result.success)
    sys.exit(0 if result.success else 1)
    """
)


@pytest.fixture(scope="module")
def duck(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("versions"), "duckdb")
    built_environments(project)
    return project


def _run_changed_dbt(project, *args: str, **env: str) -> subprocess.CompletedProcess:
    release_duckdb()  # the in-process dbt-duckdb holds the file's lock
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DBT_")}
    environ["DBT_SEND_ANONYMOUS_USAGE_STATS"] = "false"
    environ.update(env)
    argv = [*args, "--project-dir", str(project.root), "--profiles-dir", str(project.root)]
    return subprocess.run([sys.executable, "-c", _CHANGED_DBT, *argv], cwd=project.root, env=environ,
                          capture_output=True, text=True, timeout=600)


def test_a_changed_patch_point_falls_back_to_dbts_own_defer(duck):
    audit = duck.target / "dbt_defer_audit.json"
    if audit.exists():
        audit.unlink()
    chain = {"DBT_DEFER": "1", "DBT_DEFER_STAGING_STATE": "staging-artifacts", "DBT_DEFER_STATE": "prod-artifacts"}
    done = _run_changed_dbt(duck, "compile", "-s", "customers", **chain)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "Traceback" not in out
    lines = [line for line in out.splitlines() if "dbt-defer: cannot patch dbt-core" in line]
    assert len(lines) == 1, out[-3000:]
    assert "dbt.compilation.Compiler._compile_code has changed shape" in lines[0]
    assert "Falling back to dbt's own --defer" in lines[0]
    assert not audit.exists()  # dbt-defer did nothing: no audit, no chain
    fallback_sql = duck.compiled("models/marts/customers.sql")

    # dbt's own --defer --state prod-artifacts: the same SQL, read from prod (not the chain's staging)
    duck.dbt("compile", "-s", "customers", "--defer", "--state", "prod-artifacts",
             env={"DBT_DEFER_STAGING_STATE": ""})
    assert fallback_sql == duck.compiled("models/marts/customers.sql")
    assert f'"{duck.schema("prod")}"' in fallback_sql and f'"{duck.schema("staging")}"' not in fallback_sql


def test_a_changed_patch_point_with_deferral_off_says_nothing(duck):
    done = _run_changed_dbt(duck, "compile", "-s", "customers")
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "dbt-defer" not in done.stdout + done.stderr
