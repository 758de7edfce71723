"""dbt 1.x with the dbt-defer plugin not importable: the "dbt 1.x without the plugin" engine of
the portable mode's three-way comparison (SPEC §11). dbt's plugin manager imports every
top-level ``dbt_*`` module it finds; this hides ``dbt_defer`` from that listing and from import,
then runs dbt's own command line. Usage: python dbt_without_plugin.py <dbt arguments>."""

import importlib.abc
import pkgutil
import sys


class _Hidden(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "dbt_defer" or name.startswith("dbt_defer."):
            raise ImportError(f"{name} is hidden: this is dbt without the dbt-defer plugin")
        return None


sys.meta_path.insert(0, _Hidden())
_iter_modules = pkgutil.iter_modules


def _listed(path=None, prefix=""):
    return (m for m in _iter_modules(path, prefix) if m.name != "dbt_defer")


pkgutil.iter_modules = _listed

if __name__ == "__main__":
    from dbt.cli.main import cli

    sys.argv[0] = "dbt"
    cli()
