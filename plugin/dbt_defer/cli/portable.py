"""``dbt-defer state`` and ``dbt-defer run`` (SPEC §8, §11): the portable mode's commands, for
engines that load no Python plugin (dbt Core v2). Imports nothing of dbt-core 1.x: the engine
is a subprocess (``portable.engine``).

Owns the two parsers and their output; the work is ``portable.state`` and ``portable.run``.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterator

from dbt_defer.cli.common import CliError, Formatter
from dbt_defer.portable.engine import ENGINE_VAR, EngineError, executable
from dbt_defer.portable.project import PARTIAL_PARSE_VAR, PortableContext, ProjectError
from dbt_defer.portable.state import StateError, compute

STATE_EPILOG = f"""\
Computes, before any dbt starts, where every node of the project would be read from (the chain:
dev -> staging -> prod) and writes one merged deferral manifest: DIR/manifest.json,
whose nodes carry the chosen environment's relation, plus DIR/dbt_defer_state.json (per node:
environment, reason). The last line printed is DIR. Then, on dbt Core v2 (or dbt 1.x without
the plugin):

  dbt build -s my_model --defer --defer-state DIR --favor-state

The project is parsed, the selection made and the warehouse listed by the dbt executable
itself ({ENGINE_VAR}, default: dbt): one `ls`/`parse` of the project into a scratch folder and
one read-only `run-operation dbt_defer.portable_relations` (one metadata query per schema) in a
one-macro project of its own. With --partial-parse the engine's own partial parse is used
(dbt Core v2: one cache per target, under <target-path>/dbt_defer_parse).
A selection that would write a relation a chain environment records is refused: nothing is
written and exit 1.

examples:
  dbt-defer state -s my_model
  {ENGINE_VAR}=dbt-core-experimental-parser dbt-defer state -s state:modified+ --out /tmp/defer
"""

RUN_EPILOG = f"""\
Computes the state for the selection in the dbt arguments (as `dbt-defer state`), then runs
{ENGINE_VAR} (default: dbt) with those arguments plus --defer --defer-state <folder>
--favor-state, passes its exit code through, and writes target/dbt_defer_audit.json.

examples:
  dbt-defer run -- build -s my_model
  dbt-defer run -- compile -s my_model --target ci
"""


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "state", help="portable mode: write the chain's merged deferral manifest for dbt Core v2 (--defer --defer-state)",
        description="Write the merged deferral manifest of the chain (portable mode, for engines without the plugin).",
        epilog=STATE_EPILOG, formatter_class=Formatter,
    )
    parser.add_argument("-s", "--select", nargs="+", action="extend", metavar="SELECTOR", default=[],
                        help="the nodes you will build (dbt selectors); they are never deferred")
    parser.add_argument("--exclude", nargs="+", action="extend", metavar="SELECTOR", default=[])
    parser.add_argument("--selector", metavar="NAME")
    parser.add_argument("--out", metavar="DIR", help="where to write (default: <target-path>/dbt_defer_portable)")
    parser.add_argument("--favor-state", action="store_true", help="dev_relations: never")
    parser.add_argument("--store-failures", action="store_true", help="the tests will store failures (guarded)")
    parser.add_argument("--partial-parse", action="store_true",
                        help=f"the engine's own partial parse (dbt Core v2; also {PARTIAL_PARSE_VAR}=1): "
                        "a cache per target under <target-path>/dbt_defer_parse; seconds faster on large projects")
    parser.add_argument("--as", dest="as_command", choices=("build", "compile"), default="build",
                        help="resolve for a build (default: selected nodes read from the target, write guard on) "
                        "or a compile/show (a selected node missing from the target is read through the chain)")
    group = parser.add_argument_group("project (as for dbt; passed to the dbt executable)")
    group.add_argument("--project-dir", metavar="D")
    group.add_argument("--profiles-dir", metavar="P")
    group.add_argument("-t", "--target", metavar="T")
    group.add_argument("--vars", metavar="YAML")
    group.add_argument("--target-path", metavar="PATH")
    parser.set_defaults(func=cmd_state)

    run = sub.add_parser(
        "run", help="portable mode: compute the state, run dbt with --defer --defer-state, write the audit",
        description="Run dbt (dbt Core v2, or any dbt) with the chain's merged deferral manifest.",
        epilog=RUN_EPILOG, formatter_class=Formatter,
    )
    run.add_argument("--partial-parse", action="store_true",
                     help=f"the engine's own partial parse for the state step (dbt Core v2; also {PARTIAL_PARSE_VAR}=1)")
    run.add_argument("dbt_args", nargs="*", metavar="DBT_ARGS", help="the dbt command and its arguments, after --")
    run.set_defaults(func=cmd_run)


def _warn(line: str) -> None:
    print(line, file=sys.stderr)


@contextlib.contextmanager
def _one_line_errors() -> Iterator[None]:
    """The portable mode's errors as CLI errors: one line each, with its exit code."""
    try:
        yield
    except ProjectError as exc:
        raise CliError(str(exc), 2) from None
    except StateError as exc:
        raise CliError(str(exc), exc.code) from None
    except EngineError as exc:
        raise CliError(str(exc), 1) from None


def cmd_state(args: Any) -> int:
    from dbt_defer.portable.engine import Engine

    with _one_line_errors():
        ctx = PortableContext(project_dir=args.project_dir, profiles_dir=args.profiles_dir, target=args.target,
                              vars=args.vars, target_path=args.target_path, favor_state=args.favor_state,
                              partial_parse=args.partial_parse)
        engine = Engine(executable(), ctx.root, profiles_dir=args.profiles_dir, target=args.target, vars=args.vars)
        result = compute(ctx, engine, select=args.select, exclude=args.exclude, selector=args.selector,
                         builds=args.as_command == "build", store_failures=args.store_failures,
                         out=args.out, warn=_warn)
    counts: dict = {}
    for choice in result.choices.values():
        counts[choice.env] = counts.get(choice.env, 0) + 1
    print("dbt-defer: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + f" (target {result.target})")
    print(result.folder)
    return 0


def cmd_run(args: Any) -> int:
    from dbt_defer.portable.run import run

    with _one_line_errors():
        return run(args.dbt_args, _warn, print, partial_parse=args.partial_parse)
