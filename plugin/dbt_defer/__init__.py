"""dbt-defer: resolve every ref() through a chain of environments (dev -> staging -> prod).

dbt imports every top-level ``dbt_*`` module and reads its ``plugins`` list; importing this
package installs the patches in ``dbt_defer.patches`` (cheap; inert while deferral is off).
"""

from dbt_defer.version import __version__  # noqa: F401  (dbt_defer.__version__)

try:
    from dbt.plugins.manager import dbtPlugin
except ImportError:  # dbt-core not installed: the CLI's pure parts still import
    dbtPlugin = None  # type: ignore


if dbtPlugin is not None:

    class DeferPlugin(dbtPlugin):
        """Registered with dbt's plugin manager; the work happens in dbt_defer.patches."""

    from dbt_defer import patches as _patches

    _patches.apply()
    plugins = [DeferPlugin]
else:  # pragma: no cover
    plugins = []
