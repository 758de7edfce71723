"""``dbt-defer status``: the deferral chain as a table, every environment's manifest checked.

Owns: the status document (text and JSON), the ref-shim check, the publish pointer a remote
state was read through. May not touch: fetching or loading rules (``chain``/``remote``), the
project reading (``common``).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any, Dict, List, Optional

from dbt_defer import limits
from dbt_defer.cli.common import (
    CliError,
    Formatter,
    ProjectContext,
    add_project_options,
    age_text,
    load_env,
    print_json,
    print_table,
    say,
)
from dbt_defer.config import EnvironmentSpec
from dbt_defer.guard import SHIM

EPILOG = """\
Lists the deferral chain after dev (highest priority first): each environment's state
location, who configured it (vars or an environment variable), the manifest's generated_at,
its age, the dbt version that wrote it, its node count, whether a run_results.json lies beside
it (without one, nodes that failed there are not skipped and no build time is known), and
whether it is older than max_age_hours (stale). Remote (URI) states are fetched into the cache first.
Exit 1 when an environment is unusable (missing, not a manifest, another project, a schema
this dbt cannot read) or none is configured.

examples:
  dbt-defer status
  dbt-defer status --project-dir analytics --output json
  DBT_DEFER_PROD_STATE=https://artifacts.example.com/prod/manifest.json dbt-defer status
"""


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "status", help="the chain as a table: source, age, dbt version, nodes, stale",
        description="Show the deferral chain and check every environment's manifest.",
        epilog=EPILOG, formatter_class=Formatter,
    )
    add_project_options(parser)
    parser.set_defaults(func=cmd_status)


def _environment_row(ctx: ProjectContext, spec: EnvironmentSpec, problems: List[str]) -> Dict[str, Any]:
    row: Dict[str, Any] = {
        "name": spec.name,
        "state": spec.redact(spec.state),  # never a URI's credentials or query string
        "configured_by": spec.source,
        "manifest": None,
        "generated_at": None,
        "age_hours": None,
        "dbt_version": None,
        "nodes": None,
        "run_results": None,  # a run_results.json beside the manifest (without one, failed nodes there are not known)
        "stale": None,
        "usable": False,
        "problem": None,
        "published": None,
    }
    try:
        manifest, path = load_env(ctx, spec)
    except CliError as exc:
        row["problem"] = str(exc)
        problems.append(str(exc))
        return row
    age = manifest.age_hours()
    row["published"] = _published(ctx, spec)
    row.update(
        manifest=path,
        generated_at=manifest.generated_at,
        age_hours=None if age is None else round(age, 2),
        dbt_version=manifest.dbt_version,
        nodes=manifest.node_count,
        run_results=manifest.run_results_path is not None,
        # dated in the future (beyond clock skew): its age cannot be judged, so not fresh either
        stale=bool(age is not None and age > ctx.cfg.max_age_hours) or manifest.ahead_hours() is not None,
        usable=True,
    )
    return row


def cmd_status(args: argparse.Namespace) -> int:
    ctx = ProjectContext(args)
    cfg = ctx.cfg
    problems: List[str] = []
    envs = [_environment_row(ctx, spec, problems) for spec in cfg.environments]

    applies, limit = cfg.limit_for_target(ctx.target_name or "")
    shim = shim_file(ctx)
    targets = ctx.profile_targets()
    unknown = limits.unknown_targets(cfg.limits, targets) if targets else []
    limits_warning = (
        limits.unknown_targets_warning(unknown, str(ctx.project.get("profile")), targets) if unknown else None
    )
    document = {
        "project": ctx.name,
        "project_dir": ctx.root,
        "target": ctx.target_name,
        "target_path": ctx.target_path,
        "max_age_hours": cfg.max_age_hours,
        "dev_relations": cfg.dev_relations,
        "dev_relations_source": cfg.dev_relations_source,
        "limit": limit if applies else None,
        "unknown_limit_targets": unknown,
        "ref_shim": shim,
        "skipped": [{"name": name, "configured_by": source} for name, source in cfg.skipped],
        "notices": list(cfg.notices),
        "environments": envs,
        "usable": not problems and bool(envs),
    }
    if args.output == "json":
        print_json(document)
    elif envs:
        _print_text(ctx, envs, applies, limit, shim)
    for notice in cfg.notices:
        say(notice, sys.stderr)
    if not envs:
        print(
            "dbt-defer: no environment is configured; add vars: dbt_defer: environments to dbt_project.yml, "
            "or set DBT_DEFER_<NAME>_STATE (or --defer-state/--state)",
            file=sys.stderr,
        )
        return 1
    if limits_warning:
        print(limits_warning, file=sys.stderr)
    for problem in problems:
        say(problem, sys.stderr)
    return 1 if problems else 0


def _print_text(ctx: ProjectContext, envs: List[Dict[str, Any]], applies: bool, limit: Optional[int],
                shim: Optional[str]) -> None:
    cfg = ctx.cfg
    rows = []
    for e in envs:
        stale = None if e["stale"] is None else ("STALE" if e["stale"] else "no")
        rows.append(
            [
                e["name"],
                ctx.display(e["state"]),
                e["configured_by"],
                e["generated_at"],
                age_text(e["age_hours"]),
                e["dbt_version"],
                e["nodes"],
                None if e["run_results"] is None else ("yes" if e["run_results"] else "no"),
                stale,
                _published_text(e["published"]),
                "ok" if e["usable"] else "UNUSABLE",
            ]
        )
    target = ctx.target_name or "(the profile's default)"
    own, chain = cfg.chain_for_target(ctx.target_name or "")
    if own is None:
        say(f"dbt-defer chain for project {ctx.name!r}, target {target!r}: the target's own relations "
            "first, then:")
    elif chain:
        say(f"dbt-defer chain for project {ctx.name!r}: target {target!r} builds environment "
            f"{own.name!r}, so its runs defer only to {', '.join(e.name for e in chain)}:")
    else:
        say(f"dbt-defer chain for project {ctx.name!r}: target {target!r} builds environment "
            f"{own.name!r}, the last of the chain, so its runs are plain dbt (no deferral):")
    print_table(
        ["name", "source", "configured by", "generated_at", "age", "dbt version", "nodes", "run_results", "stale",
         "published (invocation, age)", "usable"],
        rows,
    )
    limit_text = f"{limit} rows" if applies and limit is not None else "none"
    say(
        f"dev relations: {cfg.dev_relations} ({cfg.dev_relations_source}); "
        f"max_age_hours: {cfg.max_age_hours:g}; "
        f"limit for target {ctx.target_name or '(unknown)'}: {limit_text}"
    )
    for name, source in cfg.skipped:
        where = "its state in vars: dbt_defer: environments" if source == "vars" else source
        say(f"skipped: {name} ({where} is empty, so that environment is not in the chain)")
    say(
        f"ref shim: installed ({shim})" if shim else
        "ref shim: not installed; add macros/ref.sql containing: " + SHIM
    )


_REF_MACRO = re.compile(r"\{%-?\s*macro\s+ref\s*\(")


def shim_file(ctx: ProjectContext) -> Optional[str]:
    """The root project's file overriding ``ref`` through dbt_defer.ref (relative path), or None."""
    paths = ctx.project.get("macro-paths") or ["macros"]
    for folder in paths if isinstance(paths, list) else ["macros"]:
        top = os.path.join(ctx.root, str(folder))
        for here, dirs, files in os.walk(top):
            dirs.sort()
            for name in sorted(files):
                if not name.endswith(".sql"):
                    continue
                path = os.path.join(here, name)
                try:
                    with open(path, encoding="utf-8", errors="replace") as fh:
                        text = fh.read(1_000_000)
                except OSError:
                    continue
                if _REF_MACRO.search(text) and "dbt_defer.ref" in text:
                    return os.path.relpath(path, ctx.root)
    return None


def _published(ctx: ProjectContext, spec: EnvironmentSpec) -> Optional[Dict[str, Any]]:
    """The publish pointer a URI environment's state was read through (dbt-defer publish), if any."""
    from datetime import datetime, timezone

    from dbt_defer import pointer, remote, state_cache

    if remote.fetched_form(spec) is None:
        return None
    from dbt_defer.manifests import parse_timestamp

    published = pointer.published_version(str((state_cache.cached_meta(ctx.target_path, spec.name) or {}).get("uri") or ""))
    if published is None:
        return None
    out: Dict[str, Any] = dict(published)
    when = parse_timestamp(published["published_at"])
    if when is not None:
        out["age_hours"] = round(max(0.0, (datetime.now(timezone.utc) - when).total_seconds() / 3600.0), 2)
    else:
        out["age_hours"] = None
    return out


def _published_text(published: Optional[Dict[str, Any]]) -> Optional[str]:
    if not published:
        return None
    age = age_text(published.get("age_hours"))
    return f"{published.get('invocation_id') or '?'} ({age + ' ago' if age else 'age unknown'})"
