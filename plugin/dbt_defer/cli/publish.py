"""``dbt-defer publish URI``: after a production/staging run, publish its artifacts as a new version.

Owns: the command's options, checks of its arguments and its output. May not touch: the
store layout, the upload and the pruning (``dbt_defer.publish``), the published folder's layout (``pointer``).
"""

from __future__ import annotations

import argparse
import re
from typing import Any

from dbt_defer.cli.common import (
    CliError,
    Formatter,
    ProjectContext,
    add_project_options,
    is_compatible,
    print_json,
    say,
    warn,
)

EPILOG = """\
Run by a production or staging job right after its dbt run or build. Checks the run's
manifest.json and run_results.json in the target path (a manifest of this project, run results
of the same dbt invocation), uploads both as a new version folder, then replaces the pointer
URI/latest.json, so readers (a state set to URI, dbt-defer fetch) see the previous pair or
this pair, never a mix. Then removes all but the newest K version folders (never the one the
pointer names). A run with failed nodes is published too (readers then read those nodes from
the next environment) unless --only-success. Store layout:

  URI/latest.json                                     which version is current
  URI/versions/<UTC time>-<invocation id>/manifest.json
  URI/versions/<UTC time>-<invocation id>/run_results.json

Works on every fsspec store that can write: file://, s3:// ("dbt-defer[s3]"), gs://
("dbt-defer[gcs]"); credentials come from the store's usual environment (AWS_*, GOOGLE_*).

examples:
  dbt build --target prod && dbt-defer publish s3://my-bucket/dbt/prod --env prod
  dbt-defer publish gs://my-bucket/dbt/staging --env staging --keep 20
  dbt-defer publish file:///mnt/shared/dbt/prod --only-success --output json
"""


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "publish", help="after a production/staging run: upload its artifacts as a new version",
        description="Publish this run's manifest.json + run_results.json as one new version under URI.",
        epilog=EPILOG, formatter_class=Formatter,
    )
    parser.add_argument("uri", metavar="URI", help="the folder readers use as the state, e.g. s3://bucket/dbt/prod")
    parser.add_argument("--env", metavar="NAME", help="the environment this run built (recorded in the pointer, shown by status)")
    parser.add_argument("--keep", type=int, default=10, metavar="K", help="version folders to keep (default 10)")
    parser.add_argument("--only-success", action="store_true", help="publish nothing (exit 1) if a node errored, failed or was skipped")
    add_project_options(parser)
    parser.set_defaults(func=cmd_publish)


_ENV_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def cmd_publish(args: argparse.Namespace) -> int:
    from dbt_defer import publish as pub
    from dbt_defer import pointer

    if args.keep < 1:
        raise CliError(f"dbt-defer: --keep {args.keep}: keep at least 1 version (default {pub.DEFAULT_KEEP})", 2)
    env = args.env.lower() if args.env else None
    if env is not None and not _ENV_NAME.match(env):
        raise CliError(f"dbt-defer: --env {args.env!r} is not an environment name; use e.g. prod or staging", 2)
    ctx = ProjectContext(args)
    try:
        artifacts = pub.check_artifacts(ctx.target_path, ctx.name, is_compatible=is_compatible())
    except pub.PublishError as exc:
        raise CliError(str(exc)) from None
    if args.only_success and artifacts.failed:
        first = ", ".join(f"{uid} ({status})" for uid, status in list(artifacts.failed.items())[:3])
        more = f" and {len(artifacts.failed) - 3} more" if len(artifacts.failed) > 3 else ""
        raise CliError(
            f"dbt-defer: not published (--only-success): {len(artifacts.failed)} of {artifacts.results} results "
            f"of invocation {artifacts.invocation_id} did not succeed: {first}{more}; readers keep the version "
            "they have"
        )
    ahead = artifacts.manifest.ahead_hours()
    if ahead is not None:
        warn(
            f"dbt-defer: note: {artifacts.manifest_path} is dated in the future (generated_at "
            f"{artifacts.manifest.generated_at}, {ahead:.1f} hours ahead of this machine's clock); readers will "
            "warn about it, and a later run replaces it whatever its date: check this machine's clock"
        )
    spec = next((s for s in ctx.cfg.environments if s.name == env), None) if env else None
    if spec is not None and spec.is_uri and pointer.pointer_root(spec.state) != args.uri.rstrip("/"):
        warn(
            f"dbt-defer: note: environment '{env}' of this project reads {pub.shown(spec.state)}, not "
            f"{pub.shown(args.uri)}; readers of '{env}' will not see this version"
        )
    try:
        result = pub.publish(args.uri, artifacts, env=env, keep=args.keep)
    except pub.PublishError as exc:
        raise CliError(str(exc)) from None
    where = pub.shown(args.uri.rstrip("/"))
    if args.output == "json":
        print_json(
            {
                "uri": where,
                "version": result.version,
                "version_uri": pub.shown(result.version_uri),
                "already_published": result.already,
                "pointer": result.pointer,
                "kept": result.kept,
                "removed": result.removed,
                "prune_problem": result.prune_problem,
            }
        )
    else:
        doc = result.pointer
        failed = doc.get("failed_nodes") or 0
        what = (
            f"invocation {doc.get('invocation_id')} ({doc.get('command') or 'dbt'}, "
            f"{doc.get('results')} results, {failed} not successful; manifest generated_at "
            f"{doc.get('generated_at')})"
        )
        if result.already:
            say(f"dbt-defer: {what} is already the published version {result.version} at {where}; nothing uploaded")
        else:
            say(f"dbt-defer: published {what} as {pub.shown(result.version_uri)}")
            say(f"dbt-defer: {where}/{pointer.POINTER} now names it: readers with state {where} get this pair")
        if result.prune_problem is None:
            say(f"dbt-defer: kept {len(result.kept)} version(s) (--keep {args.keep}), removed {len(result.removed)}")
    if artifacts.redacted and not result.already:
        warn(
            f"dbt-defer: note: {artifacts.redacted} value(s) of run_results.json args (--vars, invocation_command) "
            "held URI credentials, a query string or a fragment: uploaded as ***; dbt's own logs (logs/dbt.log) "
            "still hold --vars, so pass secrets in environment variables rather than --vars"
        )
    if result.prune_problem is not None:
        warn(
            f"dbt-defer: published, but old versions under {where}/{pointer.PUBLISHED_VERSIONS}/ were not pruned "
            f"({result.prune_problem}); the next publish tries again"
        )
    return 0
