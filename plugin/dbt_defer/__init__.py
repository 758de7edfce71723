"""dbt-defer: resolve every ref() through a chain of environments (dev -> staging -> prod).

dbt imports every top-level ``dbt_*`` module and reads its ``plugins`` list; reading it installs
the patches in ``dbt_defer.patches`` (cheap; inert while deferral is off). Importing the package
alone imports nothing of dbt (the portable mode, SPEC §11, runs without dbt-core).
"""

from dbt_defer.version import __version__  # noqa: F401  (dbt_defer.__version__)

_PLUGIN_NAMES = ("plugins", "DeferPlugin")


def __getattr__(name: str):
    """dbt's plugin manager reads ``dbt_defer.plugins`` when a dbt command starts: only then are
    dbt's classes imported and the patches installed (PEP 562). So importing ``dbt_defer`` (the
    ``dbt-defer`` command, the portable mode of SPEC §11) imports nothing of dbt-core."""
    if name not in _PLUGIN_NAMES:
        raise AttributeError(f"module 'dbt_defer' has no attribute {name!r}")
    _set_up()
    return globals()[name]


def _set_up() -> None:
    if "plugins" in globals():
        return
    try:
        from dbt.plugins.manager import dbtPlugin
    except ImportError:  # dbt-core not installed: the CLI's pure parts still import
        globals().update(plugins=[], DeferPlugin=None)
        return

    from dbt_defer import patches as _patches

    class DeferPlugin(dbtPlugin):
        """Registered with dbt's plugin manager; the work happens in dbt_defer.patches. Set up
        by dbt once per invocation: with deferral on, says which dbt versions dbt-defer was
        checked on when the installed one is not among them, and that dbt's own --defer runs
        when the installed dbt could not be patched."""

        def initialize(self) -> None:
            try:
                _announce(_patches)
            except Exception:  # a notice must never stop dbt
                pass

    _patches.apply()
    globals().update(plugins=[DeferPlugin], DeferPlugin=DeferPlugin)


def _announce(_patches) -> None:
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
