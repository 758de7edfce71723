"""``dbt-defer explain``: where every ref() of a selection would be read from.

Owns: running dbt's own compile (``dbtRunner``, DBT_DEFER=1, DBT_DEFER_EXPLAIN=1) into a scratch
target path and showing the audit it writes. May not touch: the resolution itself (dbt and the
plugin compute it), the user's target path (only copied from), the warehouse (explain writes
nothing there).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from dbt_defer.cli.common import (
    AUDIT_FILE,
    CliError,
    Formatter,
    ProjectContext,
    add_project_options,
    print_json,
    print_table,
    say,
    short_id,
    warn,
)
from dbt_defer.config import one_line

EPILOG = """\
Shows, for every ref() in the selected nodes, where a deferred run would read it from:
node, ref, env (dev, an environment name, or ephemeral), relation, reason (selected,
dev_exists, dev_modified, restricted, deferred, ephemeral, ...) and the row limit.
By default the answer is the one `dbt build` with the same selection would get (the
selected nodes are read from your target, where the build puts them; the write guard is
checked); --as compile gives dbt compile's answer instead. Computed by dbt itself (dbt
compile with DBT_DEFER=1) into a scratch target path: your target/ is left untouched, and
nothing is created, altered or dropped in any environment (only metadata queries: which
relations exist).

examples:
  dbt-defer explain -s customers
  dbt-defer explain -s state:modified+ --state prod-artifacts --target ci
  dbt-defer explain -s customers --output json | jq '.resolutions[] | select(.env == "prod")'
"""


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "explain", help="where each ref() of the selection resolves (env, relation, reason, limit)",
        description="Show where each ref() of the selected nodes would be read from, without building anything.",
        epilog=EPILOG, formatter_class=Formatter,
    )
    sel = parser.add_argument_group("selection (as for dbt)")
    sel.add_argument("-s", "--select", nargs="+", action="extend", metavar="SELECTOR", help="dbt selectors of the nodes to explain (default: every node, as dbt compile)")
    sel.add_argument("--exclude", nargs="+", action="extend", metavar="SELECTOR", help="dbt selectors to leave out")
    sel.add_argument("--selector", metavar="NAME", help="a named selector from selectors.yml")
    sel.add_argument(
        "--as", dest="as_command", choices=("build", "compile"), default="build",
        help="resolve as `dbt build -s ...` would (default: selected nodes read from the target, "
        "write guard checked) or as `dbt compile`/`show` would (a selected node missing from the "
        "target is read through the chain)",
    )
    sel.add_argument("--favor-state", action="store_true", help="dev_relations: never for this explain (as dbt's --favor-state)")
    sel.add_argument("--threads", type=int, metavar="N", help="dbt threads for the compile")
    add_project_options(parser)
    parser.set_defaults(func=cmd_explain)


@contextlib.contextmanager
def _env(extra: Dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _seed_scratch(ctx: ProjectContext, scratch: str) -> None:
    """Copy (never move) what speeds the compile up: dbt's partial-parse file, fetched state."""
    from dbt_defer import state_cache

    parse_file = os.path.join(ctx.target_path, "partial_parse.msgpack")
    if os.path.isfile(parse_file):
        shutil.copy2(parse_file, os.path.join(scratch, "partial_parse.msgpack"))
    cache = os.path.join(ctx.target_path, state_cache.CACHE_DIR)
    if os.path.isdir(cache):
        shutil.copytree(cache, os.path.join(scratch, state_cache.CACHE_DIR))


def _compile_argv(ctx: ProjectContext, args: argparse.Namespace, scratch: str,
                  left_out: Sequence[str] = ()) -> List[str]:
    """dbt compile's arguments: the user's project options and selection, our scratch paths;
    ``left_out``: names of tests that did not compile, excluded too."""
    argv = [
        "compile",
        "--project-dir", ctx.root,
        "--target-path", scratch,
        "--log-path", os.path.join(scratch, "logs"),
        "--log-level", "none",
        "--log-level-file", "none",
        "--no-write-json",
    ]
    for flag, value in (("--profiles-dir", args.profiles_dir), ("--target", args.target)):
        if value:
            argv += [flag, value]
    for flag, values in (("--select", args.select), ("--exclude", [*(args.exclude or []), *left_out])):
        if values:
            argv += [flag, *values]
    for flag, value in (("--selector", args.selector), ("--vars", args.vars), ("--state", args.state),
                        ("--defer-state", args.defer_state)):
        if value:
            argv += [flag, value]
    if args.favor_state:
        argv += ["--favor-state"]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    return argv


MAX_NOT_COMPILED = 10  # tests left out and compiled again without; beyond: the error line


def run_explain(ctx: ProjectContext, args: argparse.Namespace) -> Tuple[Dict[str, Any], Optional[str]]:
    """Compile the selection with deferral on into a scratch target path; return the audit and
    the summary line the deferred compile logged (the same line a deferred run ends with).

    dbt's compile stops at the first node that fails. A data or unit test that raises at compile
    time (e.g. it reads the columns of a model not built in dev yet; dbt build compiles it after
    the model) is a leaf: it is left out and the selection compiled again, so the table keeps
    every other row, and the document's ``not_compiled`` names it ({node, error}). Any other
    failure (a model, the write guard) is the one error line, as before."""
    from dbt.cli.main import dbtRunner

    if not ctx.cfg.configured:
        raise CliError(
            "dbt-defer: no environment is configured, so nothing is deferred; add vars: dbt_defer: "
            "environments to dbt_project.yml or set DBT_DEFER_<NAME>_STATE (see dbt-defer status)",
            2,
        )
    scratch = tempfile.mkdtemp(prefix="dbt-defer-explain-")
    not_compiled: Dict[str, str] = {}  # test unique_id -> its error, left out of the next compile
    try:
        _seed_scratch(ctx, scratch)
        while True:
            events: List[Tuple[str, str, str]] = []
            failed: Dict[str, str] = {}

            def collect(event: Any) -> None:
                info = event.info
                events.append((info.name, str(info.level), info.msg or ""))
                if info.name == "NodeFinished":
                    node_info = getattr(event.data, "node_info", None)
                    if node_info is not None and node_info.node_status == "error":
                        message = getattr(getattr(event.data, "run_result", None), "message", "") or ""
                        failed[node_info.unique_id] = one_line(message, limit=300)

            argv = _compile_argv(ctx, args, scratch, [uid.split(".")[2] for uid in not_compiled])
            # DBT_DEFER_EXPLAIN: this compile writes nothing in the warehouse (no audit table)
            with _env({"DBT_DEFER": "1", "DBT_DEFER_COMPILE_AS": args.as_command, "DBT_DEFER_EXPLAIN": "1"}):
                result = dbtRunner(callbacks=[collect]).invoke(argv)
            leaves = {u: m for u, m in failed.items() if u.startswith(("test.", "unit_test.")) and u not in not_compiled}
            if result.success or not leaves or len(failed) != len(leaves) or len(not_compiled) >= MAX_NOT_COMPILED:
                break
            not_compiled.update(leaves)
        try:
            document, line = _read_outcome(result, events, os.path.join(scratch, AUDIT_FILE))
        except CliError as exc:
            if not_compiled and "matched no node" in str(exc):  # only the tests were selected
                first = next(iter(not_compiled.items()))
                raise CliError(f"dbt-defer: explain: {short_id(first[0], ctx.name)} did not compile ({first[1]})")
            raise
        document["not_compiled"] = [{"node": u, "error": m} for u, m in sorted(not_compiled.items())]
        return document, line
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _read_outcome(result: Any, events: List[Tuple[str, str, str]], audit_path: str
                  ) -> Tuple[Dict[str, Any], Optional[str]]:
    """The compile's audit and summary line, or the CliError saying why there is none."""
    warnings = [m for (_, level, m) in events if level == "warn" and m.startswith("dbt-defer:")]
    for message in dict.fromkeys(warnings):
        warn(one_line(message))
    if not result.success:
        errors = [m for (_, level, m) in events if level == "error" and m.strip()]
        ours = [m for m in errors if "dbt-defer:" in m]
        if result.exception is not None:
            errors.append(str(result.exception))
        if ours:
            text = ours[0]
            raise CliError(one_line(text[text.find("dbt-defer:"):]))
        raise CliError(f"dbt-defer: dbt compile failed: {one_line(errors[0] if errors else '', pick='all')}")
    if any(name in ("NoNodesSelected", "NothingToDo") or "Nothing to do" in msg for (name, _, msg) in events):
        raise CliError("dbt-defer: the selection matched no node; check -s/--select")
    plain = [m for (_, _, m) in events if m.startswith("dbt-defer:") and "nothing to defer to" in m]
    if plain and not os.path.isfile(audit_path):  # the target builds the chain's last environment
        raise CliError(one_line(plain[0]), 0)
    if not os.path.isfile(audit_path):
        raise CliError("dbt-defer: deferral did not run (no audit was written); check dbt-defer status")
    with open(audit_path, encoding="utf-8") as fh:
        document = json.load(fh)
    lines = [m for (_, level, m) in events if level == "info" and _SUMMARY_LINE.match(m)]
    return document, (lines[-1] if lines else None)


_SUMMARY_LINE = re.compile(r"^dbt-defer: \d+ refs? resolved")


def _read(record: Dict[str, Any], project: str) -> str:
    """The ref column: the parent, and what reads it when that is not ref() (function, foreign key, clone)."""
    kind = record.get("kind") or "ref"
    name = short_id(record["ref"], project)
    return name if kind == "ref" else f"{name} ({kind.replace('_', ' ')})"


def cmd_explain(args: argparse.Namespace) -> int:
    from dbt_defer import audit

    ctx = ProjectContext(args)
    document, line = run_explain(ctx, args)
    not_compiled = document.get("not_compiled", [])
    code = 0  # the table stands; a test that did not compile is named on stderr
    if args.output == "json":
        print_json(
            {
                "target": document.get("metadata", {}).get("target"),
                "select": args.select or [],
                "environments": document.get("environments", []),
                "resolutions": document.get("resolutions", []),
                "not_compiled": not_compiled,
                "summary": document.get("summary", {}),
            }
        )
        _say_not_compiled(ctx, not_compiled)
        return code
    records = document.get("resolutions", [])
    if not records:
        print("dbt-defer: the selected nodes contain no ref()")
        return 0
    print_table(
        ["node", "ref", "env", "relation", "reason", "limit"],
        [[short_id(r["node"], ctx.name), _read(r, ctx.name), r["env"], r["relation"], r["reason"],
          r.get("limit")] for r in records],
    )
    crossed = sorted({r["node"] for r in records if r.get("cross_environment")})
    for node in crossed:
        say(f"note: {short_id(node, ctx.name)} compares data across environments")
    changed = sorted({(r["ref"], r["env"]) for r in records if r.get("parent_modified")})
    for ref, env in changed:
        say(f"note: {short_id(ref, ctx.name)} is read from {env}, whose copy differs from yours; select it too")
    say("(ids shortened as dbt's own output does; --output json has them in full)")
    say(line or audit.summary_line(document.get("summary", {}), (r.get("limit") for r in records)))
    _say_not_compiled(ctx, not_compiled)
    return code


def _say_not_compiled(ctx: ProjectContext, not_compiled: List[Dict[str, str]]) -> None:
    """One line per node that did not compile: its refs are missing from the table."""
    for failed in not_compiled:
        say(
            f"dbt-defer: explain: {short_id(failed['node'], ctx.name)} did not compile, so its refs are not in "
            f"the table ({failed['error']}); dbt build compiles it after building its parents, where it may pass",
            sys.stderr,
        )
