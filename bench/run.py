"""dbt-defer benchmark (SPEC §10). Run with the venv that has dbt and dbt-defer:

    /work/.venv/bin/python bench/run.py            # full: 2,000 models, 5 repeats
    /work/.venv/bin/python bench/run.py --quick    # 200 models, 3 repeats
    ... --reuse                                    # keep the built warehouse of the last run
    ... --only chain,metadata --threads 1          # a subset, other settings

Measures (SPEC §10): 1 inert overhead, 2 chain overhead, 3 deferral set-up (isolated
loaders, and 3b in situ inside dbt), 4 metadata queries, 5 dev-loop speed-up.
Writes bench/results.md and bench/results.json. Exits 0 even when a budget fails.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).parent))
from dbtcall import Call, DbtFailed, Outcome, run  # noqa: E402
from genproject import GENERATOR_VERSION, Project, profiles_yml, project_for, write_project  # noqa: E402
import gendata  # noqa: E402

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
LOADER = BENCH / "_load_manifests.py"


@dataclass
class Row:
    key: str
    measure: str
    budget: str
    measured: str
    ratio: float | None
    passed: bool | None  # None: informational or not measurable
    detail: dict = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return {True: "pass", False: "**FAIL**", None: "info"}[self.passed]


@dataclass
class Ctx:
    args: argparse.Namespace
    work: Path
    project: Project
    vanilla: Path
    prod_state: Path
    staging_state: Path
    plugin: dict
    rows: list[Row] = field(default_factory=list)
    big_states: list[Path] | None = None  # the n-node manifests of measure 3, once made
    scaling: list[dict] = field(default_factory=list)  # one point per project size (measure 6)
    notes: list[str] = field(default_factory=list)
    plot: str | None = None

    @property
    def root(self) -> Path:
        return self.project.root

    def selection(self) -> list[str]:
        return self.project.selection(self.args.select)

    def chain_env(self) -> dict[str, str]:
        return {"DBT_DEFER": "1", "DBT_DEFER_STAGING_STATE": str(self.staging_state),
                "DBT_DEFER_PROD_STATE": str(self.prod_state)}


# ---------------------------------------------------------------- helpers

def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


@dataclass
class Timings:
    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]
    warmup: dict[str, Outcome] = field(default_factory=dict, repr=False)
    peak_mb: dict[str, list[float]] = field(default_factory=dict)

    def asdict(self) -> dict:
        return {"wall": self.wall, "cpu": self.cpu, "peak_mb": self.peak_mb}

    def ratio(self, a: str, b: str) -> tuple[float, float]:
        """(wall, cpu) ratio of the medians of variant a over variant b."""
        return (median(self.wall[a]) / median(self.wall[b]),
                median(self.cpu[a]) / median(self.cpu[b]))

    def text(self, a: str, b: str) -> str:
        cpu = self.ratio(a, b)[1]
        return (f"{median(self.wall[a]):.2f}s vs {median(self.wall[b]):.2f}s "
                f"(CPU {cpu:.3f}×)")


def compare(label: str, calls: dict[str, Callable[[], Outcome]], repeat: int,
            before_each: Callable[[], None] | None = None) -> Timings:
    """One untimed warm-up per variant, then `repeat` interleaved timed rounds."""
    t = Timings({name: [] for name in calls}, {name: [] for name in calls})
    for rnd in range(repeat + 1):
        for name, fn in calls.items():
            if before_each:
                before_each()
            out = fn()
            if rnd == 0:
                t.warmup[name] = out
            else:
                t.wall[name].append(out.seconds)
                t.cpu[name].append(out.cpu_seconds)
                t.peak_mb.setdefault(name, []).append(out.peak_mb)
        if rnd > 0:
            log(f"  {label} round {rnd}/{repeat}: "
                + ", ".join(f"{n} {w[-1]:.2f}s" for n, w in t.wall.items()))
    return t


def plugin_status() -> dict:
    code = ("import importlib.util, pkgutil, json\n"
            "spec = importlib.util.find_spec('dbt_defer')\n"
            "listed = any(m.name == 'dbt_defer' for m in pkgutil.iter_modules())\n"
            "print(json.dumps({'importable': spec is not None, 'discoverable': listed,"
            " 'origin': spec and spec.origin}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    status = json.loads(out.stdout)
    pip = subprocess.run([sys.executable, "-m", "pip", "show", "dbt-defer"],
                         capture_output=True, text=True)
    status["pip_installed"] = pip.returncode == 0
    return status


def drop_schema(db: Path, schema: str) -> None:
    import duckdb

    con = duckdb.connect(str(db))
    try:
        con.execute(f"drop schema if exists {schema} cascade")
    finally:
        con.close()


def save_state(root: Path, target_path: str, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("manifest.json", "run_results.json"):
        shutil.copy2(root / target_path / name, dest / name)


# ---------------------------------------------------------------- set-up

def setup_stamp(args: argparse.Namespace, from_compiled: bool = False) -> dict:
    stamp = {"models": args.models, "generator": GENERATOR_VERSION,
             "package": str(macro_package(args.work_dir.resolve()))}
    if from_compiled:
        stamp["environments"] = "created from dbt compile's SQL"
    return stamp


def setup(args: argparse.Namespace, prod_only: bool = False, from_compiled: bool = False) -> Ctx:
    """The layered project, its DuckDB warehouse and the prod + staging states (``prod_only``:
    prod alone, for the scaling sizes measured for set-up and memory only; ``from_compiled``:
    each environment's relations created from ``dbt compile``'s SQL instead of ``dbt build``,
    see create_from_compiled)."""
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    db = work / "bench.duckdb"
    stamp_file, stamp = work / "stamp.json", setup_stamp(args, from_compiled)
    prod_stamp = work / "stamp-prod.json"  # written once prod is built: a prod-only run reuses it
    reusable = [stamp_file, prod_stamp] if prod_only else [stamp_file]
    if args.reuse and any(f.exists() and json.loads(f.read_text()) == stamp for f in reusable):
        log(f"--reuse: keeping the projects, warehouse and states in {work}")
        project = project_for(work / "project", args.models)
        for root in (project.root, work / "vanilla"):
            (root / "profiles.yml").write_text(profiles_yml(db, args.threads))
        return Ctx(args, work, project, work / "vanilla", work / "prod-artifacts",
                   work / "staging-artifacts", plugin_status())
    stamp_file.unlink(missing_ok=True)
    prod_stamp.unlink(missing_ok=True)
    for f in (db, work / "bench.duckdb.wal"):
        f.unlink(missing_ok=True)

    package = macro_package(work)
    log(f"generating {args.models}-model project in {work / 'project'}")
    project = write_project(work / "project", args.models, package, db, args.threads)
    vanilla = write_project(work / "vanilla", args.models, package, db, args.threads,
                            with_defer=False).root
    run(Call(project.root, ["deps"], hide_plugin=True))

    ctx = Ctx(args, work, project, vanilla, work / "prod-artifacts",
              work / "staging-artifacts", plugin_status())

    timings = {}
    log("building prod (full)" + (" from dbt compile's SQL" if from_compiled else ""))
    if from_compiled:
        timings["prod"] = t = create_from_compiled(project.root, "prod", None, db)
    else:
        t = run(Call(project.root, ["build", "--target", "prod", "--target-path", "target/prod"],
                     hide_plugin=True)).seconds
    save_state(project.root, "target/prod", ctx.prod_state)
    log(f"  prod built in {t if isinstance(t, float) else t['compile'] + t['create']:.1f}s")
    prod_stamp.write_text(json.dumps(stamp))
    if not prod_only:
        log("building staging (tag:in_staging, about half the project)"
            + (" from dbt compile's SQL" if from_compiled else ""))
        if from_compiled:
            timings["staging"] = t = create_from_compiled(project.root, "staging", "tag:in_staging", db)
        else:
            t = run(Call(project.root, ["build", "--target", "staging", "-s", "tag:in_staging",
                                        "--target-path", "target/staging"], hide_plugin=True)).seconds
        save_state(project.root, "target/staging", ctx.staging_state)
        log(f"  staging built in {t if isinstance(t, float) else t['compile'] + t['create']:.1f}s")
        stamp_file.write_text(json.dumps(stamp))
    if timings:
        (work / "setup-timings.json").write_text(json.dumps(timings))
    return ctx


def create_from_compiled(root: Path, target: str, select: str | None, db: Path) -> dict:
    """An environment's relations without ``dbt build`` (which takes dbt over an hour at 20,000
    models here): ``dbt compile`` the environment once (its manifest.json and run_results.json
    become the environment's state, as a build's would), then create every compiled model in
    one DuckDB connection and one transaction, in dependency order, as ``create view|table
    <relation_name> as <compiled SQL>``: the relations dbt would have built, with their columns
    and (here one-row) data. Returns the seconds of each step."""
    import duckdb
    from graphlib import TopologicalSorter

    target_path = root / "target" / target  # a full parse each: dbt re-parses when the target changes
    args = ["compile", "--target", target, "--target-path", f"target/{target}"]
    compile_s = run(Call(root, args + (["-s", select] if select else []), hide_plugin=True)).seconds
    log(f"  dbt compile --target {target}: {compile_s:.1f}s")
    start = time.perf_counter()
    nodes = json.loads((target_path / "manifest.json").read_text())["nodes"]
    results = json.loads((target_path / "run_results.json").read_text())["results"]
    compiled = {r["unique_id"] for r in results if r["status"] == "success"
                and nodes[r["unique_id"]]["resource_type"] == "model"}
    order = TopologicalSorter({u: [d for d in nodes[u]["depends_on"]["nodes"] if d in compiled]
                               for u in compiled}).static_order()
    con = duckdb.connect(str(db))
    try:
        con.execute("begin")
        for schema in sorted({nodes[u]["schema"] for u in compiled}):
            con.execute(f'create schema if not exists "{schema}"')
        for u in order:
            node = nodes[u]
            kind = "table" if node["config"]["materialized"] == "table" else "view"
            con.execute(f"create or replace {kind} {node['relation_name']} as (\n{node['compiled_code']}\n)")
        con.execute("commit")
    finally:
        con.close()
    create_s = time.perf_counter() - start
    log(f"  {len(compiled)} relations created in {target} in {create_s:.1f}s")
    return {"compile": compile_s, "create": create_s, "relations": len(compiled)}


def macro_package(work: Path) -> Path:
    """The repo root (the dbt_defer macro package), or a pass-through stub while the
    repo has no dbt_project.yml yet (lets the plain-dbt parts run)."""
    if (REPO / "dbt_project.yml").exists():
        return REPO
    stub = work / "stub_dbt_defer"
    (stub / "macros").mkdir(parents=True, exist_ok=True)
    (stub / "dbt_project.yml").write_text("name: dbt_defer\nversion: '0.0'\nconfig-version: 2\n")
    (stub / "macros" / "ref.sql").write_text(
        "{% macro ref() %}{{ return(builtins.ref(*varargs, **kwargs)) }}{% endmacro %}\n")
    log(f"WARNING: {REPO} has no dbt_project.yml yet; using a pass-through stub package")
    return stub


def expect_hidden(out: Outcome, what: str) -> None:
    if out.plugin_loaded:
        raise RuntimeError(f"{what}: dbt_defer was imported although it should be hidden")


def need_plugin(ctx: Ctx, key: str, measure: str, budget: str) -> bool:
    if ctx.plugin["importable"]:
        return True
    ctx.rows.append(Row(key, measure, budget, "not measured: dbt_defer not installed",
                        None, None))
    return False


# ---------------------------------------------------------------- measurements

def measure_inert(ctx: Ctx) -> None:
    """(a) plugin installed + deferral off vs plugin hidden; same project and command."""
    measure, budget = "1. inert overhead (deferral off vs plugin not installed)", "≤ 1.02×"
    if not need_plugin(ctx, "inert", measure, budget):
        return
    args = ["run", "--target", "prod", "-s", *ctx.selection()]
    variants = {
        "plugin": lambda: run(Call(ctx.root, args + ["--target-path", "target/inert_plugin"])),
        "hidden": lambda: run(Call(ctx.root, args + ["--target-path", "target/inert_hidden"],
                                   hide_plugin=True)),
        "vanilla": lambda: run(Call(ctx.vanilla, args + ["--target-path", "target/inert"],
                                    hide_plugin=True)),
    }
    t = compare("inert", variants, ctx.args.repeat)
    loaded = t.warmup["plugin"].plugin_loaded
    expect_hidden(t.warmup["hidden"], "inert baseline")
    ratio = t.ratio("plugin", "hidden")[0]
    cmd = f"dbt run --target prod -s <{len(ctx.selection())} layer-{ctx.project.top} models>"
    ctx.rows.append(Row("inert", measure, budget, t.text("plugin", "hidden"), ratio,
                        ratio <= 1.02, {"command": cmd, "timings": t.asdict(),
                                        "plugin_loaded": loaded}))
    ctx.rows.append(Row("inert_vanilla", "1b. same, vs a project without the package and "
                        "ref shim", "info",
                        t.text("plugin", "vanilla"), t.ratio("plugin", "vanilla")[0], None,
                        {"command": cmd}))
    if not loaded:
        log("WARNING: with the plugin visible, dbt did not import dbt_defer "
            "(not discovered by dbt's plugin manager?)")


def measure_chain(ctx: Ctx) -> None:
    """(b) DBT_DEFER=1 with staging + prod vs native --defer --state prod."""
    measure = f"2. chain overhead at {ctx.project.n_models} models (vs native --defer)"
    budget = "≤ 1.10×"
    if not need_plugin(ctx, "chain", measure, budget):
        return
    sel = ["build", "--target", "dev", "-s", *ctx.selection()]
    chain_call = Call(ctx.root, sel + ["--target-path", "target/chain"], env=ctx.chain_env())
    native_call = Call(ctx.root, sel + ["--defer", "--state", str(ctx.prod_state),
                                        "--target-path", "target/native"], hide_plugin=True)
    t = compare("chain", {"chain": lambda: run(chain_call),
                          "native": lambda: run(native_call)}, ctx.args.repeat)
    expect_hidden(t.warmup["native"], "native --defer baseline")
    ratio = t.ratio("chain", "native")[0]
    audit = read_audit_summary(ctx.root / "target/chain")
    ctx.rows.append(Row("chain", measure, budget, t.text("chain", "native"), ratio,
                        ratio <= 1.10, {"chain": chain_call.describe(),
                                        "native": native_call.describe(), "timings": t.asdict(),
                                        "audit_summary": audit}))
    if audit is None:
        log("WARNING: no target/chain/dbt_defer_audit.json after a deferred run")
    else:
        log(f"  audit summary of the chain run: {audit}")


def read_audit_summary(target: Path) -> dict | None:
    path = target / "dbt_defer_audit.json"
    if not path.exists():
        return None
    return json.loads(path.read_text()).get("summary")


def measure_metadata(ctx: Ctx) -> None:
    """(d) list_relations_without_caching calls per (database, schema), one deferred build."""
    measure, budget = "4. metadata queries per (database, schema), deferred build", "≤ 1"
    if not need_plugin(ctx, "metadata", measure, budget):
        return
    sel = ["build", "--target", "dev", "-s", *ctx.selection()]
    chain = run(Call(ctx.root, sel + ["--target-path", "target/count_chain"],
                     env=ctx.chain_env()), count=True).counts
    native = run(Call(ctx.root, sel + ["--defer", "--state", str(ctx.prod_state),
                                       "--target-path", "target/count_native"],
                      hide_plugin=True), count=True).counts
    by_schema = chain["list_relations_by_schema"]
    worst = max(by_schema.values(), default=0)
    shown = ", ".join(f"{k.split('.')[-1]} {v}" for k, v in sorted(by_schema.items()))
    ctx.rows.append(Row("metadata", measure, budget, f"max {worst} ({shown})", None,
                        worst <= 1, {"chain": chain, "native": native}))


def measure_devloop(ctx: Ctx) -> None:
    """(e) deferred `build -s leaf` vs plain `build -s +leaf`, fresh dev schema each time."""
    leaf = ctx.project.leaf()
    measure = f"5. dev-loop speed-up: plain build -s +{leaf} vs deferred -s {leaf}"
    if not need_plugin(ctx, "devloop", measure, "report"):
        return
    deferred = Call(ctx.root, ["build", "--target", "dev", "-s", leaf,
                               "--target-path", "target/loop_deferred"], env=ctx.chain_env())
    plain = Call(ctx.root, ["build", "--target", "dev", "-s", f"+{leaf}",
                            "--target-path", "target/loop_plain"], hide_plugin=True)
    db = ctx.work / "bench.duckdb"
    t = compare("dev loop", {"plain": lambda: run(plain), "deferred": lambda: run(deferred)},
                ctx.args.repeat, before_each=lambda: drop_schema(db, "dev"))
    ctx.rows.append(Row("devloop", measure, "report (speed-up)", t.text("plain", "deferred"),
                        t.ratio("plain", "deferred")[0], None,
                        {"deferred": deferred.describe(), "plain": plain.describe(),
                         "timings": t.asdict(), "ratio_meaning": "plain / deferred (speed-up)"}))


def make_big_manifests(ctx: Ctx, n: int) -> list[Path]:
    """Parse (not build) an n-model project; write 3 state dirs whose schemas differ."""
    if ctx.big_states:
        return ctx.big_states
    big = ctx.work / "big"
    dirs = [ctx.work / "big-state" / env for env in ("staging", "qa", "prod")]
    stamp, stamp_value = ctx.work / "big-state" / "stamp.json", {"nodes": n, "version": 2}
    if ctx.args.reuse and stamp.exists() and json.loads(stamp.read_text()) == stamp_value:
        log(f"--reuse: keeping the {n}-node manifests in {stamp.parent}")
        ctx.big_states = dirs
        return dirs
    log(f"parsing a {n}-model project for the set-up measurement")
    write_project(big, n, macro_package(ctx.work), ctx.work / "big.duckdb", ctx.args.threads)
    run(Call(big, ["deps"], hide_plugin=True))
    t = run(Call(big, ["parse", "--target", "dev"], hide_plugin=True)).seconds
    log(f"  parsed in {t:.1f}s")
    manifest = json.loads((big / "target" / "manifest.json").read_text())
    for d in dirs:
        for node in manifest["nodes"].values():
            if node.get("resource_type") == "model":
                node["schema"] = d.name
                node["relation_name"] = f'"big"."{d.name}"."{node["alias"]}"'
        d.mkdir(parents=True, exist_ok=True)
        (d / "manifest.json").write_text(json.dumps(manifest))
    stamp.write_text(json.dumps(stamp_value))
    ctx.big_states = dirs
    return dirs


def time_loader(mode: str, dirs: list[Path]) -> dict:
    out = subprocess.run([sys.executable, str(LOADER), mode, *map(str, dirs)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} manifest load failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_setup(ctx: Ctx) -> None:
    """(c) load + merge 3 manifests with dbt-defer vs dbt loading one."""
    n = ctx.args.setup_models
    measure = f"3. deferral set-up: 3 × {n}-node manifests vs dbt loading 1"
    budget = "< 1.00×"
    if not need_plugin(ctx, "setup", measure, budget):
        return
    dirs = make_big_manifests(ctx, n)
    size_mb = (dirs[0] / "manifest.json").stat().st_size / 1e6
    runs: dict[str, list[dict]] = {"plugin": [], "dbt": []}
    for i in range(ctx.args.repeat):
        runs["plugin"].append(time_loader("plugin", dirs))
        runs["dbt"].append(time_loader("dbt", dirs[-1:]))
        log(f"  set-up round {i + 1}/{ctx.args.repeat}: plugin {runs['plugin'][-1]['seconds']:.2f}s"
            f", dbt {runs['dbt'][-1]['seconds']:.2f}s")
    p = median([r["seconds"] for r in runs["plugin"]])
    d = median([r["seconds"] for r in runs["dbt"]])
    ratio = p / d
    detail = {side: {"how": rs[0]["how"], "nodes": rs[0]["nodes"],
                     "seconds": [r["seconds"] for r in rs]} for side, rs in runs.items()}
    ctx.rows.append(Row("setup", measure, budget, f"{p:.3f}s vs {d:.3f}s ({size_mb:.0f} MB each)",
                        ratio, ratio < 1.0, detail))


LAYERED = {"inert", "chain", "setup", "setup_situ", "metadata", "devloop"}  # on the --models project
LABELS = {  # measure -> (label, budget), for rows of measures that could not run
    "inert": ("1. inert overhead (deferral off vs plugin not installed)", "≤ 1.02×"),
    "chain": ("2. chain overhead (DBT_DEFER=1 staging+prod vs native --defer)", "≤ 1.10×"),
    "setup": ("3. deferral set-up: load 3 manifests vs dbt loading 1", "< 1.00×"),
    "setup_situ": ("3b. deferral set-up in situ (start+merge vs PreviousState+merge)",
                   "< 1.00×"),
    "metadata": ("4. metadata queries per (database, schema), deferred build", "≤ 1"),
    "devloop": ("5. dev-loop speed-up (plain +leaf vs deferred leaf)", "report"),
    "realistic": ("5b. dev loop on real data volumes", "report"),
    "scaling": ("6. scaling", "see the scaling table"),
}
PLUGIN_SETUP = ("DeferSession.start", "DeferSession.merge")
LISTING = "ExistenceChecker._settle"  # within PLUGIN_SETUP: the warehouse listing (budget 4)


def setup_seconds(timers: dict) -> tuple[float, float]:
    """(loading + merging, warehouse listing) of dbt-defer's set-up: SPEC §10 item 3 times
    "loading and merging the chain's manifests", as dbt's side (PreviousState + merge) does no
    warehouse query; the listing, one metadata query per chain schema, is reported beside it."""
    seconds = timers["seconds"]
    listing = seconds.get(LISTING, 0.0)
    return sum(seconds[k] for k in PLUGIN_SETUP) - listing, listing
DBT_SETUP = ("PreviousState.__init__", "GraphRunnableTask.defer_to_manifest")


def measure_setup_in_situ(ctx: Ctx) -> None:
    """(c, in situ) the same 3 × n manifests, timed inside real `dbt compile` runs of the
    n-model project: dbt-defer's DeferSession.start + merge (load, validate, merge into
    dbt's manifest) vs dbt's PreviousState + defer_to_manifest (merge_from_artifact)."""
    n = ctx.args.setup_models
    measure = f"3b. same, in situ: dbt-defer start+merge vs dbt PreviousState+merge ({n} nodes; loading + merging)"
    budget = "< 1.00×"
    if not need_plugin(ctx, "setup_situ", measure, budget):
        return
    dirs = make_big_manifests(ctx, n)
    big = ctx.work / "big"
    for name in ("situ_plugin", "situ_native"):  # start both from the warm partial parse
        (big / "target" / name).mkdir(parents=True, exist_ok=True)
        shutil.copy2(big / "target" / "partial_parse.msgpack", big / "target" / name)
    compile_one = ["compile", "--target", "dev", "-s", ctx.project.model(0, 0)]
    env = {"DBT_DEFER": "1", **{f"DBT_DEFER_{d.name.upper()}_STATE": str(d) for d in dirs}}
    plugin = Call(big, compile_one + ["--target-path", "target/situ_plugin"], env=env)
    native = Call(big, compile_one + ["--defer", "--state", str(dirs[-1]),
                                      "--target-path", "target/situ_native"], hide_plugin=True)
    sums: dict[str, list[float]] = {"plugin": [], "dbt": [], "listing": []}
    for rnd in range(min(3, ctx.args.repeat) + 1):
        p, d = run(plugin, timers=True).timers, run(native, timers=True).timers
        if rnd == 0:  # warm-up; check the timers fired
            for side, got, want in (("plugin", p, PLUGIN_SETUP), ("dbt", d, DBT_SETUP)):
                lacking = [k for k in want if k not in got["seconds"]]
                if lacking:
                    raise RuntimeError(f"in-situ {side} run: {lacking} never ran "
                                       f"(missing hooks: {got['missing']})")
            continue
        sums["plugin"].append(setup_seconds(p)[0])
        sums["listing"].append(setup_seconds(p)[1])
        sums["dbt"].append(sum(d["seconds"][k] for k in DBT_SETUP))
        log(f"  in-situ set-up round {rnd}: plugin {sums['plugin'][-1]:.2f}s (+ listing {sums['listing'][-1]:.2f}s), "
            f"dbt {sums['dbt'][-1]:.2f}s  ({p['seconds']} / {d['seconds']})")
    pm, dm = median(sums["plugin"]), median(sums["dbt"])
    text = f"{pm:.3f}s vs {dm:.3f}s (dbt-defer's warehouse listing, excluded: {median(sums['listing']):.3f}s)"
    ctx.rows.append(Row("setup_situ", measure, budget, text, pm / dm,
                        pm / dm < 1.0, {"seconds": sums, "plugin": plugin.describe(),
                                        "native": native.describe()}))


# ---------------------------------------------------------------- real data volumes (5b, 5c)

def pg_settings() -> dict:
    get = lambda key, default: os.environ.get(f"DBT_DEFER_TEST_PG_{key}", default)  # noqa: E731
    return {"host": get("HOST", "127.0.0.1"), "port": int(get("PORT", "5432")),
            "user": get("USER", "postgres"), "password": get("PASSWORD", ""), "dbname": get("DBNAME", "test")}


class Warehouse:
    """SQL outside dbt: the generated source data, dropping the dev schema, cleaning up."""

    def __init__(self, adapter: str, duckdb_path: Path | None = None) -> None:
        self.adapter, self.duckdb_path = adapter, duckdb_path

    def execute(self, *statements: str) -> list:
        rows: list = []
        if self.adapter == "duckdb":
            import duckdb

            con = duckdb.connect(str(self.duckdb_path))
            try:
                for sql in statements:
                    rows = con.execute(sql).fetchall() if sql.lstrip().lower().startswith("select") \
                        else (con.execute(sql), [])[1]
            finally:
                con.close()
            return rows
        import psycopg2

        s = pg_settings()
        conn = psycopg2.connect(host=s["host"], port=s["port"], user=s["user"], password=s["password"],
                                dbname=s["dbname"], connect_timeout=5)
        try:
            with conn, conn.cursor() as cur:
                for sql in statements:
                    cur.execute(sql)
                    rows = cur.fetchall() if cur.description else []
        finally:
            conn.close()
        return rows

    def drop_prefix(self, prefix: str) -> None:
        like = prefix.replace("_", "\\_") + "\\_%"
        found = self.execute("select schema_name from information_schema.schemata "
                             f"where schema_name like '{like}'")
        self.execute(*[f"drop schema if exists {name} cascade" for (name,) in found])


def measure_realistic(ctx: Ctx) -> None:
    for adapter in ctx.args.data_adapters.split(","):
        try:
            realistic_on(ctx, adapter)
        except Exception as exc:  # one adapter failing does not hide the other
            log(f"FAILED real-data measurement on {adapter}: {exc}")
            ctx.rows.append(Row(f"real_{adapter}", f"5b. real data on {adapter}", "report",
                                "error: " + error_summary(str(exc)), None, False, {"error": str(exc)}))


def realistic_on(ctx: Ctx, adapter: str) -> None:
    a = ctx.args
    work = ctx.work / f"data-{adapter}"
    work.mkdir(parents=True, exist_ok=True)
    db = work / "data.duckdb"
    prefix = "ddbench" if adapter == "duckdb" else f"ddbench_{os.getpid()}"
    if adapter == "duckdb":
        for f in (db, work / "data.duckdb.wal"):
            f.unlink(missing_ok=True)
    wh = Warehouse(adapter, db)
    profile = gendata.profile_yml(adapter, prefix, a.threads, db, pg_settings())
    p = gendata.write_project(work / "project", adapter, a.data_width, a.rows, prefix,
                              macro_package(ctx.work), profile)
    try:
        log(f"real data on {adapter}: {a.rows:,} source rows, {gendata.LAYERS} layers × {p.width} tables")
        start = time.perf_counter()
        wh.execute(*gendata.source_sql(p))
        log(f"  source generated in {time.perf_counter() - start:.1f}s")
        run(Call(p.root, ["deps"], hide_plugin=True))
        prod, staging = work / "prod-artifacts", work / "staging-artifacts"
        t = run(Call(p.root, ["build", "--target", "prod", "--target-path", "target/prod"], hide_plugin=True))
        save_state(p.root, "target/prod", prod)
        log(f"  prod built in {t.seconds:.1f}s")
        t = run(Call(p.root, ["build", "--target", "staging", "-s", "tag:in_staging",
                              "--target-path", "target/staging"], hide_plugin=True))
        save_state(p.root, "target/staging", staging)
        log(f"  staging (tag:in_staging) built in {t.seconds:.1f}s")

        leaf = p.leaf()
        chain = {"DBT_DEFER": "1", "DBT_DEFER_STAGING_STATE": str(staging), "DBT_DEFER_PROD_STATE": str(prod)}
        plain = Call(p.root, ["build", "--target", "dev", "-s", f"+{leaf}", "--target-path", "target/plain"],
                     hide_plugin=True)
        deferred = Call(p.root, ["build", "--target", "dev", "-s", leaf, "--target-path", "target/deferred"],
                        env=chain)
        native = Call(p.root, ["build", "--target", "dev", "-s", leaf, "--defer", "--state", str(prod),
                               "--target-path", "target/native"], hide_plugin=True)
        dev = p.schema("dev")
        t = compare(f"real data {adapter}", {"plain": lambda: run(plain), "deferred": lambda: run(deferred),
                                             "native": lambda: run(native)},
                    a.repeat, before_each=lambda: wh.execute(f"drop schema if exists {dev} cascade"))
        expect_hidden(t.warmup["native"], "native --defer baseline")
        summary = read_audit_summary(p.root / "target/deferred") or {}
        where = f"{adapter}, {a.rows / 1e6:g}M source rows, {gendata.LAYERS} layers of tables"
        speedup = t.ratio("plain", "deferred")[0]
        saved = summary.get("saved_seconds")
        ctx.rows.append(Row(
            f"real_{adapter}", f"5b. dev loop on real data ({where}): plain build -s +{leaf} "
            f"({p.upstream_of_leaf() + 1} tables) vs deferred -s {leaf}", "report (speed-up)",
            t.text("plain", "deferred") + (f"; audit: {summary.get('not_built')} not rebuilt, "
                                           f"saved_seconds {saved}" if summary else ""),
            speedup, None, {"timings": t.asdict(), "audit_summary": summary, "plain": plain.describe(),
                            "deferred": deferred.describe(), "native": native.describe(),
                            "ratio_meaning": "plain / deferred (speed-up)"}))
        limit = t.ratio("deferred", "native")[0]
        ctx.rows.append(Row(
            f"real_limit_{adapter}", f"5c. physical limit ({where}): deferred -s {leaf} (staging+prod) "
            f"vs native --defer --state prod -s {leaf}", "≤ 1.05×", t.text("deferred", "native"),
            limit, limit <= 1.05, {"timings": t.asdict()}))
    finally:
        if adapter == "postgres":
            wh.drop_prefix(prefix)
            log(f"  dropped the {prefix}_* schemas")
        else:
            for f in (db, work / "data.duckdb.wal"):
                f.unlink(missing_ok=True)


# ---------------------------------------------------------------- scaling (SPEC §10 item 6)

def derived_states(ctx: Ctx) -> list[Path]:
    """3 environments (staging, qa, prod) from this project's prod manifest, each pointing at its
    own schema: staging and prod exist (staging in part), qa does not (a partial chain)."""
    base = ctx.work / "three-envs"
    dirs = [base / env for env in ("staging", "qa", "prod")]
    manifest = json.loads((ctx.prod_state / "manifest.json").read_text())
    runs = {"staging": ctx.staging_state, "prod": ctx.prod_state}
    for d in dirs:
        for node in manifest["nodes"].values():
            if node.get("resource_type") == "model":
                node["schema"] = d.name
                node["relation_name"] = None
        d.mkdir(parents=True, exist_ok=True)
        (d / "manifest.json").write_text(json.dumps(manifest))
        if d.name in runs and (runs[d.name] / "run_results.json").exists():
            shutil.copy2(runs[d.name] / "run_results.json", d / "run_results.json")
    return dirs


def scale_point(ctx: Ctx) -> dict:
    """Budgets 2-4 and peak memory at one project size."""
    n, repeat = ctx.project.n_models, ctx.args.repeat
    sel = ["build", "--target", "dev", "-s", *ctx.selection()]
    chain = Call(ctx.root, sel + ["--target-path", "target/chain"], env=ctx.chain_env())
    native = Call(ctx.root, sel + ["--defer", "--state", str(ctx.prod_state), "--target-path", "target/native"],
                  hide_plugin=True)
    plain = Call(ctx.root, ["build", "--target", "prod", "-s", *ctx.selection(), "--target-path", "target/plain"],
                 hide_plugin=True)
    t = compare(f"scale {n}", {"plain": lambda: run(plain), "native": lambda: run(native),
                               "chain": lambda: run(chain)}, repeat)
    expect_hidden(t.warmup["native"], "native --defer baseline")
    counts = run(chain, count=True).counts["list_relations_by_schema"]

    point = setup_point(ctx, "target/chain")
    med = {k: median(v) for k, v in t.wall.items()}
    point.update({
        "wall": med, "timings": t.asdict(), "chain_ratio": med["chain"] / med["native"],
        "metadata_max": max(counts.values(), default=0), "metadata": counts,
        "peak_chain_build": median(t.peak_mb["chain"]), "peak_native_build": median(t.peak_mb["native"]),
    })
    return point


def setup_point(ctx: Ctx, warm_target: str) -> dict:
    """Budget 3 at one size, in situ and loaders only, and peak memory of a deferred compile
    with 3 environments; ``warm_target``: the target path whose partial parse starts the runs."""
    n, repeat = ctx.project.n_models, ctx.args.repeat
    dirs = derived_states(ctx)
    iso: dict[str, list[float]] = {"plugin": [], "dbt": []}
    for _ in range(repeat):
        iso["plugin"].append(time_loader("plugin", dirs)["seconds"])
        iso["dbt"].append(time_loader("dbt", dirs[-1:])["seconds"])

    for name in ("situ_plugin", "situ_native"):  # start from the warm partial parse of the dev runs
        (ctx.root / "target" / name).mkdir(parents=True, exist_ok=True)
        shutil.copy2(ctx.root / warm_target / "partial_parse.msgpack", ctx.root / "target" / name)
    compile_one = ["compile", "--target", "dev", "-s", ctx.project.model(0, 0)]
    env3 = {"DBT_DEFER": "1", **{f"DBT_DEFER_{d.name.upper()}_STATE": str(d) for d in dirs}}
    p_call = Call(ctx.root, compile_one + ["--target-path", "target/situ_plugin"], env=env3)
    d_call = Call(ctx.root, compile_one + ["--defer", "--state", str(ctx.prod_state),
                                           "--target-path", "target/situ_native"], hide_plugin=True)
    situ: dict[str, list[float]] = {"plugin": [], "dbt": [], "listing": []}
    peak: dict[str, list[float]] = {"plugin": [], "dbt": []}
    for rnd in range(repeat + 1):
        p, d = run(p_call, timers=True), run(d_call, timers=True)
        if rnd == 0:
            for side, got, want in (("plugin", p.timers, PLUGIN_SETUP), ("dbt", d.timers, DBT_SETUP)):
                lacking = [k for k in want if k not in got["seconds"]]
                if lacking:
                    raise RuntimeError(f"in-situ {side} run at {n}: {lacking} never ran")
            continue
        situ["plugin"].append(setup_seconds(p.timers)[0])
        situ["listing"].append(setup_seconds(p.timers)[1])
        situ["dbt"].append(sum(d.timers["seconds"][k] for k in DBT_SETUP))
        peak["plugin"].append(p.peak_mb)
        peak["dbt"].append(d.peak_mb)
        log(f"  scale {n} set-up round {rnd}: plugin {situ['plugin'][-1]:.2f}s (+ listing {situ['listing'][-1]:.2f}s), "
            f"dbt {situ['dbt'][-1]:.2f}s, "
            f"peak {p.peak_mb:.0f} vs {d.peak_mb:.0f} MB")
    point = {
        "models": n,
        "setup_plugin": median(situ["plugin"]), "setup_dbt": median(situ["dbt"]),
        "setup_listing": median(situ["listing"]),
        "setup_iso_plugin": median(iso["plugin"]), "setup_iso_dbt": median(iso["dbt"]),
        "peak_chain3": median(peak["plugin"]), "peak_native_compile": median(peak["dbt"]),
        "manifest_mb": (ctx.prod_state / "manifest.json").stat().st_size / 1e6,
    }
    point["setup_ratio"] = point["setup_plugin"] / point["setup_dbt"]
    point["setup_iso_ratio"] = point["setup_iso_plugin"] / point["setup_iso_dbt"]
    return point


def measure_scaling(ctx: Ctx) -> None:
    import copy

    setup_only = {int(x) for x in (ctx.args.setup_only_sizes or "").split(",") if x}
    from_compiled = {int(x) for x in (ctx.args.compiled_sizes or "").split(",") if x}
    for n in [int(x) for x in ctx.args.sizes.split(",")]:
        sub_args = copy.copy(ctx.args)
        sub_args.models, sub_args.work_dir = n, ctx.work / f"scale-{n}"
        log(f"scaling: {n} models" + (" (set-up and memory only: prod alone is built)" if n in setup_only else ""))
        sub = setup(sub_args, prod_only=n in setup_only, from_compiled=n in from_compiled)
        point = setup_point(sub, "target/prod") if n in setup_only else scale_point(sub)
        timings = sub.work / "setup-timings.json"
        if n in from_compiled and timings.exists():
            point["environments_from_compiled"] = json.loads(timings.read_text())
        log(f"  {n}: chain/native {point.get('chain_ratio', float('nan')):.3f}, set-up {point['setup_ratio']:.3f}, "
            f"peak chain(3) {point['peak_chain3']:.0f} MB")
        ctx.scaling.append(point)


def scaling_table(points: list[dict]) -> str:
    ok = lambda cond: "pass" if cond else "**FAIL**"  # noqa: E731
    lines = [
        "| models | plain build (s) | native `--defer` (s) | chain (s) | chain / native (≤ 1.00×) "
        "| set-up in situ, loading + merging: dbt-defer vs dbt (≤ 0.15×) | + warehouse listing in the set-up (s) "
        "| set-up, loaders only | metadata queries per schema (≤ 1) "
        "| peak memory: chain build vs native (MB) | peak memory: 3-environment deferred compile vs native (MB) |",
        "| ---: | ---: | ---: | ---: | --- | --- | ---: | --- | --- | --- | --- |",
    ]
    for p in points:
        if "wall" not in p:  # a set-up-only size: its build and metadata columns were not measured
            lines.append(
                f"| {p['models']:,} | not measured | not measured | not measured | not measured "
                f"| {p['setup_plugin']:.3f}s vs {p['setup_dbt']:.3f}s = {p['setup_ratio']:.3f}× {ok(p['setup_ratio'] <= 0.15)} "
                f"| {p.get('setup_listing', 0.0):.3f} "
                f"| {p['setup_iso_plugin']:.3f}s vs {p['setup_iso_dbt']:.3f}s = {p['setup_iso_ratio']:.3f}× "
                f"| not measured | not measured | {p['peak_chain3']:.0f} vs {p['peak_native_compile']:.0f} |")
            continue
        w = p["wall"]
        lines.append(
            f"| {p['models']:,} | {w['plain']:.2f} | {w['native']:.2f} | {w['chain']:.2f} "
            f"| {p['chain_ratio']:.3f}× {ok(p['chain_ratio'] <= 1.0)} "
            f"| {p['setup_plugin']:.3f}s vs {p['setup_dbt']:.3f}s = {p['setup_ratio']:.3f}× {ok(p['setup_ratio'] <= 0.15)} "
            f"| {p.get('setup_listing', 0.0):.3f} "
            f"| {p['setup_iso_plugin']:.3f}s vs {p['setup_iso_dbt']:.3f}s = {p['setup_iso_ratio']:.3f}× "
            f"| {p['metadata_max']} {ok(p['metadata_max'] <= 1)} "
            f"| {p['peak_chain_build']:.0f} vs {p['peak_native_build']:.0f} "
            f"| {p['peak_chain3']:.0f} vs {p['peak_native_compile']:.0f} |")
    return "\n".join(lines) + "\n"


def scaling_plot(points: list[dict], path: Path, selected: int) -> bool:
    try:
        import matplotlib
    except ImportError:
        log("matplotlib is not installed (pip install -e '.[bench]'): no plot")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [p for p in points if "wall" in p]
    if not points:
        return False
    xs = [p["models"] for p in points]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for key, label, style in (("plain", "plain dbt (no deferral)", "o-"),
                              ("native", "native --defer --state prod", "s--"),
                              ("chain", "dbt-defer chain (staging + prod)", "^-")):
        ax.plot(xs, [p["wall"][key] for p in points], style, label=label)
    ax.set_xlabel("models in the project")
    ax.set_ylabel("wall time, median (s)")
    ax.set_title(f"dbt build of {selected} top-layer models, by project size")
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{x:,}" for x in xs])
    ax.set_ylim(0, 1.15 * max(max(p["wall"].values()) for p in points))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


MEASURES = {"inert": measure_inert, "chain": measure_chain, "setup": measure_setup,
            "setup_situ": measure_setup_in_situ,
            "metadata": measure_metadata, "devloop": measure_devloop, "realistic": measure_realistic,
            "scaling": measure_scaling}


# ---------------------------------------------------------------- report

def wait_for_quiet(ctx: Ctx, name: str) -> None:
    """Before a measurement: wait (checking every 60 s) until the 1-minute load average is below
    --quiet-load, for at most --quiet-wait minutes; the outcome goes into the report's notes."""
    a = ctx.args
    if not a.quiet_wait:
        return
    start = time.monotonic()
    while os.getloadavg()[0] >= a.quiet_load and time.monotonic() - start < a.quiet_wait * 60:
        log(f"  waiting for a quiet machine before {name}: load {os.getloadavg()[0]:.2f}")
        time.sleep(60)
    load = os.getloadavg()[0]
    waited = (time.monotonic() - start) / 60
    quiet = load < a.quiet_load
    ctx.notes.append(f"{name}: started at 1-minute load {load:.2f} after waiting {waited:.0f} min"
                     + ("" if quiet else f" (NOT quiet: gave up waiting after {a.quiet_wait} min)"))
    log(ctx.notes[-1])


def report(ctx: Ctx, elapsed: float) -> str:
    a = ctx.args
    layered = any(r.key in LAYERED or r.key == "inert_vanilla" for r in ctx.rows)
    lines = [
        (f"dbt-defer benchmark — {ctx.project.n_models} models × 10 layers, "
         f"selection {len(ctx.selection())} top-layer models, " if layered else "dbt-defer benchmark — ")
        + f"repeat {a.repeat} (medians), threads {a.threads}, "
        f"{'quick' if a.quick else 'full'} run, {elapsed / 60:.1f} min total, "
        + f"{os.cpu_count()} CPUs, load average at the end "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}",
        "",
        "| measure | budget | measured: dbt-defer vs baseline, median wall (CPU ratio) "
        "| wall ratio | result |",
        "| --- | --- | --- | --- | --- |",
    ]
    order = ["inert", "inert_vanilla", "chain", "setup", "setup_situ", "metadata", "devloop",
             "real_duckdb", "real_limit_duckdb", "real_postgres", "real_limit_postgres", "realistic"]
    for row in sorted(ctx.rows, key=lambda r: order.index(r.key) if r.key in order else len(order)):
        ratio = f"{row.ratio:.3f}×" if row.ratio is not None else "—"
        lines.append(f"| {row.measure} | {row.budget} | {row.measured} | {ratio} | {row.verdict} |")
    if ctx.scaling:
        lines += ["", f"Scaling (SPEC §10 item 6): {len(ctx.selection())} top-layer models built in dev, "
                  f"repeat {a.repeat} (medians); plain = the same selection without deferral (plugin "
                  "not installed); chain = staging + prod; set-up in situ = DeferSession.start + merge "
                  "(3 environments: staging, qa, prod) vs dbt's PreviousState + defer_to_manifest "
                  "(1 environment), timed inside real `dbt compile` runs.", "",
                  scaling_table(ctx.scaling).rstrip("\n")]
        made = [p for p in ctx.scaling if "environments_from_compiled" in p]
        if made:
            lines += ["", "Environments created from dbt compile's SQL (`--compiled-sizes`, not `dbt build`): "
                      + "; ".join(f"{p['models']:,} models: " + ", ".join(
                          f"{env} {t['relations']:,} relations, compile {t['compile']:.0f}s + create {t['create']:.0f}s"
                          for env, t in p["environments_from_compiled"].items()) for p in made) + "."]
        if ctx.plot:
            lines += ["", f"Plot: `{ctx.plot}`."]
    if ctx.notes:
        lines += ["", "Notes: " + "; ".join(ctx.notes) + "."]
    lines += ["", f"Machine: {platform.platform()}, Python {platform.python_version()}, "
              f"dbt-core {dbt_version()}. Command: `python bench/run.py {' '.join(sys.argv[1:])}`."]
    return "\n".join(lines) + "\n"


def error_summary(text: str) -> str:
    """The most telling line of a dbt failure, for the table."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for marker in ("dbt-defer:", "Error"):
        for ln in lines:
            if marker in ln and "Completed with" not in ln:
                return ln.replace("|", "/")[:200]
    return lines[0][:200] if lines else "?"


def dbt_version() -> str:
    from importlib.metadata import version
    return version("dbt-core")


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="200 models, 3 repeats, 2,000-node set-up")
    ap.add_argument("--models", type=int, help="models in the layered project (default 2000)")
    ap.add_argument("--repeat", type=int, help="timed rounds per measurement (default 5)")
    ap.add_argument("--setup-models", type=int, help="nodes per manifest for measure 3 "
                    "(default 10000)")
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--select", type=int, default=40, help="top-layer models selected in "
                    "measures 1, 2 and 4 (default 40)")
    ap.add_argument("--rows", type=int, default=1_000_000, help="source rows of the real-data "
                    "project (5b/5c; default 1,000,000)")
    ap.add_argument("--data-width", type=int, default=4, help="tables per layer of the real-data "
                    "project (default 4)")
    ap.add_argument("--data-adapters", default="duckdb,postgres", help="adapters of 5b/5c")
    ap.add_argument("--sizes", default="1000,5000,20000", help="project sizes of the scaling "
                    "measurement (default 1000,5000,20000)")
    ap.add_argument("--setup-only-sizes", default="", help="scaling sizes (of --sizes) measured for "
                    "set-up and memory only, with prod alone built: for sizes whose environments "
                    "take dbt too long to build here")
    ap.add_argument("--compiled-sizes", default="", help="scaling sizes (of --sizes) whose "
                    "environments are created from dbt compile's SQL (one compile per environment, "
                    "then create view/table ... as <compiled SQL> in one DuckDB connection) instead "
                    "of dbt build: minutes instead of over an hour at 20,000 models")
    ap.add_argument("--quiet-wait", type=float, default=0, help="before each measurement, wait up "
                    "to this many minutes for the 1-minute load average to drop below --quiet-load")
    ap.add_argument("--quiet-load", type=float, default=1.5)
    ap.add_argument("--only", help="comma-separated subset of: " + ",".join(MEASURES))
    ap.add_argument("--reuse", action="store_true", help="reuse the generated projects, "
                    "warehouse and prod/staging states of a previous run with the same --models")
    ap.add_argument("--work-dir", type=Path, help="scratch dir (default bench/.work/quick "
                    "or bench/.work/full)")
    ap.add_argument("--out", type=Path, default=BENCH, help="where results.md/json go")
    a = ap.parse_args(argv)
    a.models = a.models or (200 if a.quick else 2000)
    a.repeat = a.repeat or (3 if a.quick else 5)
    a.setup_models = a.setup_models or (2000 if a.quick else 10000)
    a.work_dir = a.work_dir or BENCH / ".work" / ("quick" if a.quick else "full")
    return a


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    wanted = args.only.split(",") if args.only else list(MEASURES)
    if set(wanted) & LAYERED:
        ctx = setup(args)
    else:  # the real-data and scaling measures make their own projects
        work = args.work_dir.resolve()
        work.mkdir(parents=True, exist_ok=True)
        ctx = Ctx(args, work, project_for(work / "project", args.models), work / "vanilla",
                  work / "prod-artifacts", work / "staging-artifacts", plugin_status())
    log(f"plugin: {ctx.plugin}")
    if not ctx.plugin["importable"]:
        log("dbt_defer is not installed in this Python: plugin measurements are skipped")
    for name in wanted:
        wait_for_quiet(ctx, name)
        log(f"measuring {name}")
        try:
            MEASURES[name](ctx)
        except (DbtFailed, RuntimeError) as exc:
            log(f"FAILED to measure {name}:\n{exc}")
            label, budget = LABELS[name]
            ctx.rows.append(Row(name, label, budget, "error: " + error_summary(str(exc)),
                                None, False, {"error": str(exc)}))
    if ctx.scaling:
        args.out.mkdir(parents=True, exist_ok=True)
        if scaling_plot(ctx.scaling, args.out / "scaling.png", len(ctx.selection())):
            ctx.plot = os.path.relpath(args.out / "scaling.png", REPO)
    table = report(ctx, time.perf_counter() - started)
    print("\n" + table)
    failed = [r.measure for r in ctx.rows if r.passed is False]
    if failed:
        print("FAIL: " + "; ".join(failed))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(table)
    (args.out / "results.json").write_text(json.dumps({
        "settings": {k: str(v) for k, v in vars(args).items()},
        "plugin": ctx.plugin,
        "rows": [asdict(r) for r in ctx.rows],
        "scaling": ctx.scaling,
        "notes": ctx.notes,
    }, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
