"""Safety and bad input (SPEC §7, issue 4): the write guard, never_defer, manifest validation,
staleness and run_results, each through real dbt.

Every refusal is checked three ways: the outcome (dbtRunner's success flag and exception, and once
the process exit code), the one message line (environment, path, what is wrong, the fix; no
traceback), and that nothing was written (the relations of every schema and the protected data are
unchanged; the audit file, if any, says the run was refused).
"""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from dataclasses import replace
from types import SimpleNamespace

import pytest

from dbt_defer import guard
from dbt_defer.config import EnvironmentSpec
from dbt_defer.manifests import ManifestError, load_manifest

CHAIN = {"DBT_DEFER": "1", "DBT_DEFER_STAGING_STATE": "staging-artifacts", "DBT_DEFER_PROD_STATE": "prod-artifacts"}
PROD_ONLY = {"DBT_DEFER": "1", "DBT_DEFER_PROD_STATE": "prod-artifacts"}
SCHEMAS = ("dev", "staging", "prod")


# --- helpers ------------------------------------------------------------------------------


def snapshot(project) -> dict:
    """Everything a refused run must leave alone: relations of every schema. (The audit file is
    replaced by a refused one, so that no stale audit looks current: checked by refused().)"""
    return {"relations": {env: project.list_relations(env) for env in SCHEMAS}}


def defer_line(result) -> str:
    """The one dbt-defer line of a refused run (from the exception, else from the log)."""
    text = str(result.exception) if result.exception is not None else result.text()
    lines = [line.strip() for line in text.splitlines() if "dbt-defer:" in line]
    assert lines, f"no dbt-defer message in:\n{result.text()}"
    return lines[0]


def refused(project, *args, env, **kw):
    """Run dbt expecting a refusal before anything runs: no success, a DbtRuntimeError, no traceback."""
    result = project.dbt(*args, env=env, expect=False, **kw)
    assert result.exception is not None, result.text()
    assert type(result.exception).__name__ == "DbtRuntimeError", repr(result.exception)
    assert "Traceback" not in result.text()
    assert not result.node_results(), "a node ran"
    audit = project.target / "dbt_defer_audit.json"
    if audit.exists():  # the previous invocation's audit does not survive, looking current
        doc = json.loads(audit.read_text())
        assert doc["metadata"]["status"] == "refused" and doc["resolutions"] == [], doc["metadata"]
    return result


def warnings(result) -> list:
    return [m["msg"] for m in result.messages if m["level"] == "warn" and "dbt-defer" in m["msg"]]


@pytest.fixture
def restore(envs):
    """Files a test edits in the shared project, put back afterwards."""
    saved: dict = {}

    def edit(rel: str, text: str) -> None:
        path = envs.root / rel
        if rel not in saved:
            saved[rel] = path.read_text() if path.exists() else None
        envs.write(rel, text)

    yield edit
    for rel, text in saved.items():
        if text is None:
            (envs.root / rel).unlink()
        else:
            envs.write(rel, text)


def qualified(project, env: str, name: str) -> str:
    return f"{project.database}.{project.schema(env)}.{name}".lower()


def prod_rows(project, name: str) -> list:
    return sorted(project.query(f'select * from "{project.schema("prod")}"."{name}"'), key=repr)


# --- 1. write guard (DuckDB and Postgres) -------------------------------------------------


def refused_nodes(project, *args, env, **kw):
    """Run dbt expecting the guard to fail nodes before they execute (SPEC §7): the run fails,
    without a traceback; returns {unique_id: message} of the refused nodes."""
    result = project.dbt(*args, env=env, expect=False, **kw)
    assert result.exception is None, result.exception
    assert "Traceback" not in result.text()
    return result, {
        uid: str(r.message) for uid, r in result.node_results().items()
        if "dbt-defer: refusing to write" in str(r.message or "")
    }


PROD_BUILT_BY_PRODUCTION = json.dumps({"dbt_defer": {"environments": [
    {"name": "prod", "state": "prod-artifacts", "target": "production"}]}})


def test_write_guard_fails_the_nodes_of_a_target_that_does_not_build_prod(envs, restore):
    """Target 'prod' here is not the target that builds environment prod ('production'): its
    writes into prod's relations are refused, node by node; the seed (changed) stays."""
    customers = envs.read("seeds/raw_customers.csv")
    restore("seeds/raw_customers.csv", customers + "6,Katherine,Johnson,katherine@example.com\n")
    before, raw_before, customers_before = snapshot(envs), prod_rows(envs, "raw_customers"), prod_rows(envs, "customers")
    assert len(raw_before) == 5

    result, refused = refused_nodes(envs, "seed", "--target", "prod", "--vars", PROD_BUILT_BY_PRODUCTION,
                                    env={"DBT_DEFER": "1"})
    assert set(refused) == {envs.uid("raw_customers", "seed"), envs.uid("raw_orders", "seed")}
    line = refused[envs.uid("raw_customers", "seed")]
    assert "refusing to write seed.dbt_defer_integration_tests.raw_customers" in line
    assert qualified(envs, "prod", "raw_customers") in line.lower()
    assert "environment 'prod'" in line and "Nothing was written" in line

    result, refused = refused_nodes(envs, "build", "--target", "prod", "--vars", PROD_BUILT_BY_PRODUCTION,
                                    env={"DBT_DEFER": "1"})
    statuses = {str(r.status) for uid, r in result.node_results().items() if uid not in refused}
    assert refused and statuses <= {"skipped"}, statuses  # everything else depends on a refused seed

    assert snapshot(envs)["relations"] == before["relations"]
    assert prod_rows(envs, "raw_customers") == raw_before
    assert prod_rows(envs, "customers") == customers_before


def test_write_guard_stops_a_dev_profile_pointed_at_the_prod_schema(envs, restore):
    profiles = envs.read("profiles.yml")
    dev_schema, prod_schema = envs.schema("dev"), envs.schema("prod")
    restore("profiles.yml", profiles.replace(f"schema: {dev_schema}\n", f"schema: {prod_schema}\n", 1))
    assert envs.read("profiles.yml") != profiles
    before, rows_before = snapshot(envs), prod_rows(envs, "customers")

    for command in (("run", "-s", "customers"), ("build", "-s", "customers"), ("snapshot",)):
        result, refused = refused_nodes(envs, *command, env=CHAIN)
        assert refused, result.text()
        for line in refused.values():
            assert "environment 'prod'" in line and prod_schema in line

    _, refused = refused_nodes(envs, "run", "-s", "customers", env=CHAIN)
    line = refused[envs.uid("customers")]
    assert f"refusing to write model.dbt_defer_integration_tests.customers into {qualified(envs, 'prod', 'customers')}" in line.lower()
    assert snapshot(envs)["relations"] == before["relations"]
    assert prod_rows(envs, "customers") == rows_before


def test_write_guard_leaves_read_only_commands_alone(envs):
    before = snapshot(envs)["relations"]
    envs.dbt("compile", "--target", "prod", "-s", "customers", env=PROD_ONLY)
    assert snapshot(envs)["relations"] == before


def test_write_guard_exit_code_of_the_cli(envs, restore):
    """The real process: dbt's exit codes, no Python traceback."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DBT_")}
    environ.update(CHAIN, DBT_SEND_ANONYMOUS_USAGE_STATS="false")
    if envs.adapter == "duckdb":
        # the in-process test runs hold DuckDB's file lock; this process must not need the warehouse
        environ["DBT_DEFER_PROD_STATE"] = str(envs.root / "no-such-folder")
        expected, code = "does not exist", 2
    else:
        profiles = envs.read("profiles.yml")
        restore("profiles.yml", profiles.replace(f"schema: {envs.schema('dev')}\n", f"schema: {envs.schema('prod')}\n", 1))
        expected, code = "refusing to write", 1  # a node failed: dbt's exit code 1
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "dbt"), "run", "-s", "customers",
         "--project-dir", str(envs.root), "--profiles-dir", str(envs.root)],
        env=environ, capture_output=True, text=True, timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == code, out
    assert "Traceback" not in out
    assert expected in out


def _env(name, relations):
    manifest = SimpleNamespace(relations=relations)
    return SimpleNamespace(name=name, manifest=manifest, spec=EnvironmentSpec(name, f"/{name}", "vars"))


def _node(uid, database, schema, alias, ephemeral=False, resource_type="model", **config):
    return SimpleNamespace(
        unique_id=uid, database=database, schema=schema, alias=alias, name=alias, meta={},
        resource_type=resource_type, is_ephemeral_model=ephemeral, config=SimpleNamespace(**config),
    )


def test_write_clashes_unit():
    prod = _env("prod", {("db", "prod", "a"): "model.p.a", (None, "raw", "src"): "source.p.raw.src",
                         ("db", "prod_dbt_test__audit", "t"): "test.p.t", ("db", "prod", "fn"): "function.p.fn"})
    dev = SimpleNamespace(nodes={
        "model.p.a": _node("model.p.a", "db", "dev", "a"),
        "model.p.x": _node("model.p.x", "DB", "PROD", "A"),  # another node aliased onto prod's table
        "model.p.eph": _node("model.p.eph", "db", "prod", "a", ephemeral=True),
        "model.p.src": _node("model.p.src", "db", "raw", "src"),  # onto a source; no database there
        "model.p.raw_new": _node("model.p.raw_new", "db", "raw", "other"),  # a source's schema: not built by prod
        "model.p.new": _node("model.p.new", "db", "prod", "brand_new"),  # new, in a schema prod builds
        "model.p.custom": _node("model.p.custom", "db", "dev_extra", "a"),  # dbt's custom schema: follows dev
        "test.p.t": _node("test.p.t", "db", "prod_dbt_test__audit", "t", resource_type="test"),  # stores no failures
        "test.p.s": _node("test.p.s", "db", "prod_dbt_test__audit", "t", resource_type="test", store_failures=True),
        "snapshot.p.legacy": _node("snapshot.p.legacy", "db", "snaps", "legacy", resource_type="snapshot",
                                   target_schema="snaps"),
        "snapshot.p.opted": _node("snapshot.p.opted", "db", "snaps", "opted", resource_type="snapshot",
                                  target_schema="snaps", meta={"dbt_defer": {"shared": True}}),
    }, functions={"function.p.fn": _node("function.p.fn", "db", "prod", "fn", resource_type="function")})
    prod.manifest.relations[("db", "snaps", "legacy")] = "snapshot.p.legacy"
    prod.manifest.relations[("db", "snaps", "opted")] = "snapshot.p.opted"
    refused, shared = guard.write_clashes(
        ["model.p.a", "model.p.eph", "test.p.t", "model.p.x", "model.p.src", "test.p.s", "snapshot.p.legacy",
         "snapshot.p.opted", "model.p.new", "model.p.raw_new", "model.p.custom", "function.p.fn"],
        dev, [prod], default_database="db", target_schema="dev")
    assert sorted(refused) == ["function.p.fn", "model.p.new", "model.p.src", "model.p.x", "snapshot.p.legacy",
                               "test.p.s"]
    assert re.search(r"refusing to write model\.p\.x into DB\.PROD\.A: environment 'prod' .* for model\.p\.a", refused["model.p.x"])
    assert "for source.p.raw.src" in refused["model.p.src"]
    assert "records that relation for it" in refused["function.p.fn"]
    assert "schema db.prod holds environment 'prod''s relations" in refused["model.p.new"]
    assert "opt in on the node: meta: {dbt_defer: {shared: true}}" in refused["snapshot.p.legacy"]
    assert list(shared) == ["snapshot.p.opted"]
    # the opt-in is not honoured where the target is the reason: a target whose schema is that schema
    refused, shared = guard.write_clashes(["snapshot.p.opted"], dev, [prod], default_database="db", target_schema="snaps")
    assert list(refused) == ["snapshot.p.opted"] and not shared
    # --store-failures makes every test store; a test-level store_failures: false wins
    refused, _ = guard.write_clashes(["test.p.t"], dev, [prod], default_database="db", store_failures=True)
    assert list(refused) == ["test.p.t"]
    assert guard.write_clashes(["model.p.x"], dev, [], default_database="db") == ({}, {})


# --- 2. never_defer / meta dbt_defer.defer: false ------------------------------------------


def test_never_defer_reads_only_from_dev(envs):
    """pii_emails is tag:pii (never_defer in the project vars); prod has it, dev does not."""
    assert envs.relation_exists("prod", "pii_emails")
    assert not envs.relation_exists("dev", "pii_emails")
    before = snapshot(envs)["relations"]

    result = envs.dbt("run", "-s", "pii_report", env=CHAIN, expect=False)
    assert result.exception is None  # the node fails, before it executes
    line = defer_line(result)
    assert "pii_report refs model.dbt_defer_integration_tests.pii_emails" in line
    assert "restricted" in line and qualified(envs, "dev", "pii_emails") in line.lower()
    assert "dbt build -s +pii_report" in line
    assert envs.schema("prod") not in line
    assert snapshot(envs)["relations"] == before  # pii_report was not created

    # present in dev: read from dev, reason restricted
    envs.dbt("run", "-s", "pii_emails", env=CHAIN)
    envs.dbt("run", "-s", "pii_report", env=CHAIN)
    record = envs.resolutions()[(envs.uid("pii_report"), envs.uid("pii_emails"))]
    assert (record["env"], record["reason"]) == ("dev", "restricted")
    assert envs.schema("dev") in record["relation"]
    assert envs.schema("dev") in envs.compiled("models/restricted/pii_report.sql")


def test_meta_defer_false_is_never_deferred(envs, restore):
    restore("models/staging/_safety_meta.yml", (
        "version: 2\nmodels:\n  - name: stg_orders\n    config:\n      meta:\n        dbt_defer:\n          defer: false\n"
    ))
    assert not envs.relation_exists("dev", "stg_orders")
    before = snapshot(envs)["relations"]
    result = envs.dbt("run", "-s", "orders", env=CHAIN, expect=False)
    line = defer_line(result)
    assert "orders refs model.dbt_defer_integration_tests.stg_orders, which is restricted" in line
    assert qualified(envs, "dev", "stg_orders") in line.lower()
    assert snapshot(envs)["relations"] == before


@pytest.mark.parametrize(
    "never_defer, expected",
    [
        ("['tag:pii', 'bogus_method:x']", "never_defer selector 'bogus_method:x' is not a valid dbt selector"),
        ("5", "never_defer (dbt_project.yml or --vars) must be a list of dbt selectors"),
    ],
)
def test_bad_never_defer_is_one_clear_line(envs, never_defer, expected):
    before = snapshot(envs)
    result = refused(envs, "run", "-s", "customers", "--vars", f"{{dbt_defer: {{never_defer: {never_defer}}}}}", env=CHAIN)
    line = defer_line(result)
    assert expected in line
    assert "tag:pii" in line  # the fix shows the syntax
    assert snapshot(envs) == before


def test_never_defer_selector_matching_nothing_warns(envs):
    result = envs.dbt("compile", "-s", "customers", "--vars", "{dbt_defer: {never_defer: ['tag:piii']}}", env=CHAIN)
    assert any("never_defer selector 'tag:piii' matches no node" in w for w in warnings(result))
    assert not any("does not match any enabled nodes" in m["msg"] for m in result.messages)


@pytest.mark.parametrize(
    "settings, expected",
    [
        ("{max_age_hours: -1}", "max_age_hours (dbt_project.yml or --vars) is -1; use a positive number"),
        ("{limitz: {dev: 5}}", "unknown key(s) 'limitz' in vars: dbt_defer"),
        ("{environments: [{name: dev, state: x}]}", "'dev' in vars: dbt_defer: environments"),
        # issue 11: a limit no warehouse accepts is refused at config time, not at the audit write
        ("{limits: {dev: 9223372036854775808}}", "for target 'dev' is 9223372036854775808; use a whole number from 0 to 2147483647"),
    ],
)
def test_bad_config_is_one_clear_line(envs, settings, expected):
    before = snapshot(envs)
    result = refused(envs, "run", "-s", "customers", "--vars", f"{{dbt_defer: {settings}}}", env=CHAIN)
    assert expected in defer_line(result)
    assert snapshot(envs) == before


# --- 3. manifest validation -----------------------------------------------------------------


def _prod_manifest(envs) -> dict:
    return json.loads((envs.root / "prod-artifacts" / "manifest.json").read_text())


def _bad_state(envs, tmp_path, case):
    """(state value, what the line must say) for each broken environment."""
    folder = tmp_path / case
    folder.mkdir()
    manifest = folder / "manifest.json"
    if case == "missing":
        return str(tmp_path / "nowhere"), ["state location", "does not exist", "point it at a folder holding manifest.json"]
    if case == "empty_folder":
        return str(folder), ["manifest.json does not exist", "copy that environment's manifest.json there"]
    if case == "unreadable":
        manifest.mkdir()  # tests run as root: chmod 000 would not stop a read, a directory does
        return str(folder), ["cannot read", "Is a directory", "point the environment at the folder"]
    if case == "not_json":
        manifest.write_text('{"metadata": {"dbt_schema_version": "https://schemas.getdbt.com/dbt/manifest/v12.json"')
        return str(folder), ["is not valid JSON", "copy that environment's manifest.json again"]
    if case == "not_a_manifest":
        manifest.write_text((envs.root / "prod-artifacts" / "run_results.json").read_text())
        return str(folder), ["is JSON but not a dbt manifest", "run-results", "manifest.json that dbt writes into target/"]
    if case == "json_list":
        manifest.write_text("[1, 2, 3]")
        return str(folder), ["is JSON but not a dbt manifest", "manifest.json that dbt writes into target/"]
    if case == "other_project":
        data = _prod_manifest(envs)
        data["metadata"]["project_name"] = "jaffle_shop"
        manifest.write_text(json.dumps(data))
        return str(folder), ["manifest of project 'jaffle_shop'", "not of 'dbt_defer_integration_tests'",
                             "point the environment at this project's artifacts"]
    if case == "future_schema":
        data = _prod_manifest(envs)
        data["metadata"]["dbt_schema_version"] = "https://schemas.getdbt.com/dbt/manifest/v99.json"
        data["metadata"]["dbt_version"] = "9.0.0"
        data["nodes"] = {"model.x.y": {"config": "a shape this plugin does not know"}}
        manifest.write_text(json.dumps(data))
        return str(folder), ["manifest/v99.json", "dbt 9.0.0", "which this dbt cannot read",
                             "regenerate it with this dbt version"]
    if case == "own_target":
        return "target", ["is this run's own target path", "which dbt overwrites during the run",
                          "copy that environment's artifacts to another folder"]
    if case == "own_target_file":
        return "target/manifest.json", ["is this run's own target path"]
    raise AssertionError(case)


CASES = ["missing", "empty_folder", "unreadable", "not_json", "not_a_manifest", "json_list",
         "other_project", "future_schema", "own_target", "own_target_file"]


@pytest.mark.parametrize("case", CASES)
def test_bad_manifest_is_one_clear_line(envs, tmp_path, case):
    state, phrases = _bad_state(envs, tmp_path, case)
    before = snapshot(envs)
    result = refused(envs, "run", "-s", "customers", env={**CHAIN, "DBT_DEFER_PROD_STATE": state})
    line = defer_line(result)
    assert line.startswith("dbt-defer: environment 'prod'")
    shown = state if os.path.isabs(state) else str(envs.root / state)
    assert shown in line or (Path(shown) / "manifest.json").as_posix() in line
    for phrase in phrases:
        assert phrase in line, line
    assert len([ln for ln in str(result.exception).splitlines() if ln.strip()]) == 2  # "Runtime Error" + the line
    assert snapshot(envs) == before


def test_bad_staging_is_named_not_prod(envs, tmp_path):
    state, _ = _bad_state(envs, tmp_path, "not_json")
    result = refused(envs, "run", "-s", "customers", env={**CHAIN, "DBT_DEFER_STAGING_STATE": state})
    assert defer_line(result).startswith(f"dbt-defer: environment 'staging': {state}")


@pytest.mark.parametrize("state", ["prod-artifacts/manifest.json", "{root}/prod-artifacts/manifest.json", "prod-artifacts/"])
def test_manifest_file_or_folder_is_accepted(envs, state):
    result = envs.dbt("compile", "-s", "customers", env={**PROD_ONLY, "DBT_DEFER_PROD_STATE": state.format(root=envs.root)})
    record = envs.resolutions()[(envs.uid("customers"), envs.uid("stg_customers"))]
    assert (record["env"], record["reason"]) == ("prod", "deferred")
    assert not warnings(result)
    assert envs.audit()["environments"][0]["state"] == os.path.normpath(os.path.join(envs.root, state.format(root=envs.root)))


def test_manifest_errors_unit(tmp_path):
    """The reader alone: run_results named manifest.json, an incompatible schema that also fails to decode."""
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"metadata": {"dbt_schema_version": "https://schemas.getdbt.com/dbt/run-results/v6.json"},
                                "results": []}))
    with pytest.raises(ManifestError, match=r"not a dbt manifest \(metadata.dbt_schema_version is .*run-results/v6"):
        load_manifest("qa", str(path))
    path.write_text(json.dumps({"metadata": {"dbt_schema_version": "https://schemas.getdbt.com/dbt/manifest/v3.json",
                                             "dbt_version": "0.19.0"}, "nodes": {"a": {"config": 1}}}))
    with pytest.raises(ManifestError, match=r"environment 'qa': .*manifest/v3.json \(written by dbt 0.19.0\), which this dbt cannot read"):
        load_manifest("qa", str(path), is_compatible=lambda v: v.endswith("v12.json"))
    # the file's own version text is shown on one line, whatever line separators it holds
    path.write_text(json.dumps({"metadata": {"dbt_schema_version": "https://schemas.getdbt.com/dbt/manifest/v3.json",
                                             "dbt_version": "0.19\u2028\x1c\n0"}, "nodes": {}}))
    with pytest.raises(ManifestError) as info:
        load_manifest("qa", str(path), is_compatible=lambda v: v.endswith("v12.json"))
    assert len(str(info.value).splitlines()) == 1 and "written by dbt 0.19 0)" in str(info.value)
    deep = "[" * 5000 + "]" * 5000  # msgspec raises RecursionError past ~1000 levels
    path.write_text('{"metadata": {"dbt_schema_version": "https://schemas.getdbt.com/dbt/manifest/v12.json"}, '
                    '"nodes": {"a": {"unrendered_config": {"k": %s}}}}' % deep)
    with pytest.raises(ManifestError, match="nested too deeply"):
        load_manifest("qa", str(path))


# --- 4. staleness and run_results -----------------------------------------------------------


def _copy_state(envs, tmp_path, source: str) -> Path:
    folder = tmp_path / f"{source}-copy"
    folder.mkdir()
    for name in ("manifest.json", "run_results.json"):
        (folder / name).write_bytes((envs.root / source / name).read_bytes())
    return folder


def test_stale_manifest_warns_with_its_age(envs, tmp_path):
    folder = _copy_state(envs, tmp_path, "prod-artifacts")
    data = json.loads((folder / "manifest.json").read_text())
    old = datetime.now(timezone.utc) - timedelta(hours=100)
    data["metadata"]["generated_at"] = old.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    (folder / "manifest.json").write_text(json.dumps(data))
    env = {**PROD_ONLY, "DBT_DEFER_PROD_STATE": str(folder)}

    result = envs.dbt("compile", "-s", "customers", env=env)
    [warning] = [w for w in warnings(result) if "old" in w]
    assert "environment 'prod'" in warning and str(folder / "manifest.json") in warning
    assert "4.2 days (100 hours) old" in warning
    assert "max_age_hours 72" in warning and "refresh" in warning
    assert envs.resolutions()[(envs.uid("customers"), envs.uid("stg_customers"))]["env"] == "prod"

    quiet = envs.dbt("compile", "-s", "customers", "--vars", "{dbt_defer: {max_age_hours: 101}}", env=env)
    assert not [w for w in warnings(quiet) if "old" in w]
    fresh = envs.dbt("compile", "-s", "customers", env=PROD_ONLY)
    assert not [w for w in warnings(fresh) if "old" in w]


def test_a_manifest_dated_in_the_future_warns(envs, tmp_path):
    """Issue 22 (9): generated_at 9999-12-31 was never stale; ahead of now by more than a small
    clock skew warns (with the path), and `dbt-defer status` does not call it fresh."""
    from dbt_defer import chain
    from dbt_defer.config import EnvironmentSpec
    from dbt_defer.manifests import load_manifest

    folder = _copy_state(envs, tmp_path, "prod-artifacts")
    data = json.loads((folder / "manifest.json").read_text())
    data["metadata"]["generated_at"] = "9999-12-31T00:00:00.000000Z"
    (folder / "manifest.json").write_text(json.dumps(data))
    env = {**PROD_ONLY, "DBT_DEFER_PROD_STATE": str(folder)}

    result = envs.dbt("compile", "-s", "customers", env=env)
    [warning] = [w for w in warnings(result) if "in the future" in w]
    assert "environment 'prod'" in warning and str(folder / "manifest.json") in warning
    assert "9999-12-31" in warning and "clock" in warning

    spec = EnvironmentSpec("prod", str(folder), "vars")
    loaded = load_manifest("prod", str(folder / "manifest.json"))
    now = datetime.now(timezone.utc)
    skewed = replace(loaded, generated_at=(now + timedelta(minutes=2)).strftime("%Y-%m-%dT%H:%M:%SZ"))
    assert chain.stale_warning(spec, skewed, 72.0, now=now) is None  # two minutes: clock skew
    ahead = replace(loaded, generated_at=(now + timedelta(hours=3)).strftime("%Y-%m-%dT%H:%M:%SZ"))
    assert "in the future" in chain.stale_warning(spec, ahead, 72.0, now=now)


@pytest.mark.parametrize("status", ["error", "fail", "skipped"])
def test_run_results_failures_fall_through_to_the_next_environment(envs, tmp_path, status):
    """staging built stg_orders; a bad status there sends the ref on to prod."""
    folder = _copy_state(envs, tmp_path, "staging-artifacts")
    env = {**CHAIN, "DBT_DEFER_STAGING_STATE": str(folder)}
    key = (envs.uid("orders"), envs.uid("stg_orders"))

    envs.dbt("compile", "-s", "orders", env=env)
    assert envs.resolutions()[key]["env"] == "staging"  # the control: staging serves it

    results = json.loads((folder / "run_results.json").read_text())
    hits = [r for r in results["results"] if r["unique_id"] == envs.uid("stg_orders")]
    assert hits
    for r in hits:
        r["status"] = status
    (folder / "run_results.json").write_text(json.dumps(results))

    envs.dbt("compile", "-s", "orders", env=env)
    record = envs.resolutions()[key]
    assert (record["env"], record["reason"]) == ("prod", "deferred")
    assert envs.schema("prod") in record["relation"]
