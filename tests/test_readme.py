"""The README's quickstart runs as written in a project of the user's own (real dbt on DuckDB, the
commands in a shell): only the user's own names are filled in — where production ran and which
model to build. The slim-CI recipe is run by tests/test_slim_ci.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from dbt_harness import REPO, make_project
from test_audit import release_duckdb


def quickstart_block() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Quickstart, in your own project"):]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def test_the_quickstart_runs_as_written(tmp_path):
    p = make_project(tmp_path, "duckdb")
    p.dbt("deps")
    p.dbt("build", "--target", "prod", "--target-path", "prod-run")  # production's last run, elsewhere
    release_duckdb()  # the shell's dbt needs the file's lock
    script = quickstart_block()
    assert "/where/prod/ran/target" in script and "my_model" in script
    script = script.replace("/where/prod/ran/target", str(p.root / "prod-run")).replace("my_model", "customers")
    if shutil.which("jq") is None:  # the last line reads the audit; without jq, the same with Python
        script = re.sub(r"^jq .*$", f"{sys.executable} -c 'import json; print(json.load(open(\"target/dbt_defer_audit.json\"))[\"resolutions\"])'",
                        script, flags=re.M)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DBT_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # dbt, dbt-defer
    env["DBT_SEND_ANONYMOUS_USAGE_STATS"] = "false"
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=p.root, env=env,
                          capture_output=True, text=True, timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "prod-artifacts/" in (p.root / ".gitignore").read_text()
    assert re.search(r"dbt-defer: \d+ refs? resolved: .*prod \d+", out), out[-4000:]
    audit = json.loads((p.target / "dbt_defer_audit.json").read_text())
    read = {(r["node"], r["ref"]): r["env"] for r in audit["resolutions"]}
    assert read[(p.uid("customers"), p.uid("stg_customers"))] == "prod"
    assert p.relation_exists("dev", "customers") and not p.relation_exists("dev", "stg_customers")
