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

    from dbt_defer import patches as _patches

    class DeferPlugin(dbtPlugin):
        """Registered with dbt's plugin manager; the work happens in dbt_defer.patches. Set up
        by dbt once per invocation: with deferral on, says which dbt versions dbt-defer was
        checked on when the installed one is not among them, and that dbt's own --defer runs
        when the installed dbt could not be patched."""

        def initialize(self) -> None:
            try:
                _announce()
            except Exception:  # a notice must never stop dbt
                pass

    def _announce() -> None:
        from dbt.flags import get_flags
        from dbt_common.events.base_types import EventLevel

        from dbt_defer.events import log

        if not getattr(get_flags(), "DEFER", False):
            return
        if _patches.unpatched():
            log(_patches.fallback_line(), EventLevel.WARN)
        elif not _patches.checked_on(_patches.dbt_version()):
            log(
                f"dbt-defer: dbt-core {_patches.dbt_version()} is not among the versions dbt-defer was "
                f"checked on ({_patches.checked_range()}); every dbt internal it patches is present "
                "with the expected shape, so the chain is on"
            )

    _patches.apply()
    plugins = [DeferPlugin]
else:  # pragma: no cover
    plugins = []
