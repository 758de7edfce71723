"""Slim CI as the example workflow writes it (issue 24): its commands run as written against a
state published by ``dbt-defer publish`` to file:// folders, with real dbt on DuckDB; and a
published folder given as a plain path is read through its pointer, like its file:// form."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Dict, List

import pytest
import yaml

from dbt_harness import REPO, _environment, make_project

WORKFLOW = REPO / "examples" / "github-actions" / "dbt-pull-request.yml"


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """prod built in full, staging in part, each published with dbt-defer publish to file://."""
    from dbt_defer import cli

    tmp = tmp_path_factory.mktemp("slimci")
    p = make_project(tmp, "duckdb")
    p.dbt("deps")
    stores = {name: tmp / "artifacts" / name for name in ("staging", "prod")}
    p.dbt("build", "--target", "prod")
    with _environment({}):
        assert cli.main(["publish", f"file://{stores['prod']}", "--env", "prod", "--project-dir", str(p.root)]) == 0
    p.dbt("build", "--target", "staging", "-s", "raw_customers", "raw_orders", "stg_customers", "stg_orders")
    with _environment({}):
        assert cli.main(["publish", f"file://{stores['staging']}", "--env", "staging",
                         "--project-dir", str(p.root)]) == 0
    p.dbt("clean")  # a fresh checkout: no target/ (dbt clean: target and dbt_packages)
    yield p, stores
    p.drop_schemas()


def workflow_commands() -> List[str]:
    """Every dbt / dbt-defer command of the slim-CI job's steps, in order, as written."""
    doc = yaml.safe_load(WORKFLOW.read_text())
    commands = []
    for step in doc["jobs"]["slim-ci"]["steps"]:
        for line in str(step.get("run") or "").splitlines():
            line = line.strip()
            if line.startswith(("dbt ", "dbt-defer ")):
                commands.append(line.split(" | ")[0])  # | tee explain.txt: the output is ours to read
    return commands


def workflow_env(stores: Dict[str, Path]) -> Dict[str, str]:
    env = {k: str(v) for k, v in yaml.safe_load(WORKFLOW.read_text())["env"].items() if k.startswith("DBT_DEFER")}
    assert set(env) == {"DBT_DEFER", "DBT_DEFER_STAGING_STATE", "DBT_DEFER_PROD_STATE"}
    env["DBT_DEFER_STAGING_STATE"] = f"file://{stores['staging']}"  # s3://my-dbt-artifacts/...: ours here
    env["DBT_DEFER_PROD_STATE"] = f"file://{stores['prod']}"
    return env


def run(p, command: str, env: Dict[str, str], capsys):
    from dbt_defer import cli

    argv = shlex.split(command)
    if argv[0] == "dbt":
        return p.dbt(*argv[1:], env=env), ""
    capsys.readouterr()
    with _environment(env):
        code = cli.main([*argv[1:], "--project-dir", str(p.root)]
                        + (["--profiles-dir", str(p.root)] if argv[1] == "explain" else []))
    out, err = capsys.readouterr()
    assert code == 0, f"{command}: {err}"
    return None, out


def test_the_example_workflows_commands_run_as_written(published, capsys):
    p, stores = published
    commands = workflow_commands()
    assert commands[0] == "dbt deps" and commands[1] == "dbt-defer fetch"
    assert any("state:modified+ --state target/dbt_defer_state/prod" in c and c.startswith("dbt build")
               for c in commands)
    env = workflow_env(stores)
    # the pull request changes one model
    p.write("models/marts/customers.sql", p.read("models/marts/customers.sql") + "\n-- changed in the pull request\n")
    results = {}
    for command in commands:
        results[command] = run(p, command, env, capsys)
    assert (p.target / "dbt_defer_state" / "prod" / "manifest.json").is_file()
    fetched = next(out for c, (_, out) in results.items() if c == "dbt-defer fetch")
    assert "target/dbt_defer_state/prod" in fetched
    explained = next(out for c, (_, out) in results.items() if c.startswith("dbt-defer explain"))
    assert "customers" in explained
    build = next(res for c, (res, _) in results.items() if c.startswith("dbt build"))
    built = {uid.split(".")[-1] for uid in build.node_results()}
    assert "customers" in built and "customer_report" in built  # state:modified+
    assert "stg_customers" not in built and "orders" not in built
    record = p.resolutions()[(p.uid("customers"), p.uid("stg_customers"))]
    assert record["env"] == "staging", record
    assert p.audit()["summary"]["prod"] > 0


def test_the_stable_folder_follows_a_new_publish(published, capsys, tmp_path):
    from dbt_defer import cli

    p, stores = published
    env = workflow_env(stores)
    run(p, "dbt-defer fetch", env, capsys)
    stable = p.target / "dbt_defer_state" / "prod"
    first = json.loads((stable / "manifest.json").read_text())["metadata"]["invocation_id"]
    p.dbt("build", "--target", "prod", "-s", "raw_customers", "--target-path", str(tmp_path / "prod-target"))
    with _environment({}):
        assert cli.main(["publish", f"file://{stores['prod']}", "--target-path", str(tmp_path / "prod-target"),
                         "--project-dir", str(p.root)]) == 0
    run(p, "dbt-defer fetch", env, capsys)
    second = json.loads((stable / "manifest.json").read_text())["metadata"]["invocation_id"]
    meta = json.loads((stable / "fetch.json").read_text())
    in_use = json.loads((stable / meta["version"] / "manifest.json").read_text())["metadata"]["invocation_id"]
    assert second != first and second == in_use
    assert (stable / "run_results.json").samefile(stable / meta["version"] / "run_results.json")


def test_a_published_folder_given_as_a_plain_path_is_read_through_its_pointer(published, capsys):
    p, stores = published
    env = {"DBT_DEFER": "1", "DBT_DEFER_STAGING_STATE": "", "DBT_DEFER_PROD_STATE": str(stores["prod"]),
           "DBT_DEFER_DEV_RELATIONS": "never"}  # the other tests built customers in dev
    assert (stores["prod"] / "latest.json").is_file() and not (stores["prod"] / "manifest.json").exists()
    p.dbt("compile", "-s", "customer_report", env=env)
    record = p.resolutions()[(p.uid("customer_report"), p.uid("customers"))]
    assert (record["env"], record["reason"]) == ("prod", "deferred")
    # the pointer file itself names the folder too; and fetch and status read it the same way
    env["DBT_DEFER_PROD_STATE"] = str(stores["prod"] / "latest.json")
    _, out = run(p, "dbt-defer fetch --output json", env, capsys)
    [row] = json.loads(out)["environments"]
    assert row["ok"] and row["published"] is not None
    assert row["state_folder"] == str(p.target / "dbt_defer_state" / "prod")
    _, out = run(p, "dbt-defer status --output json", env, capsys)
    [row] = json.loads(out)["environments"]
    assert row["usable"] and row["run_results"] is True and row["published"] is not None
