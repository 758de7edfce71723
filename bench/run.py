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

    def asdict(self) -> dict:
        return {"wall": self.wall, "cpu": self.cpu}

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

def setup_stamp(args: argparse.Namespace) -> dict:
    return {"models": args.models, "generator": GENERATOR_VERSION,
            "package": str(macro_package(args.work_dir.resolve()))}


def setup(args: argparse.Namespace) -> Ctx:
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    db = work / "bench.duckdb"
    stamp_file, stamp = work / "stamp.json", setup_stamp(args)
    if args.reuse and stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp:
        log(f"--reuse: keeping the projects, warehouse and states in {work}")
        project = project_for(work / "project", args.models)
        for root in (project.root, work / "vanilla"):
            (root / "profiles.yml").write_text(profiles_yml(db, args.threads))
        return Ctx(args, work, project, work / "vanilla", work / "prod-artifacts",
                   work / "staging-artifacts", plugin_status())
    stamp_file.unlink(missing_ok=True)
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

    log("building prod (full)")
    t = run(Call(project.root, ["build", "--target", "prod", "--target-path", "target/prod"],
                 hide_plugin=True)).seconds
    save_state(project.root, "target/prod", ctx.prod_state)
    log(f"  prod built in {t:.1f}s")
    log("building staging (tag:in_staging, about half the project)")
    t = run(Call(project.root, ["build", "--target", "staging", "-s", "tag:in_staging",
                                "--target-path", "target/staging"], hide_plugin=True)).seconds
    save_state(project.root, "target/staging", ctx.staging_state)
    log(f"  staging built in {t:.1f}s")
    stamp_file.write_text(json.dumps(stamp))
    return ctx


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


LABELS = {  # measure -> (label, budget), for rows of measures that could not run
    "inert": ("1. inert overhead (deferral off vs plugin not installed)", "≤ 1.02×"),
    "chain": ("2. chain overhead (DBT_DEFER=1 staging+prod vs native --defer)", "≤ 1.10×"),
    "setup": ("3. deferral set-up: load 3 manifests vs dbt loading 1", "< 1.00×"),
    "setup_situ": ("3b. deferral set-up in situ (start+merge vs PreviousState+merge)",
                   "< 1.00×"),
    "metadata": ("4. metadata queries per (database, schema), deferred build", "≤ 1"),
    "devloop": ("5. dev-loop speed-up (plain +leaf vs deferred leaf)", "report"),
}
PLUGIN_SETUP = ("DeferSession.start", "DeferSession.merge")
DBT_SETUP = ("PreviousState.__init__", "GraphRunnableTask.defer_to_manifest")


def measure_setup_in_situ(ctx: Ctx) -> None:
    """(c, in situ) the same 3 × n manifests, timed inside real `dbt compile` runs of the
    n-model project: dbt-defer's DeferSession.start + merge (load, validate, merge into
    dbt's manifest) vs dbt's PreviousState + defer_to_manifest (merge_from_artifact)."""
    n = ctx.args.setup_models
    measure = f"3b. same, in situ: dbt-defer start+merge vs dbt PreviousState+merge ({n} nodes)"
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
    sums: dict[str, list[float]] = {"plugin": [], "dbt": []}
    for rnd in range(min(3, ctx.args.repeat) + 1):
        p, d = run(plugin, timers=True).timers, run(native, timers=True).timers
        if rnd == 0:  # warm-up; check the timers fired
            for side, got, want in (("plugin", p, PLUGIN_SETUP), ("dbt", d, DBT_SETUP)):
                lacking = [k for k in want if k not in got["seconds"]]
                if lacking:
                    raise RuntimeError(f"in-situ {side} run: {lacking} never ran "
                                       f"(missing hooks: {got['missing']})")
            continue
        sums["plugin"].append(sum(p["seconds"][k] for k in PLUGIN_SETUP))
        sums["dbt"].append(sum(d["seconds"][k] for k in DBT_SETUP))
        log(f"  in-situ set-up round {rnd}: plugin {sums['plugin'][-1]:.2f}s, "
            f"dbt {sums['dbt'][-1]:.2f}s  ({p['seconds']} / {d['seconds']})")
    pm, dm = median(sums["plugin"]), median(sums["dbt"])
    ctx.rows.append(Row("setup_situ", measure, budget, f"{pm:.3f}s vs {dm:.3f}s", pm / dm,
                        pm / dm < 1.0, {"seconds": sums, "plugin": plugin.describe(),
                                        "native": native.describe()}))


MEASURES = {"inert": measure_inert, "chain": measure_chain, "setup": measure_setup,
            "setup_situ": measure_setup_in_situ,
            "metadata": measure_metadata, "devloop": measure_devloop}


# ---------------------------------------------------------------- report

def report(ctx: Ctx, elapsed: float) -> str:
    a = ctx.args
    lines = [
        f"dbt-defer benchmark — {ctx.project.n_models} models × 10 layers, "
        f"repeat {a.repeat} (medians), threads {a.threads}, "
        f"selection {len(ctx.selection())} top-layer models, "
        f"{'quick' if a.quick else 'full'} run, {elapsed / 60:.1f} min total, "
        f"{os.cpu_count()} CPUs, load average at the end "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}",
        "",
        "| measure | budget | measured: dbt-defer vs baseline, median wall (CPU ratio) "
        "| wall ratio | result |",
        "| --- | --- | --- | --- | --- |",
    ]
    order = ["inert", "inert_vanilla", "chain", "setup", "setup_situ", "metadata", "devloop"]
    for row in sorted(ctx.rows, key=lambda r: order.index(r.key)):
        ratio = f"{row.ratio:.3f}×" if row.ratio is not None else "—"
        lines.append(f"| {row.measure} | {row.budget} | {row.measured} | {ratio} | {row.verdict} |")
    lines += ["", f"Machine: {platform.platform()}, Python {platform.python_version()}, "
              f"dbt-core {dbt_version()}. Command: `python bench/run.py"
              f"{' --quick' if a.quick else ''}`."]
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
    ctx = setup(args)
    log(f"plugin: {ctx.plugin}")
    if not ctx.plugin["importable"]:
        log("dbt_defer is not installed in this Python: plugin measurements are skipped")
    wanted = args.only.split(",") if args.only else list(MEASURES)
    for name in wanted:
        log(f"measuring {name}")
        try:
            MEASURES[name](ctx)
        except (DbtFailed, RuntimeError) as exc:
            log(f"FAILED to measure {name}:\n{exc}")
            label, budget = LABELS[name]
            ctx.rows.append(Row(name, label, budget, "error: " + error_summary(str(exc)),
                                None, False, {"error": str(exc)}))
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
    }, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
