"""Local state is untrusted input (SPEC §7, issue 11): names from a foreign manifest never reach
SQL, special files and oversized files are refused with one line, a manifest that says nothing
of its project is not taken for this project's, killed audit writes are swept.

Real dbt runs: the SQL-injection case on Postgres (a victim table checked byte for byte before
and after ``dbt-defer explain`` and ``DBT_DEFER=1 dbt build``); the FIFO / device cases as
subprocesses with a timeout (the old code hung on them forever).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Optional

import pytest

import dbt_defer
from conftest import require_adapter
from dbt_harness import _environment, make_project, pg_connect
from dbt_defer.testing.runner import clean_environment

PLUGIN = str(Path(dbt_defer.__file__).resolve().parents[1])
BIN = Path(sys.executable).parent
TIMEOUT = 120  # seconds; the old code never returned


def _subprocess_env(extra: Dict[str, str]) -> Dict[str, str]:
    return clean_environment(dict(os.environ), {"PYTHONPATH": PLUGIN, **extra})


def run(argv, extra: Dict[str, str], cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, env=_subprocess_env(extra), cwd=cwd)


def defer_lines(text: str) -> list:
    return [line[line.find("dbt-defer:"):] for line in text.splitlines() if "dbt-defer:" in line]


# --- a DuckDB project with a parsed prod manifest (no warehouse work needed) -------------------


@pytest.fixture(scope="module")
def parsed(tmp_path_factory):
    p = make_project(tmp_path_factory.mktemp("untrusted"), "duckdb")
    p.dbt("deps")
    p.dbt("parse", "--target", "prod")
    p.save_artifacts("prod-artifacts")
    return p


def _state(p, tmp_path, name: str) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    return folder


def status(p, state: Path, **extra: str) -> subprocess.CompletedProcess:
    return run([str(BIN / "dbt-defer"), "status", "--project-dir", str(p.root)],
               {"DBT_DEFER_PROD_STATE": str(state), **extra})


def assert_one_line(res: subprocess.CompletedProcess, *needles: str) -> str:
    assert "Traceback" not in res.stderr + res.stdout, res.stderr
    lines = [line for line in defer_lines(res.stderr) if all(n in line for n in needles)]
    assert len(lines) == 1, (needles, res.stdout, res.stderr)
    return lines[0]


# --- 2. special files and the size cap ---------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
@pytest.mark.parametrize("which", ["manifest.json", "run_results.json"])
def test_a_fifo_as_the_state_is_one_line_not_a_hang(parsed, tmp_path, which):
    state = _state(parsed, tmp_path, "fifo-state")
    if which == "run_results.json":
        shutil.copy(parsed.root / "prod-artifacts" / "manifest.json", state / "manifest.json")
    os.mkfifo(state / which)
    started = time.monotonic()
    res = status(parsed, state)
    assert res.returncode == 1
    assert_one_line(res, "environment 'prod'", which, "is a FIFO (named pipe), not a regular file")
    # the deferred run too: dbt build ends with the same line instead of waiting forever
    res = run([str(BIN / "dbt"), "build", "-s", "stg_customers", "--project-dir", str(parsed.root),
               "--profiles-dir", str(parsed.root)], {"DBT_DEFER": "1", "DBT_DEFER_PROD_STATE": str(state)})
    assert res.returncode != 0
    assert "is a FIFO (named pipe), not a regular file" in res.stdout + res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    assert time.monotonic() - started < TIMEOUT


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_a_device_as_the_manifest_is_one_line_and_reads_nothing(parsed, tmp_path):
    res = status(parsed, Path("/dev/zero"))
    assert res.returncode == 1
    assert_one_line(res, "environment 'prod'", "/dev/zero is a character device, not a regular file")
    state = _state(parsed, tmp_path, "device-results")
    shutil.copy(parsed.root / "prod-artifacts" / "manifest.json", state / "manifest.json")
    os.symlink("/dev/zero", state / "run_results.json")
    assert_one_line(status(parsed, state), "run_results.json is a character device")


def _padded(source: Path, dest: Path, megabytes: float) -> None:
    """A valid JSON file above ``megabytes`` (trailing whitespace)."""
    data = source.read_bytes()
    dest.write_bytes(data + b" " * int(megabytes * 1024 * 1024))


def test_max_state_mb_caps_manifest_and_run_results(parsed, tmp_path):
    artifacts = parsed.root / "prod-artifacts"
    big_manifest = _state(parsed, tmp_path, "big-manifest")
    _padded(artifacts / "manifest.json", big_manifest / "manifest.json", 1.5)
    res = status(parsed, big_manifest, DBT_DEFER_MAX_STATE_MB="1")
    assert res.returncode == 1
    assert_one_line(res, "environment 'prod'", "manifest.json is larger than 1 MB (DBT_DEFER_MAX_STATE_MB)")
    assert status(parsed, big_manifest, DBT_DEFER_MAX_STATE_MB="3").returncode == 0  # raised: read

    big_results = _state(parsed, tmp_path, "big-results")
    shutil.copy(artifacts / "manifest.json", big_results / "manifest.json")
    (big_results / "run_results.json").write_bytes(b'{"results": []}' + b" " * (1536 * 1024))
    res = status(parsed, big_results, DBT_DEFER_MAX_STATE_MB="1")
    assert_one_line(res, "run_results.json is larger than 1 MB")


@pytest.mark.parametrize("value", ["abc", "0", "-5", "nan"])
def test_a_bad_max_state_mb_is_one_line_naming_the_variable(parsed, value):
    res = status(parsed, parsed.root / "prod-artifacts", DBT_DEFER_MAX_STATE_MB=value)
    assert res.returncode != 0
    assert_one_line(res, "DBT_DEFER_MAX_STATE_MB is", repr(value), "megabytes")


def test_read_bounded_unit(tmp_path):
    from dbt_defer.untrusted import ManifestError, read_bounded

    path = tmp_path / "m.json"
    path.write_bytes(b"x" * 100)
    assert read_bounded("prod", str(path), 100, "fix") == b"x" * 100
    with pytest.raises(ManifestError, match="larger than"):
        read_bounded("prod", str(path), 99, "fix")
    with pytest.raises(ManifestError, match="Is a directory"):
        read_bounded("prod", str(tmp_path), 100, "fix")


# --- 3. a manifest that says nothing of its project -------------------------------------------


def test_an_empty_manifest_without_project_name_is_not_this_projects(parsed, tmp_path):
    state = _state(parsed, tmp_path, "empty")
    (state / "manifest.json").write_text(json.dumps({
        "metadata": {"dbt_schema_version": "https://schemas.getdbt.com/dbt/manifest/v12.json"},
        "nodes": {}, "sources": {},
    }))
    res = status(parsed, state)
    assert res.returncode == 1
    assert_one_line(res, "environment 'prod'", "records no project name or project_id and no node of project "
                    "'dbt_defer_integration_tests'")
    # nodes of this project but no name recorded (hand-made, old dbt): still accepted
    manifest = json.loads((parsed.root / "prod-artifacts" / "manifest.json").read_text())
    manifest["metadata"].pop("project_name", None)
    manifest["metadata"].pop("project_id", None)
    (state / "manifest.json").write_text(json.dumps(manifest))
    assert status(parsed, state).returncode == 0
    # ... and only other projects' nodes: refused
    manifest["nodes"] = {k: v for k, v in manifest["nodes"].items() if ".dbt_defer_integration_tests." not in k}
    (state / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line(status(parsed, state), "records no project name or project_id and only nodes of")


# --- 1. names from a foreign manifest ------------------------------------------------------------


@pytest.mark.parametrize("name", [
    "analytics", "Analytics_Prod", "my-project-123", "prod eu", "Ümsätze", "売上", "dbt$x", "a.b", "x" * 1024,
    "sales_-_2024", "100%", "a/b", "café (old)",
])
def test_every_legitimate_name_is_accepted(name):
    from dbt_defer.untrusted import unsafe_name

    assert unsafe_name(name) is None


@pytest.mark.parametrize("name, why", [
    ("x'; DROP TABLE IF EXISTS public.victim; COMMIT; select '", "single quote"),
    ('prod"; drop table x; --', "double quote"),
    ("prod`x", "backtick"),
    ("prod; drop", "semicolon"),
    ("prod\\x", "backslash"),
    ("prod\nx", "U+000A"),
    ("prod\x00", "U+0000"),
    ("prod\u2028x", "U+2028"),
    ("prod -- x", "comment marker --"),
    ("prod--x", "comment marker --"),
    ("prod\x85x", "U+0085"),
    ("prod/*x", "comment marker /*"),
    ("x" * 1025, "1025 characters"),
])
def test_names_that_could_leave_a_quoted_name_are_refused(name, why):
    from dbt_defer.untrusted import unsafe_name

    assert why in unsafe_name(name)


def test_existence_checker_never_lists_an_unsafe_or_unquotable_name():
    from dbt_defer.warehouse import ExistenceChecker

    class Policy:
        def __init__(self, **parts):
            self.parts = parts

        def to_dict(self, omit_none=True):
            return dict(self.parts)

    class QuotedRelation:
        @staticmethod
        def get_default_quote_policy():
            return Policy(database=True, schema=False, identifier=True)

    class Adapter:
        Relation = QuotedRelation

        class config:
            quoting = {}

            class credentials:
                database = "db"

        def __getattr__(self, name):  # any warehouse call fails the test
            raise AssertionError(f"the checker touched the warehouse: {name}")

    checker = ExistenceChecker(Adapter())
    assert not checker.exists(("db", "x'; drop table v; commit; select '", "t"))
    assert not checker.exists(("db", "prod", 'x"; drop'))
    assert not checker.exists(("db", "prod eu", "t"))  # schema unquoted here: one word only
    assert checker.queries == {}


def _poisoned(project, payload: str, name: str = "stg_customers", field: str = "schema") -> Path:
    state = project.root / "poisoned-artifacts"
    if state.exists():
        shutil.rmtree(state)
    shutil.copytree(project.root / "prod-artifacts", state)
    manifest = json.loads((state / "manifest.json").read_text())
    manifest["nodes"][project.uid(name)][field] = payload
    (state / "manifest.json").write_text(json.dumps(manifest))
    return state


VICTIM_ROWS = "select md5(string_agg(v::text, '|' order by v::text)), count(*) from {table} v"


@pytest.fixture(scope="module")
def pg_prod(tmp_path_factory):
    require_adapter("postgres")
    p = make_project(tmp_path_factory.mktemp("injection"), "postgres")
    p.dbt("deps")
    p.dbt("build", "--target", "prod", "-s", "raw_customers", "stg_customers")
    p.save_artifacts("prod-artifacts")
    yield p, f'"{p.schema_prefix}_victim".victim'
    p.drop_schemas()


def _make_victim(table: str) -> None:
    schema = table.split(".")[0]
    with pg_connect() as conn, conn.cursor() as cur:
        cur.execute(f"create schema if not exists {schema}")
        cur.execute(f"drop table if exists {table}")
        cur.execute(f"create table {table} (id int, note text)")
        cur.execute(f"insert into {table} values (1, 'keep me'), (2, 'ünïcode ✓'), (3, NULL)")


def _victim(table: str):
    with pg_connect() as conn, conn.cursor() as cur:
        cur.execute("select to_regclass(%s)", (table,))
        if cur.fetchone()[0] is None:
            return None
        cur.execute(VICTIM_ROWS.format(table=table))
        return cur.fetchone()


@pytest.mark.parametrize("field", ["schema", "database", "alias"])
def test_sql_in_a_manifest_name_never_runs_explain_and_build(pg_prod, capsys, field):
    """The payload of issue 11: prod's stg_customers with a schema (database, alias) that closes
    dbt-postgres's quoted listing query and drops a table. Neither explain nor a deferred build
    sends it to the warehouse; the victim is unchanged byte for byte; one line names the
    environment, the node and the field."""
    from dbt_defer import cli

    p, table = pg_prod
    payload = f"x'; DROP TABLE IF EXISTS {table}; COMMIT; select '"
    state = _poisoned(p, payload, field=field)
    _make_victim(table)
    before = _victim(table)
    assert before is not None and before[1] == 3
    node = p.uid("stg_customers")

    capsys.readouterr()
    with _environment({"DBT_DEFER_PROD_STATE": str(state)}):
        code = cli.main(["explain", "-s", "dim_customers_v1", "--project-dir", str(p.root),
                         "--profiles-dir", str(p.root), "--output", "json"])
    out, err = capsys.readouterr()
    assert _victim(table) == before, "explain ran SQL from the manifest"
    assert "Traceback" not in err
    named = "identifier" if field == "alias" else field
    warned = [line for line in defer_lines(err) if line.startswith(f"dbt-defer: environment 'prod': {node} has {named} ")]
    assert len(warned) == 1, err
    assert "cannot be a SQL name" in warned[0]
    assert code == 0, err
    record = next(r for r in json.loads(out)["resolutions"] if r["ref"] == node)
    assert record["env"] != "prod"

    res = p.dbt("build", "-s", "dim_customers_v1", env={"DBT_DEFER": "1", "DBT_DEFER_PROD_STATE": str(state)},
                expect=None)
    assert _victim(table) == before, "a deferred build ran SQL from the manifest"
    messages = [m["msg"] for m in res.messages if m["msg"].startswith(f"dbt-defer: environment 'prod': {node} has {named} ")]
    assert len(messages) == 1, [m["msg"] for m in res.messages if "dbt-defer" in m["msg"]]
    assert p.resolutions()[(p.uid("dim_customers.v1"), node)]["env"] != "prod"


def test_sql_in_a_function_name_is_never_deferred_to(tmp_path):
    from dbt_defer.manifests import load_manifest

    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({
        "metadata": {"dbt_schema_version": "https://schemas.getdbt.com/dbt/manifest/v12.json",
                     "project_name": "p"},
        "nodes": {},
        "functions": {
            "function.p.good": {"database": "db", "schema": "prod", "alias": "good"},
            "function.p.bad": {"database": "db", "schema": "prod'; drop table x; --", "alias": "bad"},
        },
    }))
    loaded = load_manifest("prod", str(path))
    assert set(loaded.functions) == {"function.p.good"}
    assert "function.p.bad has schema" in loaded.unusable_line("prod", "function.p.bad")


# --- 6. killed audit writes leave nothing behind -------------------------------------------------


def test_the_next_audit_write_sweeps_stale_temp_files(tmp_path):
    from dbt_defer import audit

    target = tmp_path / "target"
    target.mkdir()
    old = time.time() - 3600
    dead_pid = 2**22 + 12345  # above the default pid_max: no such process
    stale_old = target / f".dbt_defer_audit.{os.getppid()}.aaaaaaaaaaaa.json"  # a live pid, but an hour old
    stale_dead = target / f".dbt_defer_audit.{dead_pid}.bbbbbbbbbbbb.json"  # a killed run's, a minute old
    live = target / f".dbt_defer_audit.{os.getppid()}.cccccccccccc.json"  # a concurrent run writing now
    other = target / ".dbt_defer_audit.notes.json"  # not ours: left alone
    for f in (stale_old, stale_dead, live, other):
        f.write_text("{}")
    os.utime(stale_old, (old, old))
    os.utime(stale_dead, (time.time() - 60, time.time() - 60))
    os.utime(other, (old, old))
    audit.write_document({"a": 1}, str(target))
    left = sorted(f.name for f in target.iterdir())
    assert left == sorted([live.name, other.name, audit.AUDIT_FILE]), left
    assert json.loads((target / audit.AUDIT_FILE).read_text()) == {"a": 1}


def test_a_killed_run_leaves_no_temp_file_after_the_next_run(parsed):
    """A temp file a killed dbt run left in target/ is gone after the next deferred run."""
    parsed.target.mkdir(exist_ok=True)
    leftover = parsed.target / ".dbt_defer_audit.4194999.0123456789ab.json"
    leftover.write_text('{"half": ')
    old = time.time() - 600
    os.utime(leftover, (old, old))
    parsed.dbt("compile", "-s", "stg_customers",
               env={"DBT_DEFER": "1", "DBT_DEFER_PROD_STATE": str(parsed.root / "prod-artifacts")})
    assert not leftover.exists()
    assert not list(parsed.target.glob(".dbt_defer_audit.*.json"))
