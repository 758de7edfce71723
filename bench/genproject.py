"""Generate a layered dbt project on DuckDB for the dbt-defer benchmark.

Layout: N models spread over LAYERS layers. Model i of layer k>0 selects from
models i and i+1 (mod width) of layer k-1 via ref(); layer 0 selects constants.
Layers in TABLE_LAYERS are materialized as tables, every other layer as views
(an intermediate table layer keeps DuckDB's nested-view binding cheap).

Models that are ancestors of the first half of layer LAYERS-2 carry the tag
`in_staging`, so `--select tag:in_staging` builds a self-contained half of the
project (used as the partial staging environment).
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

GENERATOR_VERSION = 2  # bump when the generated projects change (invalidates --reuse)
LAYERS = 10
TABLE_LAYERS = (0, 5)
SHIM = "{% macro ref() %}{{ return(dbt_defer.ref(*varargs, **kwargs)) }}{% endmacro %}\n"


@dataclass(frozen=True)
class Project:
    root: Path
    n_models: int
    width: int  # models per layer

    def model(self, layer: int, i: int) -> str:
        return f"l{layer}_m{i % self.width:05d}"

    @property
    def top(self) -> int:
        return LAYERS - 1

    def leaf(self) -> str:
        return self.model(self.top, 0)

    def selection(self, size: int) -> list[str]:
        """`size` top-layer models spread evenly over the layer, so that their parents
        are partly in staging (first half of the layer below) and partly prod-only."""
        size = min(size, self.width)
        return [self.model(self.top, j * self.width // size) for j in range(size)]


def staging_members(width: int) -> set[tuple[int, int]]:
    """(layer, index) of the ancestors of the first half of layer LAYERS-2."""
    half = max(1, width // 2)
    members = set()
    for layer in range(LAYERS - 1):
        reach = half + (LAYERS - 2 - layer)  # each layer down widens the block by one
        for i in range(min(width, reach)):
            members.add((layer, i))
    return members


def model_sql(p: Project, layer: int, i: int, tagged: bool) -> str:
    config = "{{ config(tags=['in_staging']) }}\n" if tagged else ""
    if layer == 0:
        return f"{config}select {i} as id, {i * 7 % 101} as v, 'row {i}' as label\n"
    a, b = p.model(layer - 1, i), p.model(layer - 1, i + 1)
    return (
        f"{config}select a.id, a.v + b.v as v, a.label\n"
        f"from {{{{ ref('{a}') }}}} as a\n"
        f"cross join {{{{ ref('{b}') }}}} as b\n"
    )


def project_for(root: Path, n_models: int) -> Project:
    width = max(2, n_models // LAYERS)
    return Project(root=root, n_models=width * LAYERS, width=width)


def write_project(root: Path, n_models: int, package_path: Path, db_path: Path,
                  threads: int, with_defer: bool = True) -> Project:
    """Write a fresh project at `root` (removed first). `with_defer=False` writes a
    vanilla project: no dbt_defer package, no ref shim."""
    p = project_for(root, n_models)
    if root.exists():
        shutil.rmtree(root)
    (root / "models").mkdir(parents=True)
    (root / "macros").mkdir()

    layer_cfg = "\n".join(
        f"    layer{k}:\n      +tags: ['layer{k}']"
        + ("\n      +materialized: table" if k in TABLE_LAYERS else "")
        for k in range(LAYERS)
    )
    (root / "dbt_project.yml").write_text(
        "name: bench\nversion: '1.0'\nconfig-version: 2\nprofile: bench\n"
        "model-paths: ['models']\nmacro-paths: ['macros']\n"
        "models:\n  bench:\n    +materialized: view\n" + layer_cfg + "\n"
    )
    (root / "profiles.yml").write_text(profiles_yml(db_path, threads))
    if with_defer:
        (root / "macros" / "ref.sql").write_text(SHIM)
        (root / "packages.yml").write_text(f"packages:\n  - local: {package_path}\n")

    members = staging_members(p.width)
    for layer in range(LAYERS):
        d = root / "models" / f"layer{layer}"
        d.mkdir()
        for i in range(p.width):
            sql = model_sql(p, layer, i, (layer, i) in members)
            (d / f"{p.model(layer, i)}.sql").write_text(sql)
    return p


def profiles_yml(db_path: Path, threads: int) -> str:
    out = ["bench:", "  target: dev", "  outputs:"]
    for target in ("prod", "staging", "dev"):
        out += [f"    {target}:", "      type: duckdb", f"      path: '{db_path}'",
                f"      schema: {target}", f"      threads: {threads}"]
    return "\n".join(out) + "\n"
