"""The package's house rules (issue 16, README "Layout"): imports point one way, down the
layers below, and every module has its place in them. Reads the source; runs nothing."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "plugin" / "dbt_defer"

# bottom first; a module may import only modules of lower layers (lazy imports included)
LAYERS = [
    ["portable", "version", "config", "localfiles", "events", "artifact_schema", "testing.runner", "testing.files"],
    ["untrusted", "env_names"],
    ["manifests", "settings"],
    ["pointer", "store", "state_cache"],
    ["remote"],
    ["chain", "publish"],
    ["resolution", "warehouse", "merge", "guard", "limits", "audit_table"],
    ["audit"],
    ["refs", "portable.engine", "portable.project"],
    ["portable.state"],
    ["portable.run"],
    ["session"],
    ["patches"],
    [""],  # the package itself: importing it installs the patches
    ["cli.common"],
    ["cli.status", "cli.explain", "cli.fetch", "cli.publish", "cli.portable"],
    ["cli"],
    ["cli.__main__", "testing.project"],
    ["testing.environments"],
    ["testing.cases_rules", "testing.cases_features"],
    ["testing"],
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dbt_defer":
            if node.module == "dbt_defer":  # from dbt_defer import chain, remote
                found.update(alias.name for alias in node.names)
            else:
                found.add(node.module[len("dbt_defer."):] if "." in node.module else "")
        elif isinstance(node, ast.Import):
            found.update(a.name[len("dbt_defer."):] for a in node.names if a.name.startswith("dbt_defer."))
            found.update("" for a in node.names if a.name == "dbt_defer")
    return found


def test_every_module_has_a_layer_and_imports_only_below_it():
    modules = {_name(p): p for p in PACKAGE.rglob("*.py")}
    assert sorted(set(modules) - set(RANK)) == [], "place each new module in LAYERS (and the README)"
    assert sorted(set(RANK) - set(modules)) == [], "LAYERS names a module that is gone"
    upward = [
        f"{name} imports {dep or 'dbt_defer'}"
        for name, path in sorted(modules.items())
        for dep in sorted(_imports(path) - {name})
        if RANK.get(dep, len(LAYERS)) >= RANK[name]
    ]
    assert upward == []


def test_config_imports_nothing_of_ours_and_nothing_of_dbt():
    tree = ast.parse((PACKAGE / "config.py").read_text(encoding="utf-8"))
    roots = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom)) and getattr(node, "module", "x")
        for alias in node.names
    }
    assert not roots & {"dbt_defer", "dbt", "dbt_common"}, roots


def test_every_requirement_has_a_lower_bound():
    """Issue 22 (14): an unbounded extra let a resolver pick s3fs 0.4.2 (2020). Every dependency
    and every extra's requirement names a lowest version (>= or ==)."""
    import tomllib

    project = tomllib.loads((PACKAGE.parents[1] / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = list(project["dependencies"])
    for extra, reqs in project["optional-dependencies"].items():
        requirements += reqs
    unbounded = [r for r in requirements if ">=" not in r and "==" not in r and "~=" not in r]
    assert unbounded == [], unbounded


def test_the_portable_mode_imports_nothing_of_dbt_core():
    """SPEC §11: `dbt-defer state`/`run` (and importing the package) load no dbt-core 1.x module,
    even where dbt-core is installed (dbt's plugin manager alone sets the plugin up)."""
    import subprocess
    import sys

    code = (
        "import sys; import dbt_defer, dbt_defer.cli; from dbt_defer.portable import run, state; "
        "from dbt_defer.cli import portable; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('dbt', 'dbt_common', 'dbt_adapters', 'agate')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**__import__("os").environ, "PYTHONPATH": str(PACKAGE.parent)})
    assert done.returncode == 0, done.stdout + done.stderr
