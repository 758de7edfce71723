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
"""
from __future__ import annotations

import atexit
import importlib.abc
import json
import sys

PLUGIN = "dbt_defer"


class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == PLUGIN or name.startswith(PLUGIN + "."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by bench)", name=name)
        return None


def hide_plugin() -> None:
    if PLUGIN in sys.modules:
        sys.exit(f"bench: {PLUGIN} was imported at interpreter start-up; cannot hide it")
    sys.meta_path.insert(0, _Blocker())
    import pkgutil

    original = pkgutil.iter_modules

    def iter_modules(path=None, prefix=""):
        return (m for m in original(path, prefix) if m.name != prefix + PLUGIN)

    pkgutil.iter_modules = iter_modules


def probe(out: str) -> None:
    def write():
        mod = sys.modules.get(PLUGIN)
        with open(out, "w") as f:
            json.dump({"dbt_defer_loaded": mod is not None,
                       "file": getattr(mod, "__file__", None)}, f)
    atexit.register(write)


def count_metadata(out: str) -> None:
    from dbt.adapters.duckdb.impl import DuckDBAdapter
    from dbt.adapters.sql.connections import SQLConnectionManager

    by_schema: dict[str, int] = {}
    catalog_sql: list[str] = []
    original_list = DuckDBAdapter.list_relations_without_caching
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

    DuckDBAdapter.list_relations_without_caching = list_relations_without_caching
    SQLConnectionManager.add_query = add_query

    def write():
        with open(out, "w") as f:
            json.dump({"list_relations_by_schema": by_schema,
                       "catalog_queries": len(catalog_sql),
                       "catalog_query_samples": catalog_sql[:20]}, f, indent=1)
    atexit.register(write)


def main(argv: list[str]) -> None:
    sep = argv.index("--")
    opts, dbt_args = argv[:sep], argv[sep + 1:]
    if "--hide-plugin" in opts:
        hide_plugin()
    if "--probe" in opts:
        probe(opts[opts.index("--probe") + 1])
    if "--count" in opts:
        count_metadata(opts[opts.index("--count") + 1])
    from dbt.cli.main import cli

    sys.argv = ["dbt", *dbt_args]
    sys.exit(cli())


if __name__ == "__main__":
    main(sys.argv[1:])
