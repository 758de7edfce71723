"""The dbt-defer command line (SPEC §8) against real projects: status, explain, fetch, --help.

``envs`` (conftest): prod built in full -> prod-artifacts/; staging built in part (seeds,
stg_customers, stg_orders, orders) -> staging-artifacts/. The chain is given by environment
variables here; one test reads it from dbt_project.yml vars instead.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional, Tuple

import pytest

from dbt_harness import _environment
from dbt_defer import cli
from test_remote import Server

CHAIN = {"DBT_DEFER_STAGING_STATE": "staging-artifacts", "DBT_DEFER_PROD_STATE": "prod-artifacts"}
SCRIPT = Path(sys.executable).parent / "dbt-defer"


def run_cli(capsys, project, *args: str, env: Optional[Dict[str, str]] = None, profiles: bool = True) -> Tuple[int, str, str]:
    argv = [*args, "--project-dir", str(project.root)]
    if profiles and args and args[0] == "explain":
        argv += ["--profiles-dir", str(project.root)]
    capsys.readouterr()
    with _environment(env if env is not None else CHAIN):
        code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_clear_line(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("dbt-defer:"), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


# --- help ------------------------------------------------------------------------------------


def test_help_explains_every_command_with_examples():
    assert SCRIPT.exists(), "console script missing: pip install -e . in the venv"
    main = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True)
    assert main.returncode == 0
    for word in ("status", "explain", "fetch", "publish", "examples:", "DBT_DEFER_PROD_STATE"):
        assert word in main.stdout
    for command, words in {
        "status": ("--project-dir", "--profiles-dir", "--target", "--output", "stale", "dbt-defer status"),
        "explain": ("--select", "--target", "--project-dir", "--profiles-dir", "--output", "dbt-defer explain -s"),
        "fetch": ("--force", "--env", "s3://", "dbt-defer fetch"),
        "publish": ("URI", "--env", "--keep", "--only-success", "latest.json", "versions/", "dbt-defer publish s3://"),
    }.items():
        res = subprocess.run([str(SCRIPT), command, "--help"], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        assert "examples:" in res.stdout
        for word in words:
            assert word in res.stdout, (command, word)


def test_bad_usage_exits_2_without_traceback(tmp_path):
    res = subprocess.run([str(SCRIPT), "status", "--project-dir", str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 2
    assert_one_clear_line(res.stderr, "no dbt_project.yml")
    res = subprocess.run([str(SCRIPT), "status", "--output", "xml"], capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr


def test_the_chain_logic_does_not_import_the_cli():
    code = (
        "import sys, dbt_defer, dbt_defer.config, dbt_defer.manifests, dbt_defer.resolution, "
        "dbt_defer.audit, dbt_defer.guard, dbt_defer.session, dbt_defer.remote; "
        "assert 'dbt_defer.cli' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- status ----------------------------------------------------------------------------------


def test_status_table_and_json(envs, capsys):
    code, out, err = run_cli(capsys, envs, "status")
    assert code == 0, err
    for word in ("staging", "prod", "staging-artifacts", "DBT_DEFER_PROD_STATE", "generated_at", "age", "dbt version", "nodes", "run_results", "stale"):
        assert word in out
    assert out.index("| staging") < out.index("| prod")

    code, out, err = run_cli(capsys, envs, "status", "--output", "json")
    assert code == 0, err
    doc = json.loads(out)
    assert [e["name"] for e in doc["environments"]] == ["staging", "prod"]
    prod_manifest = json.loads((envs.root / "prod-artifacts" / "manifest.json").read_text())
    prod = doc["environments"][1]
    assert prod["usable"] and prod["stale"] is False
    assert prod["nodes"] == len(prod_manifest["nodes"])
    assert prod["generated_at"] == prod_manifest["metadata"]["generated_at"]
    assert prod["dbt_version"] == prod_manifest["metadata"]["dbt_version"]
    assert prod["configured_by"] == "DBT_DEFER_PROD_STATE"
    assert prod["run_results"] is True
    assert doc["usable"] is True
    # a manifest alone: the column says no (failed nodes there are unknown, no build times)
    alone = envs.root / "prod-manifest-alone"
    alone.mkdir(exist_ok=True)
    (alone / "manifest.json").write_text((envs.root / "prod-artifacts" / "manifest.json").read_text())
    code, out, err = run_cli(capsys, envs, "status", "--output", "json", env=dict(CHAIN, DBT_DEFER_PROD_STATE=str(alone)))
    assert code == 0, err
    assert [e["run_results"] for e in json.loads(out)["environments"]] == [True, False]


def test_status_names_the_target_its_chain_and_the_shim(envs, capsys):
    code, out, err = run_cli(capsys, envs, "status", "--target", "dev")
    assert code == 0, err
    assert "target 'dev': the target's own relations first, then:" in out
    assert "ref shim: installed (macros/ref.sql)" in out
    code, out, err = run_cli(capsys, envs, "status", "--target", "staging")
    assert "target 'staging' builds environment 'staging', so its runs defer only to prod:" in out
    code, out, err = run_cli(capsys, envs, "status", "--target", "prod", "--output", "json")
    assert json.loads(out)["ref_shim"] == "macros/ref.sql"

    shim = envs.root / "macros" / "ref.sql"
    saved = shim.read_text()
    shim.unlink()
    try:
        code, out, err = run_cli(capsys, envs, "status", "--target", "dev")
    finally:
        shim.write_text(saved)
    assert "ref shim: not installed; add macros/ref.sql containing: {% macro ref() %}" in out


def test_explain_shortens_ids_like_dbt_and_json_keeps_them(envs, capsys):
    code, out, err = run_cli(capsys, envs, "explain", "-s", "model_b", "--target", "dev")
    assert code == 0, err
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| node")]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows if not set(row) <= set("|- ")]
    assert ["model_b", "model_a"] == cells[0][:2]
    assert ["test relationships_model_b_id__id__ref_model_a_", "model_a"] in [c[:2] for c in cells]
    assert "test.dbt_defer_integration_tests" not in out and max(len(line) for line in out.splitlines()) < 170
    code, out, err = run_cli(capsys, envs, "explain", "-s", "model_b", "--target", "dev", "--output", "json")
    nodes = {r["node"] for r in json.loads(out)["resolutions"]}
    assert "test.dbt_defer_integration_tests.relationships_model_b_id__id__ref_model_a_.ea90810b97" in nodes


def test_status_stale_is_reported_but_usable(envs, capsys):
    code, out, _ = run_cli(capsys, envs, "status", "--vars", "{dbt_defer: {max_age_hours: 0.000001}}", "--output", "json")
    assert code == 0
    assert all(e["stale"] for e in json.loads(out)["environments"])
    code, out, _ = run_cli(capsys, envs, "status", "--vars", "{dbt_defer: {max_age_hours: 0.000001}}")
    assert code == 0 and "STALE" in out


def test_status_unusable_environment_exits_1(envs, capsys):
    env = dict(CHAIN, DBT_DEFER_PROD_STATE="no-such-folder")
    code, out, err = run_cli(capsys, envs, "status", env=env)
    assert code == 1
    assert "UNUSABLE" in out
    assert_one_clear_line(err, "'prod'", "no-such-folder")
    code, out, _ = run_cli(capsys, envs, "status", "--output", "json", env=env)
    doc = json.loads(out)
    assert code == 1 and doc["usable"] is False
    assert doc["environments"][0]["usable"] and not doc["environments"][1]["usable"]


def test_status_nothing_configured_exits_1(envs, capsys):
    code, _, err = run_cli(capsys, envs, "status", env={})
    assert code == 1
    assert_one_clear_line(err, "no environment is configured")


def test_status_reads_project_vars_like_a_run(envs, capsys, tmp_path):
    """vars: dbt_defer in dbt_project.yml (relative paths from the project root), env vars win."""
    (tmp_path / "prod").symlink_to(envs.root / "prod-artifacts")
    (tmp_path / "dbt_project.yml").write_text(
        "name: dbt_defer_integration_tests\nversion: '1.0'\nconfig-version: 2\nprofile: x\n"
        "vars:\n  dbt_defer:\n    environments:\n"
        "      - {name: qa, state: " + str(envs.root / "staging-artifacts") + "}\n"
        "      - {name: prod, state: prod}\n"
        "    limits: {dev: 10}\n"
    )
    args = ["status", "--project-dir", str(tmp_path), "--target", "dev", "--output", "json"]
    with _environment({}):
        code = cli.main(args)
    doc = json.loads(capsys.readouterr().out)
    assert code == 0
    assert [(e["name"], e["configured_by"]) for e in doc["environments"]] == [("qa", "vars"), ("prod", "vars")]
    assert doc["environments"][1]["state"] == str(tmp_path / "prod")
    assert doc["limit"] == 10
    with _environment({"DBT_DEFER_PROD_STATE": "elsewhere"}):
        code = cli.main(args)
    doc = json.loads(capsys.readouterr().out)
    assert code == 1 and doc["environments"][1]["configured_by"] == "DBT_DEFER_PROD_STATE"


def test_status_jinja_in_vars_is_named(tmp_path, capsys):
    (tmp_path / "dbt_project.yml").write_text(
        "name: p\nprofile: p\nvars:\n  dbt_defer:\n    environments:\n"
        "      - {name: prod, state: \"{{ env_var('PROD_STATE') }}\"}\n"
    )
    with _environment({}):
        code = cli.main(["status", "--project-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1
    assert_one_clear_line(err, "contains Jinja", "DBT_DEFER_PROD_STATE")


# --- explain ---------------------------------------------------------------------------------


def warehouse_snapshot(project) -> list:
    """Every schema and relation of this project's environments (dev, staging, prod)."""
    prefix = project.schema_prefix
    if project.adapter == "postgres":
        schemas = project.query(
            f"select schema_name, '' , '' from information_schema.schemata where schema_name like '{prefix}%'"
        )
    else:
        schemas = project.query("select schema_name, '', '' from information_schema.schemata")
    tables = project.query(
        "select table_schema, table_name, table_type from information_schema.tables "
        f"where table_schema like '{prefix}%'"
    )
    return sorted(map(tuple, schemas)) + sorted(map(tuple, tables))


def tree_snapshot(root: Path) -> dict:
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            if path.suffix in (".duckdb", ".wal") or name.endswith(".duckdb.wal"):
                continue
            st = path.lstat()
            out[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def test_explain_creates_alters_drops_nothing(envs, capsys):
    envs.dbt("compile", "-s", "customers")  # a user's own target/ with a manifest in it
    relations_before = warehouse_snapshot(envs)
    files_before = tree_snapshot(envs.root)

    code, out, err = run_cli(capsys, envs, "explain", "-s", "customers", "--target", "dev", "--output", "json")
    assert code == 0, err
    assert warehouse_snapshot(envs) == relations_before
    assert tree_snapshot(envs.root) == files_before  # target/ (and everything else) untouched

    doc = json.loads(out)
    got = {(r["node"], r["ref"]): r for r in doc["resolutions"]}
    customers, stg_customers = envs.uid("customers"), envs.uid("stg_customers")
    r = got[(customers, stg_customers)]
    assert (r["env"], r["reason"], r["limit"]) == ("staging", "deferred", None)
    assert envs.schema("staging") in r["relation"]
    assert got[(customers, envs.uid("int_order_totals"))]["env"] == "ephemeral"
    tests = [r for (node, _), r in got.items() if node.startswith("test.")]
    assert tests and all((r["env"], r["reason"]) == ("dev", "selected") for r in tests)
    assert set(doc["summary"]) >= {"dev", "staging", "ephemeral", "limited"}
    for record in doc["resolutions"]:
        assert set(record) >= {"node", "ref", "env", "relation", "reason", "limit"}


def test_explain_as_compile_matches_dbt_compile(envs, capsys):
    code, out, err = run_cli(capsys, envs, "explain", "-s", "customers", "--target", "dev", "--as", "compile", "--output", "json")
    assert code == 0, err
    explained = {(r["node"], r["ref"]): (r["env"], r["reason"]) for r in json.loads(out)["resolutions"]}
    envs.dbt("compile", "-s", "customers", "--target", "dev", env=dict(CHAIN, DBT_DEFER="1"))
    compiled = {key: (r["env"], r["reason"]) for key, r in envs.resolutions().items()}
    assert explained == compiled


def test_explain_reports_the_write_guard_like_a_build(envs, capsys):
    """A target that does not build prod, pointed at the prod schema (here: target 'prod' while
    'production' builds prod): the build would be refused, so is the explain."""
    before = warehouse_snapshot(envs)
    settings = '{dbt_defer: {environments: [{name: prod, state: prod-artifacts, target: production}]}}'
    code, _, err = run_cli(capsys, envs, "explain", "-s", "customers", "--target", "prod", "--vars", settings,
                           env={"DBT_DEFER_PROD_STATE": "prod-artifacts"})
    assert code == 1
    assert_one_clear_line(err, "refusing to write", "customers")
    assert warehouse_snapshot(envs) == before


def test_explain_of_the_target_that_builds_the_last_environment(envs, capsys):
    """SPEC §3: target prod builds prod, the last of the chain: nothing to defer to, one line."""
    code, out, err = run_cli(capsys, envs, "explain", "-s", "customers", "--target", "prod")
    assert code == 0, err
    assert_one_clear_line(err, "target 'prod' builds environment 'prod'", "nothing to defer to")


def test_explain_table_with_limits(envs, capsys):
    code, out, err = run_cli(
        capsys, envs, "explain", "-s", "customer_report", "--target", "dev",
        "--vars", "{dbt_defer: {limits: {dev: 1000}, never_defer: ['tag:pii']}}",
    )
    assert code == 0, err
    header = next(line for line in out.splitlines() if line.startswith("| node"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["node", "ref", "env", "relation", "reason", "limit"]
    row = next(line for line in out.splitlines() if "dim_customers.v1" in line)
    assert "| prod" in row and "deferred" in row and "1000" in row
    assert out.rstrip().splitlines()[-1].startswith("dbt-defer: ")
    assert "limited to 1000 rows" in out


def test_explain_prints_the_savings_estimate(envs, capsys):
    """The same not_built / saved_seconds and the same summary line as a deferred run."""
    from test_audit import expected_savings, savings_tail

    upstream = [envs.uid("raw_customers", "seed"), envs.uid("raw_orders", "seed"), envs.uid("stg_customers"),
                envs.uid("stg_orders")]  # int_order_totals is ephemeral: nothing to build
    seconds, used = expected_savings(envs, upstream)
    assert used == ["staging"]
    code, out, err = run_cli(capsys, envs, "explain", "-s", "customers", "--target", "dev", "--output", "json")
    assert code == 0, err
    summary = json.loads(out)["summary"]
    assert (summary["not_built"], summary["saved_seconds"]) == (4, seconds)

    code, out, err = run_cli(capsys, envs, "explain", "-s", "customers", "--target", "dev")
    assert code == 0, err
    last = out.rstrip().splitlines()[-1]
    assert last.endswith(savings_tail(4, seconds, used)), last
    # as dbt compile: a compile builds nothing, so it claims no savings (issue 24), like dbt compile itself
    code, out, err = run_cli(capsys, envs, "explain", "-s", "customers", "--target", "dev", "--as", "compile")
    assert code == 0, err
    last = out.rstrip().splitlines()[-1]
    assert "not rebuilt" not in last, last
    result = envs.dbt("compile", "-s", "customers", "--target", "dev", env=dict(CHAIN, DBT_DEFER="1"))
    assert [m["msg"] for m in result.messages if m["level"] == "info" and "refs resolved" in m["msg"]] == [last]


def test_explain_unresolvable_ref_is_a_missing_row(envs, capsys):
    """SPEC §8: a ref found nowhere is a row (env: missing), not an error hiding the others."""
    env = {"DBT_DEFER_STAGING_STATE": "staging-artifacts"}  # staging never built the marts
    before = warehouse_snapshot(envs)
    code, out, err = run_cli(capsys, envs, "explain", "-s", "customer_report", "--target", "dev", env=env)
    assert code == 0, err
    row = next(line for line in out.splitlines() if "dim_customers.v1" in line)
    assert "| missing" in row
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 3 and "Traceback" not in err, err  # dim_customers v1, customers, calendar_years
    assert all(line.startswith("dbt-defer:") and "customer_report" in line and "exists nowhere" in line for line in lines)
    assert warehouse_snapshot(envs) == before


HAS_COLUMNS = """{% test has_columns(model) %}
{%- if execute and not adapter.get_columns_in_relation(model) -%}
  {{ exceptions.raise_compiler_error("no columns in " ~ model ~ " yet") }}
{%- endif %}
select 1 as x where 1 = 0
{% endtest %}
"""


def test_explain_prints_what_compiled_and_names_what_did_not(envs, capsys):
    """A generic test that reads the model's columns at compile time raises while the model is
    not built in dev yet (dbt build compiles it after the model): the table still shows the
    model's rows, and one line names the test (issue 24)."""
    with envs.edited("tests/generic/has_columns.sql", HAS_COLUMNS), \
            envs.edited("models/explain_new.sql", "select customer_id from {{ ref('stg_customers') }}\n"), \
            envs.edited("models/_explain_new.yml", "models:\n  - name: explain_new\n    data_tests: [has_columns]\n"):
        code, out, err = run_cli(capsys, envs, "explain", "-s", "explain_new", "--target", "dev")
        assert code == 0, err
        row = next(line for line in out.splitlines() if line.startswith("| explain_new"))
        assert "| stg_customers" in row and "| staging" in row
        [line] = [line for line in err.splitlines() if "did not compile" in line]
        assert line.startswith("dbt-defer: explain: test has_columns_explain_new_ did not compile, so its refs are "
                               "not in the table (")
        assert "no columns in" in line and "Traceback" not in err
        code, out, err = run_cli(capsys, envs, "explain", "-s", "explain_new", "--target", "dev", "--output", "json")
        assert code == 0, err
        doc = json.loads(out)
        assert len(doc["not_compiled"]) == 1 and doc["not_compiled"][0]["node"].startswith(
            "test.dbt_defer_integration_tests.has_columns_explain_new")
        assert {r["node"] for r in doc["resolutions"]} >= {"model.dbt_defer_integration_tests.explain_new"}


def test_explain_into_a_closed_pipe_exits_quietly(envs):
    """dbt-defer explain ... | head: the reader is gone before the table is printed."""
    from test_audit import release_duckdb

    release_duckdb()  # the explain runs in another process
    env = dict(os.environ, **CHAIN, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    cmd = (f"{shlex.quote(sys.executable)} -m dbt_defer.cli explain -s customers --target dev "
           f"--project-dir {shlex.quote(str(envs.root))} --profiles-dir {shlex.quote(str(envs.root))} | true; "
           "exit ${PIPESTATUS[0]}")
    res = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=env, cwd=str(envs.root))
    assert "BrokenPipeError" not in res.stderr and "unexpected error" not in res.stderr, res.stderr
    assert res.returncode == 141, res.stderr  # 128 + SIGPIPE: what a shell reports for a closed pipe


def test_explain_without_any_environment_exits_2(envs, capsys):
    code, _, err = run_cli(capsys, envs, "explain", "-s", "customers", env={})
    assert code == 2
    assert_one_clear_line(err, "no environment is configured")


# --- fetch -----------------------------------------------------------------------------------


def test_fetch_over_http_cache_reuse_auto_fetch_and_unreachable(envs, capsys):
    server = Server(envs.root)
    try:
        env = {"DBT_DEFER_STAGING_STATE": "staging-artifacts", "DBT_DEFER_PROD_STATE": f"{server.url}/prod-artifacts"}

        code, out, err = run_cli(capsys, envs, "fetch", "--output", "json", env=env)
        assert code == 0, err
        rows = {r["name"]: r for r in json.loads(out)["environments"]}
        assert rows["prod"]["action"] == "downloaded" and rows["prod"]["ok"] and rows["prod"]["run_results"]
        assert rows["staging"]["action"].startswith("local") and rows["staging"]["ok"]
        cache = Path(rows["prod"]["local"])  # the version folder that the cache's fetch.json names
        assert cache.parent == envs.target / "dbt_defer_state" / "prod"
        assert (cache / "manifest.json").read_bytes() == (envs.root / "prod-artifacts" / "manifest.json").read_bytes()
        assert (cache / "run_results.json").exists()
        assert server.gets("manifest.json") == 1

        code, out, err = run_cli(capsys, envs, "fetch", env=env)
        assert code == 0, err
        assert "unchanged" in out and "prod-artifacts" in out
        assert server.gets("manifest.json") == 1  # the cache was reused: nothing downloaded

        # a deferred dbt run fetches on its own (reusing the cache) and reads prod from it
        envs.dbt("compile", "-s", "customer_report", env=dict(env, DBT_DEFER="1"))
        assert server.gets("manifest.json") == 1
        audit = envs.audit()
        prod = next(e for e in audit["environments"] if e["name"] == "prod")
        assert prod["state"] == f"{server.url}/prod-artifacts"
        assert envs.resolutions()[(envs.uid("customer_report"), envs.uid("dim_customers.v1"))]["env"] == "prod"

        code, _, err = run_cli(capsys, envs, "status", env=env)
        assert code == 0, err
    finally:
        server.stop()

    # unreachable: the cached copy is used, with one warning that states its age
    code, out, err = run_cli(capsys, envs, "fetch", env=env)
    assert code == 0
    assert "cached (unreachable)" in out
    assert_one_clear_line(err, "cannot fetch", "using the cached copy", "ago")
    result = envs.dbt("compile", "-s", "customer_report", env=dict(env, DBT_DEFER="1"))
    assert any("using the cached copy" in m["msg"] for m in result.messages if m["level"] == "warn")

    # unreachable and no cached copy: one clear line, exit 1
    code, _, err = run_cli(capsys, envs, "fetch", "--target-path", str(envs.root / "other-target"), env=env)
    assert code == 1
    assert_one_clear_line(err, "'prod'", "cannot fetch", "no cached copy")
    result = envs.dbt("compile", "-s", "customer_report", "--target-path", "other-target",
                      env=dict(env, DBT_DEFER="1"), expect=False)
    assert "no cached copy" in result.text()


def test_env_var_in_target_path_and_profile_target_is_rendered_as_dbt_does(envs, capsys):
    """dbt_project.yml target-path and the profile's target with env_var(): the CLI reads the
    same folder and target a dbt run of the same shell would."""
    project_yml, profiles = envs.root / "dbt_project.yml", envs.root / "profiles.yml"
    originals = project_yml.read_text(), profiles.read_text()
    project_yml.write_text(originals[0] + "\ntarget-path: \"{{ env_var('MY_TARGET_DIR', 'target') }}\"\n")
    profiles.write_text(originals[1].replace("  target: dev", "  target: \"{{ env_var('MY_TARGET', 'dev') }}\"", 1))
    try:
        env = dict(CHAIN, MY_TARGET_DIR="elsewhere", MY_TARGET="ci")
        code, out, err = run_cli(capsys, envs, "status", "--output", "json", "--profiles-dir", str(envs.root), env=env)
        assert code == 0, err
        assert (json.loads(out)["target_path"], json.loads(out)["target"]) == (str(envs.root / "elsewhere"), "ci")
        code, out, err = run_cli(capsys, envs, "status", "--output", "json", "--profiles-dir", str(envs.root), env=dict(CHAIN))
        assert (json.loads(out)["target_path"], json.loads(out)["target"]) == (str(envs.root / "target"), "dev")
    finally:
        project_yml.write_text(originals[0])
        profiles.write_text(originals[1])


# --- control characters (issue 17) -------------------------------------------------------------


def test_no_control_character_from_a_manifest_or_path_reaches_the_terminal(envs, capsys, tmp_path):
    """Values the CLI shows in text (tables, warnings, errors) come from manifests, paths and
    remotes: their control characters are shown escaped (\\x1b), never emitted."""
    evil = "\x1b[31m\x1b]0;owned\x07\u202e"
    state = tmp_path / f"prod{evil}artifacts"
    state.mkdir()
    manifest = json.loads((envs.root / "prod-artifacts" / "manifest.json").read_text())
    manifest["metadata"]["dbt_version"] = f"1.99{evil}"
    manifest["metadata"]["generated_at"] = "2000-01-01T00:00:00.000000Z"  # stale: a warning with the path
    (state / "manifest.json").write_text(json.dumps(manifest))
    env = dict(CHAIN, DBT_DEFER_PROD_STATE=str(state))

    def clean(text: str) -> None:
        for char in ("\x1b", "\x07", "\u202e"):
            assert char not in text, repr(text)

    code, out, err = run_cli(capsys, envs, "status", env=env)
    assert code == 0, err
    clean(out + err)
    assert "\\x1b[31m" in out and "1.99" in out and "\\u202e" in out

    code, out, err = run_cli(capsys, envs, "fetch", env=env)
    assert code == 0, err
    clean(out + err)
    assert "\\x1b[31m" in out

    code, out, err = run_cli(capsys, envs, "explain", "-s", "model_b", "--target", "dev", env=env)
    assert code == 0, err
    clean(out + err)
    assert "model_b" in out and "\\x1b[31m" in err  # the stale warning names the path

    code, out, err = run_cli(capsys, envs, "status", env=dict(env, DBT_DEFER_PROD_STATE=str(state) + "-missing"))
    assert code == 1
    clean(out + err)
    assert_one_clear_line(err, "'prod'", "\\x1b[31m")

    code, out, _ = run_cli(capsys, envs, "status", "--output", "json", env=env)
    assert "\x1b" not in out and json.loads(out)["environments"][1]["dbt_version"] == f"1.99{evil}"
