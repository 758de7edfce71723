"""A 10-layer project of *tables* over generated source data (SPEC §10 item 5), on DuckDB or
Postgres.

Source: one table `<raw schema>.events` of ROWS rows (event_id 0..ROWS-1, user_id, event_type,
amount, ts), generated in the warehouse itself. Layer 0 (`stg_i`) splits it into WIDTH
partitions keyed by k = event_id / WIDTH; model i of layers 1-8 joins models i and i+1 (mod
WIDTH) of the layer below 1:1 on k (every model holds ROWS / WIDTH rows); layer 9 (the marts)
joins the same way and aggregates by user and event type. Every model is a table.

The ancestors of the first half of layer 8 carry the tag `in_staging` (a partial staging).
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

LAYERS = 10
SHIM = "{% macro ref() %}{{ return(dbt_defer.ref(*varargs, **kwargs)) }}{% endmacro %}\n"


@dataclass(frozen=True)
class DataProject:
    root: Path
    adapter: str
    width: int
    rows: int
    prefix: str  # schema prefix: <prefix>_raw, <prefix>_prod, <prefix>_staging, <prefix>_dev

    def model(self, layer: int, i: int) -> str:
        i %= self.width
        return f"stg_{i}" if layer == 0 else f"l{layer}_m{i}"

    def leaf(self) -> str:
        return self.model(LAYERS - 1, 0)

    def schema(self, env: str) -> str:
        return f"{self.prefix}_{env}"

    def upstream_of_leaf(self) -> int:
        """How many models dbt build -s +leaf builds besides the leaf."""
        return sum(min(self.width, LAYERS - layer) for layer in range(LAYERS - 1))


def staging_members(width: int) -> set[tuple[int, int]]:
    half = max(1, width // 2)
    return {(layer, i) for layer in range(LAYERS - 1) for i in range(min(width, half + LAYERS - 2 - layer))}


def model_sql(p: DataProject, layer: int, i: int, tagged: bool) -> str:
    config = "{{ config(tags=['in_staging']) }}\n" if tagged else ""
    if layer == 0:
        return (f"{config}select cast((event_id - event_id % {p.width}) / {p.width} as bigint) as k,\n"
                f"       user_id, event_type, amount, ts\n"
                f"from {{{{ source('raw', 'events') }}}}\nwhere event_id % {p.width} = {i}\n")
    a, b = p.model(layer - 1, i), p.model(layer - 1, i + 1)
    join = f"from {{{{ ref('{a}') }}}} as a\njoin {{{{ ref('{b}') }}}} as b on a.k = b.k\n"
    if layer == LAYERS - 1:
        return (f"{config}select a.user_id, a.event_type, count(*) as events,\n"
                f"       sum(a.amount + b.amount) as amount, max(greatest(a.ts, b.ts)) as last_ts\n"
                f"{join}group by a.user_id, a.event_type\n")
    return (f"{config}select a.k, a.user_id, (a.event_type + b.event_type) % 10 as event_type,\n"
            f"       a.amount + b.amount / 2 as amount, greatest(a.ts, b.ts) as ts\n{join}")


def write_project(root: Path, adapter: str, width: int, rows: int, prefix: str, package: Path,
                  profile: str, with_defer: bool = True) -> DataProject:
    p = DataProject(root, adapter, width, rows, prefix)
    if root.exists():
        shutil.rmtree(root)
    (root / "models").mkdir(parents=True)
    (root / "macros").mkdir()
    (root / "dbt_project.yml").write_text(
        "name: bench_data\nversion: '1.0'\nconfig-version: 2\nprofile: bench_data\n"
        "model-paths: ['models']\nmacro-paths: ['macros']\n"
        "models:\n  bench_data:\n    +materialized: table\n")
    (root / "profiles.yml").write_text(profile)
    if with_defer:
        (root / "macros" / "ref.sql").write_text(SHIM)
        (root / "packages.yml").write_text(f"packages:\n  - local: {package}\n")
    (root / "models" / "sources.yml").write_text(
        f"version: 2\nsources:\n  - name: raw\n    schema: {p.schema('raw')}\n    tables:\n      - name: events\n")
    members = staging_members(width)
    for layer in range(LAYERS):
        d = root / "models" / f"layer{layer}"
        d.mkdir()
        for i in range(width):
            (d / f"{p.model(layer, i)}.sql").write_text(model_sql(p, layer, i, (layer, i) in members))
    return p


def source_sql(p: DataProject) -> list[str]:
    """Statements that (re)create <prefix>_raw.events with p.rows rows."""
    raw = p.schema("raw")
    cols = ("g as event_id, (g * 7919) % 50000 as user_id, g % 10 as event_type, "
            "cast((g * 31) % 10000 as double precision) / 100 as amount, ")
    if p.adapter == "duckdb":
        gen = (f"select {cols}timestamp '2024-01-01' + to_seconds(g % 31536000) as ts "
               f"from range(0, {p.rows}) as t(g)")
    else:
        gen = (f"select {cols}timestamp '2024-01-01' + (g % 31536000) * interval '1 second' as ts "
               f"from generate_series(cast(0 as bigint), {p.rows - 1}) as g")
    return [f"drop schema if exists {raw} cascade", f"create schema {raw}",
            f"create table {raw}.events as {gen}"]


def profile_yml(adapter: str, prefix: str, threads: int, duckdb_path: Path | None = None,
                pg: dict | None = None) -> str:
    out = ["bench_data:", "  target: dev", "  outputs:"]
    for target in ("prod", "staging", "dev"):
        out += [f"    {target}:", f"      type: {adapter}"]
        if adapter == "duckdb":
            out += [f"      path: '{duckdb_path}'"]
        else:
            out += [f"      host: '{pg['host']}'", f"      port: {pg['port']}", f"      user: '{pg['user']}'",
                    f"      password: '{pg['password']}'", f"      dbname: '{pg['dbname']}'"]
        out += [f"      schema: {prefix}_{target}", f"      threads: {threads}"]
    return "\n".join(out) + "\n"
