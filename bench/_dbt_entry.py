"""Run dbt in this process, optionally with the dbt_defer plugin hidden and/or
with metadata queries counted. Used as a subprocess by run.py:

    python _dbt_entry.py [--hide-plugin] [--probe FILE] [--count FILE] -- <dbt args>

--hide-plugin  makes `dbt_defer` undiscoverable and unimportable, however it is
               installed (editable .pth path entry, meta-path finder, or a regular
               install): dbt's plugin manager discovers `dbt_*` modules through
               pkgutil.iter_modules() and imports them with importlib, so we filter
               the former and block the latter. The dbt_defer *macro package* in the
               project is untouched (it is project code, not the plugin).
--probe FILE   writes {"dbt_defer_loaded": bool, "file": ...} at exit, so run.py
               can verify which side it measured.
--count FILE   counts adapter.list_relations_without_caching calls per
               (database, schema) and catalog SQL statements, written as JSON at exit.
--cprofile FILE  runs dbt under cProfile and writes the stats to FILE (pstats format), e.g.
               to see what the plugin's set-up costs at 20k models.
--timers FILE  times deferral set-up in situ, written as JSON at exit: dbt's
               PreviousState.__init__ + GraphRunnableTask.defer_to_manifest, and (plugin
               visible) dbt_defer's DeferSession.start + DeferSession.merge, and within them
               the warehouse listing (ExistenceChecker._settle).
"""
from __future__ import annotations

import atexit
import importlib.abc
import json
import sys

PLUGIN = "dbt_defer"


class _Blocker(importlib.abc.MetaPathFinder):
    def __init__(self, blocked: str) -> None:
        self.blocked, self.prefix = blocked, blocked + "."

    def find_spec(self, name, path=None, target=None):
        if name == self.blocked or name.startswith(self.prefix):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by bench)", name=name)
        return None


def install_filters(blocked: str) -> None:
    """Block imports of `blocked` and drop it from pkgutil.iter_modules(). Installed in
    both modes (with a name that matches nothing when the plugin stays visible), so
    both sides of a comparison pay the same import-hook cost."""
    if blocked in sys.modules:
        sys.exit(f"bench: {blocked} was imported at interpreter start-up; cannot hide it")
    sys.meta_path.insert(0, _Blocker(blocked))
    import pkgutil

    original = pkgutil.iter_modules

    def iter_modules(path=None, prefix=""):
        return (m for m in original(path, prefix) if m.name != prefix + blocked)

    pkgutil.iter_modules = iter_modules


def probe(out: str) -> None:
    def write():
        mod = sys.modules.get(PLUGIN)
        with open(out, "w") as f:
            json.dump({"dbt_defer_loaded": mod is not None,
                       "file": getattr(mod, "__file__", None)}, f)
    atexit.register(write)


def count_metadata(out: str) -> None:
    from dbt.adapters.sql.connections import SQLConnectionManager
    from dbt.adapters.sql.impl import SQLAdapter  # DuckDB's and Postgres's adapters inherit it

    by_schema: dict[str, int] = {}
    catalog_sql: list[str] = []
    original_list = SQLAdapter.list_relations_without_caching
    original_add_query = SQLConnectionManager.add_query

    def list_relations_without_caching(self, schema_relation, *a, **kw):
        key = f"{schema_relation.database}.{schema_relation.schema}"
        by_schema[key] = by_schema.get(key, 0) + 1
        return original_list(self, schema_relation, *a, **kw)

    def add_query(self, sql, *a, **kw):
        low = sql.lower()
        if "information_schema" in low or "duckdb_tables" in low or "duckdb_views" in low:
            catalog_sql.append(" ".join(sql.split())[:160])
        return original_add_query(self, sql, *a, **kw)

    SQLAdapter.list_relations_without_caching = list_relations_without_caching
    SQLConnectionManager.add_query = add_query

    def write():
        with open(out, "w") as f:
            json.dump({"list_relations_by_schema": by_schema,
                       "catalog_queries": len(catalog_sql),
                       "catalog_query_samples": catalog_sql[:20]}, f, indent=1)
    atexit.register(write)


SETUP_FUNCTIONS = [
    ("dbt.contracts.state", "PreviousState", "__init__"),
    ("dbt.task.runnable", "GraphRunnableTask", "defer_to_manifest"),
    ("dbt_defer.session", "DeferSession", "start"),
    ("dbt_defer.session", "DeferSession", "merge"),
    # the warehouse listing inside the set-up (one metadata query per chain schema, budget 4):
    # timed on its own, so the set-up of budget 3 is what SPEC §10 names, "loading and merging"
    ("dbt_defer.warehouse", "ExistenceChecker", "_settle"),
]


def time_setup(out: str, with_plugin: bool) -> None:
    import functools
    import importlib
    import time

    totals: dict[str, float] = {}
    missing: list[str] = []

    inside = [0]  # depth of set-up calls: the listing counts only within the set-up

    def timed(label, fn):
        listing = label == "ExistenceChecker._settle"

        # functools.wraps: the wrapper shows fn's signature (__wrapped__), which dbt-defer checks
        # before it patches (patches._find); a bare (*args, **kwargs) made it fall back to native
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            inside[0] += 0 if listing else 1
            try:
                return fn(*args, **kwargs)
            finally:
                inside[0] -= 0 if listing else 1
                if not listing or inside[0] > 0:
                    totals[label] = totals.get(label, 0.0) + time.perf_counter() - start
        return wrapper

    for module, cls_name, attr in SETUP_FUNCTIONS:
        label = f"{cls_name}.{attr}"
        if module.startswith(PLUGIN) and not with_plugin:
            continue
        try:
            cls = getattr(importlib.import_module(module), cls_name)
            raw = cls.__dict__[attr]
        except (ImportError, AttributeError, KeyError):
            missing.append(f"{module}.{label}")
            continue
        if isinstance(raw, (classmethod, staticmethod)):
            setattr(cls, attr, type(raw)(timed(label, raw.__func__)))
        else:
            setattr(cls, attr, timed(label, raw))

    def write():
        with open(out, "w") as f:
            json.dump({"seconds": totals, "missing": missing}, f)
    atexit.register(write)


def main(argv: list[str]) -> None:
    sep = argv.index("--")
    opts, dbt_args = argv[:sep], argv[sep + 1:]
    install_filters(PLUGIN if "--hide-plugin" in opts else "dbt_defer_bench_nothing")
    if "--probe" in opts:
        probe(opts[opts.index("--probe") + 1])
    if "--count" in opts:
        count_metadata(opts[opts.index("--count") + 1])
    if "--timers" in opts:
        time_setup(opts[opts.index("--timers") + 1], "--hide-plugin" not in opts)
    from dbt.cli.main import cli

    sys.argv = ["dbt", *dbt_args]
    if "--cprofile" in opts:
        import cProfile

        profiler = cProfile.Profile()
        atexit.register(profiler.dump_stats, opts[opts.index("--cprofile") + 1])
        profiler.enable()
    sys.exit(cli())


if __name__ == "__main__":
    main(sys.argv[1:])
