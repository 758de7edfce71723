"""The ``dbt-defer`` command line: status, explain, fetch, publish, state, run (SPEC §8, §11).

The CLI sits on top of the package: it imports config, manifests, chain, guard, remote and publish,
and none of them imports it. One module per command (``status``, ``explain``, ``fetch``,
``publish``: its options, its logic, its output); ``common`` reads the project as dbt does and
holds the output helpers. This module owns only the parser and ``main``.

Configuration is read as a deferred dbt run reads it (``session.config_for_task``):
``vars: dbt_defer`` from the project's dbt_project.yml, overlaid by ``--vars``, then the
``DBT_DEFER_*`` environment variables, then ``--defer-state``/``--state`` (or
``DBT_DEFER_STATE``/``DBT_STATE``).

Errors are one line on stderr, no traceback: exit 1 when something is unusable or dbt failed,
exit 2 for bad usage or configuration.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from dbt_defer.version import __version__
from dbt_defer.cli import explain, fetch, portable, publish, status
from dbt_defer.cli.common import CliError, Formatter, ProjectContext, say, short_id, shown
from dbt_defer.cli.explain import cmd_explain, run_explain
from dbt_defer.cli.fetch import cmd_fetch
from dbt_defer.cli.publish import cmd_publish
from dbt_defer.cli.status import cmd_status, shim_file
from dbt_defer.config import DeferConfigError, one_line, truthy

__all__ = [
    "CliError", "ProjectContext", "build_parser", "cmd_explain", "cmd_fetch", "cmd_publish", "cmd_status",
    "main", "run_explain", "shim_file", "short_id", "shown",
]

_MAIN_EPILOG = """\
examples:
  dbt-defer status                       # where each environment's manifest comes from, and how old it is
  dbt-defer explain -s customers+        # where every ref of the selection would be read from
  dbt-defer fetch                        # refresh the local copies of remote (s3://, https://, ...) manifests
  dbt-defer publish s3://bucket/dbt/prod --env prod   # after a production run: publish its artifacts
  dbt-defer run -- build -s my_model     # portable mode (dbt Core v2): the chain's state, then dbt

configuration (see the README): vars: dbt_defer: environments in dbt_project.yml, or
DBT_DEFER_<NAME>_STATE environment variables, e.g. DBT_DEFER_PROD_STATE=s3://bucket/dbt/prod
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dbt-defer",
        description="Inspect and prepare dbt-defer's chain of environments (dev -> staging -> prod).",
        epilog=_MAIN_EPILOG,
        formatter_class=Formatter,
    )
    parser.add_argument("--version", action="version", version=f"dbt-defer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{status,explain,fetch,publish,state,run}")
    for command in (status, explain, fetch, publish, portable):
        command.register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"] and argv[1:2] not in (["-h"], ["--help"]):
        # dbt-defer run [--partial-parse] [--] <dbt arguments>: everything after is dbt's, as given
        rest = argv[1:]
        partial = rest[:1] == ["--partial-parse"]
        rest = rest[1:] if partial else rest
        rest = rest[1:] if rest[:1] == ["--"] else rest
        args = argparse.Namespace(func=portable.cmd_run, dbt_args=rest, partial_parse=partial)
    else:
        args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except CliError as exc:
        say(exc, sys.stderr)
        return exc.code
    except DeferConfigError as exc:
        say(exc, sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dbt-defer: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # dbt-defer explain ... | head: the reader has what it wanted
        _quiet_stdout()
        return 141  # 128 + SIGPIPE, as a shell reports a command its pipe closed
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in ("dbt", "dbt_common", "dbt_adapters", "agate"):
            return _unexpected(exc)
        say(
            f"dbt-defer: 'dbt-defer {argv[0] if argv else ''}' needs dbt-core 1.x, which is not installed "
            f"here (no module {exc.name}); install it (pip install \"dbt-defer[dbt1]\") or, on dbt Core v2, "
            "use 'dbt-defer state' and 'dbt-defer run'",
            sys.stderr,
        )
        return 2
    except Exception as exc:  # one line, no traceback (DBT_DEFER_DEBUG=1 shows it)
        return _unexpected(exc)


def _unexpected(exc: Exception) -> int:
    if truthy(os.environ.get("DBT_DEFER_DEBUG")):
        raise exc
    say(
        f"dbt-defer: unexpected error: {type(exc).__name__}: {one_line(exc)} "
        "(set DBT_DEFER_DEBUG=1 for the traceback)",
        sys.stderr,
    )
    return 1


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush at exit does not print
    'Exception ignored ... BrokenPipeError' after the pipe's reader is gone."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real stdout (captured in tests)
        pass
