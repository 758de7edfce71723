"""Time manifest loading in a fresh process (imports excluded from the timing).

    python _load_manifests.py dbt <state_dir>
    python _load_manifests.py plugin <state_dir> [<state_dir> ...]

Prints one JSON line: {"seconds": float, "nodes": int, "how": str}.

`dbt` does what dbt's own --defer/--state does for one environment
(dbt.contracts.state.PreviousState): WritableManifest.read_and_check_versions +
Manifest.from_writable_manifest. `plugin` loads every state dir with dbt-defer's
loader and merges them into one chain; adapt `plugin_loader()` if the plugin's
API changes.
"""
from __future__ import annotations

import inspect
import json
import sys
import time
from pathlib import Path


def dbt_loader():
    from dbt.artifacts.schemas.manifest import WritableManifest
    from dbt.contracts.graph.manifest import Manifest

    def load(dirs: list[Path]):
        [d] = dirs
        writable = WritableManifest.read_and_check_versions(str(d / "manifest.json"))
        manifest = Manifest.from_writable_manifest(writable)
        return len(manifest.nodes)
    return load, "dbt PreviousState path (read_and_check_versions + from_writable_manifest)"


LOADER_NAMES = ("load_environment_manifest", "load_manifest")
MERGE_NAMES = ("merge_chain", "merge_environments", "build_chain", "merge")


def plugin_loader():
    """Return (load(dirs) -> node count, description), adapting to dbt_defer.manifests:
    the first loader function of LOADER_NAMES that exists, called as
    f(env_name, manifest_path) when its first parameter is a name, else f(manifest_path);
    then a module-level merge function of MERGE_NAMES if there is one."""
    import dbt_defer.manifests as m
    from dbt.artifacts.schemas.manifest import WritableManifest

    names = [n for n in dir(m) if not n.startswith("_") and callable(getattr(m, n))]
    load_one = next((getattr(m, n) for n in LOADER_NAMES if hasattr(m, n)), None)
    if load_one is None:
        raise SystemExit(f"dbt_defer.manifests has none of {LOADER_NAMES}; it has: {names}")
    sig = inspect.signature(load_one)
    params = list(sig.parameters)
    kwargs = {}
    if "is_compatible" in params:  # what the plugin passes at run time
        kwargs["is_compatible"] = WritableManifest.is_compatible_version
    named = bool(params) and params[0] in ("name", "env_name", "env")

    def call_one(env_name: str, d: Path):
        path = str(d / "manifest.json")
        return load_one(env_name, path, **kwargs) if named else load_one(path, **kwargs)

    merge = next((getattr(m, n) for n in MERGE_NAMES if hasattr(m, n)), None)

    def load(dirs: list[Path]):
        envs = [call_one(d.name, d) for d in dirs]
        return _count_nodes(merge(envs) if merge else envs)

    how = f"dbt_defer.manifests.{load_one.__name__}{sig} per environment"
    how += f" + {merge.__name__}" if merge else " (no module-level merge function: load only)"
    return load, how


def _count_nodes(obj) -> int:
    for attr in ("nodes", "node_env", "index"):
        val = getattr(obj, attr, None)
        if val is not None and hasattr(val, "__len__"):
            return len(val)
    if isinstance(obj, (list, tuple)):
        return sum(_count_nodes(o) for o in obj)
    return len(obj) if hasattr(obj, "__len__") else -1


def main(argv: list[str]) -> None:
    mode, dirs = argv[0], [Path(a) for a in argv[1:]]
    load, how = dbt_loader() if mode == "dbt" else plugin_loader()
    start = time.perf_counter()
    nodes = load(dirs)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "nodes": nodes, "how": how}))


if __name__ == "__main__":
    main(sys.argv[1:])
