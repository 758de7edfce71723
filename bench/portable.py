"""SPEC §10.7: `dbt-defer state` (portable mode) for 3 environments x N nodes vs dbt Core v2's
own `dbt parse` of the same project.

Generates the layered bench project (genproject.py) with N models, writes prod's and staging's
manifests with v2 itself (`parse --target prod|staging`; staging's holds the `in_staging` half),
creates every prod relation and staging's half as views with the Python duckdb (1.5.x, which v2's
libduckdb reads), then times, warm (v2's own caches filled by a first run):
  - v2 `parse` of the project (dev target),
  - `dbt-defer state -s <leaf>` (engine: v2): ls + the listing run-operation (in a one-macro
    project) + the chain + write,
  - `dbt-defer state --partial-parse -s <leaf>` (the engine's own partial parse), each round after
    an edit of one model file, as in a dev loop,
and prints the ratios and whether both states chose the same environment for every node.

usage: LD_LIBRARY_PATH=<dir of libduckdb.so> python bench/portable.py [--sizes 5000 20000]
       [--engine PATH] [--repeat 3]   (scripts/test-v2 installs the engine and the library)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from genproject import staging_members, write_project  # noqa: E402


def sh(cmd, cwd, env):
    t = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    took = time.perf_counter() - t
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(map(str, cmd))}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return took, done


def one_size(n: int, engine: str, repeat: int, work: Path) -> dict:
    import duckdb

    root = work / f"p{n}"
    db = work / f"wh{n}.duckdb"
    if db.exists():
        db.unlink()
    p = write_project(root, n, REPO, db, threads=4)
    env = {**os.environ, "DBT_PROFILES_DIR": str(root), "DBT_SEND_ANONYMOUS_USAGE_STATS": "false"}
    for k in list(env):
        if k.startswith("DBT_DEFER") or k in ("DBT_STATE", "DBT_FAVOR_STATE"):
            env.pop(k)
    sh([engine, "deps"], root, env)
    for target in ("prod", "staging"):
        sh([engine, "parse", "--target", target, "--target-path", f"{target}-artifacts"], root, env)
    members = staging_members(p.width)
    con = duckdb.connect(str(db))
    for schema in ("prod", "staging"):
        con.execute(f"create schema if not exists {schema}")
    for layer in range(10):
        for i in range(p.width):
            name = p.model(layer, i)
            con.execute(f'create view prod."{name}" as select 1 as id')
            if (layer, i) in members:
                con.execute(f'create view staging."{name}" as select 1 as id')
    con.close()
    chain = {"DBT_DEFER_PROD_STATE": str(root / "prod-artifacts"),
             "DBT_DEFER_STAGING_STATE": str(root / "staging-artifacts"), "DBT_DEFER_DBT": engine}
    sh([engine, "parse"], root, env)  # warm
    parse = [sh([engine, "parse"], root, env)[0] for _ in range(repeat)]
    state_cmd = [sys.executable, "-m", "dbt_defer.cli", "state", "-s", p.leaf()]
    denv = {**env, **chain, "PYTHONPATH": str(REPO / "plugin")}
    # as a user runs it: Python caches the compiled modules (this machine's shell turns that off)
    denv.pop("PYTHONDONTWRITEBYTECODE", None)
    sh(state_cmd, root, denv)  # warm
    states, engine_share = [], []
    for _ in range(repeat):
        took, done = sh(state_cmd + ["--out", str(work / f"state{n}")], root, denv)
        states.append(took)
        meta = json.loads((work / f"state{n}" / "dbt_defer_state.json").read_text())["metadata"]
        engine_share.append(meta["engine_seconds"])
    # --partial-parse (the engine's own partial parse, a cache per target): warm, each round after
    # an edit of one model file, as in a dev loop (edit, then run)
    edited = root / "models" / "layer9" / f"{p.leaf()}.sql"
    original = edited.read_text()
    partial_cmd = state_cmd + ["--partial-parse", "--out", str(work / f"state{n}p")]
    sh(partial_cmd, root, denv)  # the cache is made
    partial = []
    for i in range(repeat):
        edited.write_text(original + f"\n-- edit {i}\n")
        partial.append(sh(partial_cmd, root, denv)[0])
    edited.write_text(original)
    same = (json.loads((work / f"state{n}p" / "dbt_defer_state.json").read_text())["nodes"]
            == json.loads((work / f"state{n}" / "dbt_defer_state.json").read_text())["nodes"])
    ls = [sh([engine, "ls", "-s", p.leaf(), "--output", "json"], root, env)[0] for _ in range(repeat)]
    sidecar = json.loads((work / f"state{n}" / "dbt_defer_state.json").read_text())
    envs = {}
    for v in sidecar["nodes"].values():
        envs[v["env"]] = envs.get(v["env"], 0) + 1
    return {
        "nodes": p.n_models, "v2_parse_s": statistics.median(parse), "state_s": statistics.median(states),
        "v2_ls_s": statistics.median(ls), "ratio": statistics.median(states) / statistics.median(parse),
        "engine_s": statistics.median(engine_share),
        "partial_s": statistics.median(partial), "partial_ratio": statistics.median(partial) / statistics.median(parse),
        "partial_same_choices": same,
        "chosen": envs,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[5000])
    ap.add_argument("--engine", default=str(Path(sys.executable).parent / "dbt-core-experimental-parser"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--work", default=str(HERE / ".work" / "portable"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = [one_size(n, args.engine, args.repeat, work) for n in args.sizes]
    print("| nodes | v2 parse (s) | v2 ls -s leaf (s) | dbt-defer state (s) | engine calls inside, summed (s) "
          "| state / parse | state --partial-parse, after an edit (s) | partial / parse | same choices |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        print(f"| {r['nodes']} | {r['v2_parse_s']:.2f} | {r['v2_ls_s']:.2f} | {r['state_s']:.2f} | "
              f"{r['engine_s']:.2f} | {r['ratio']:.2f}x | {r['partial_s']:.2f} | {r['partial_ratio']:.2f}x | "
              f"{'yes' if r['partial_same_choices'] else 'NO'} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
