"""``dbt-defer fetch``: copy every remote environment's state into the local cache and verify it.

Owns: the fetch table and JSON. May not touch: how a remote is fetched or trusted (``remote``),
how a manifest is loaded and checked (``chain``/``manifests``).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, List

from dbt_defer.cli.common import (
    CliError,
    Formatter,
    ProjectContext,
    add_project_options,
    load_env,
    print_json,
    print_table,
    say,
    warn,
)
from dbt_defer.config import EnvironmentSpec

EPILOG = """\
Copies each remote environment's manifest.json (and run_results.json when present) into
<target path>/dbt_defer_state/<env>/ and verifies it is a dbt manifest of this project that
this dbt can read. That folder then holds the fetched manifest.json: point dbt's --state at it
for state:modified (slim CI), e.g. --state target/dbt_defer_state/prod. A local folder written
by dbt-defer publish (holding latest.json) is read through its pointer, like its file:// form. Unchanged remote files (same ETag, or modification time and size) are not
downloaded again. dbt runs with DBT_DEFER=1 fetch on their own; use this to refresh ahead of
time, or in CI to fail fast. If a remote is unreachable, the cached copy is kept and its age
is shown. URIs: file://, http(s):// (pip install "dbt-defer[http]"),
s3:// ("dbt-defer[s3]"), gs:// ("dbt-defer[gcs]").

examples:
  dbt-defer fetch
  dbt-defer fetch --env prod --force
  DBT_DEFER_PROD_STATE=s3://my-bucket/dbt/prod dbt-defer fetch --output json
"""


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "fetch", help="copy remote (URI) state into the local cache and verify it",
        description="Fetch every remote environment's manifest into <target path>/dbt_defer_state/ and verify it.",
        epilog=EPILOG, formatter_class=Formatter,
    )
    parser.add_argument("--env", action="append", metavar="NAME", help="only this environment (repeatable)")
    parser.add_argument("--force", action="store_true", help="download even when the remote looks unchanged")
    add_project_options(parser)
    parser.set_defaults(func=cmd_fetch)


def _fetch_one(ctx: ProjectContext, spec: EnvironmentSpec, force: bool, row: Dict[str, Any]) -> None:
    """Fetch (a URI) and load one environment into ``row``; CliError with the clear line."""
    from dbt_defer import pointer, remote
    from dbt_defer.manifests import ManifestError

    fetched = remote.fetched_form(spec)  # a URI, or a local folder dbt-defer publish wrote
    if fetched is not None:
        try:
            result = remote.fetch(fetched, ctx.target_path, force=force, warn=warn, project_name=ctx.name)
        except ManifestError as exc:
            raise CliError(spec.redact(str(exc))) from None
        row.update(action=result.action, local=result.local, fetched_at=result.fetched_at,
                   run_results=result.run_results, published=pointer.published_version(result.uri),
                   state_folder=result.stable)
    else:
        folder = spec.state if os.path.isdir(spec.state) else os.path.dirname(spec.state)
        row.update(action="local (nothing to fetch)", local=spec.state, state_folder=folder)
    manifest, _ = load_env(ctx, spec, local=row["local"])
    row.update(generated_at=manifest.generated_at, run_results=manifest.run_results_path is not None, ok=True)


def cmd_fetch(args: argparse.Namespace) -> int:
    ctx = ProjectContext(args)
    for notice in ctx.cfg.notices:
        say(notice, sys.stderr)
    if not ctx.cfg.configured:
        raise CliError(
            "dbt-defer: no environment is configured; add vars: dbt_defer: environments to dbt_project.yml "
            "or set DBT_DEFER_<NAME>_STATE",
            1,
        )
    rows: List[Dict[str, Any]] = []
    problems: List[str] = []
    wanted = set(args.env or [])
    unknown = wanted - {s.name for s in ctx.cfg.environments}
    if unknown:
        raise CliError(f"dbt-defer: no environment named {', '.join(sorted(unknown))} in the chain (see dbt-defer status)", 2)
    for spec in ctx.cfg.environments:
        if wanted and spec.name not in wanted:
            continue
        row: Dict[str, Any] = {
            "name": spec.name,
            "state": spec.redact(spec.state),  # never a URI's credentials or query string
            "action": None,
            "local": None,
            "fetched_at": None,
            "generated_at": None,
            "run_results": None,
            "ok": False,
            "problem": None,
            "published": None,
            "state_folder": None,  # holds the manifest.json in use: what dbt's --state points at
        }
        try:
            _fetch_one(ctx, spec, args.force, row)
        except CliError as exc:
            row["problem"] = str(exc)
            problems.append(str(exc))
        rows.append(row)
    if args.output == "json":
        print_json({"target_path": ctx.target_path, "environments": rows})
    else:
        print_table(
            ["name", "source", "action", "published version", "--state folder", "generated_at", "run_results",
             "verified"],
            [
                [
                    r["name"],
                    ctx.display(r["state"]),
                    r["action"] or "failed",
                    (r["published"] or {}).get("version"),
                    ctx.display(r["state_folder"]) if r["state_folder"] else None,
                    r["generated_at"],
                    None if r["run_results"] is None else ("yes" if r["run_results"] else "no"),
                    "ok" if r["ok"] else "FAILED",
                ]
                for r in rows
            ],
        )
    for problem in problems:
        say(problem, sys.stderr)
    return 1 if problems else 0
