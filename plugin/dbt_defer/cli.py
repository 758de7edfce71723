"""The ``dbt-defer`` command line: status, explain, fetch, publish (SPEC §8).

The CLI sits on top of the package: it imports config, manifests, guard, remote and publish,
and none of them imports it. Configuration is read as a deferred dbt run reads it
(``session.config_for_task``): ``vars: dbt_defer`` from the project's dbt_project.yml,
overlaid by ``--vars``, then the ``DBT_DEFER_*`` environment variables, then
``--defer-state``/``--state`` (or ``DBT_DEFER_STATE``/``DBT_STATE``).

Errors are one line on stderr, no traceback: exit 1 when something is unusable or dbt failed,
exit 2 for bad usage or configuration.
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

from dbt_defer import __version__, limits
from dbt_defer.guard import SHIM
from dbt_defer.config import DeferConfig, DeferConfigError, EnvironmentSpec, load_config, overlay_settings, truthy

AUDIT_FILE = "dbt_defer_audit.json"


class CliError(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# --- reading the project the way a dbt run does -------------------------------------------


class ProjectContext:
    """The project's root, name, target path and the deferral configuration."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.root = _project_root(args.project_dir)
        self.project = _load_project_yml(self.root)
        self.name = str(self.project.get("name") or "")
        self.cli_vars = _parse_vars(args.vars)
        self.settings = overlay_settings(self.project.get("vars"), self.cli_vars)
        self.target_path = self._target_path()
        self.target_name = args.target or os.environ.get("DBT_TARGET") or self._default_target()
        environ = os.environ
        try:
            self.cfg: DeferConfig = load_config(
                self.settings,
                environ,
                self.root,
                defer_state=args.defer_state or environ.get("DBT_DEFER_STATE") or None,
                state=args.state or environ.get("DBT_STATE") or None,
                favor_state=bool(getattr(args, "favor_state", False)) or truthy(environ.get("DBT_FAVOR_STATE")),
            )
        except DeferConfigError as exc:
            raise CliError(str(exc), 2) from None

    def _target_path(self) -> str:
        raw = self.args.target_path or os.environ.get("DBT_TARGET_PATH") or self.project.get("target-path") or "target"
        raw = _render_simple(str(raw), self.cli_vars)
        return os.path.normpath(raw if os.path.isabs(raw) else os.path.join(self.root, raw))

    def _profile(self) -> Dict[str, Any]:
        """The project's profile in profiles.yml (unrendered); {} when unknown or unreadable."""
        profile = self.project.get("profile")
        folder = self.args.profiles_dir or os.environ.get("DBT_PROFILES_DIR")
        if not folder:
            folder = os.getcwd() if os.path.exists("profiles.yml") else os.path.expanduser("~/.dbt")
        try:
            import yaml

            with open(os.path.join(folder, "profiles.yml"), encoding="utf-8") as fh:
                found = (yaml.safe_load(fh) or {}).get(profile, {})
        except Exception:
            return {}
        return found if isinstance(found, dict) else {}

    def profile_targets(self) -> List[str]:
        """The targets (outputs) of the project's profile; [] when unknown."""
        outputs = self._profile().get("outputs")
        return [str(name) for name in outputs] if isinstance(outputs, dict) else []

    def _default_target(self) -> Optional[str]:
        """The profile's default target (only to say which limit applies); None when unknown."""
        target = self._profile().get("target")
        if not isinstance(target, str):
            return None
        return _render_simple(target, self.cli_vars) if "{{" in target else target

    def display(self, state: str) -> str:
        if "://" in state:
            return state
        try:
            rel = os.path.relpath(state, self.root)
        except ValueError:
            return state
        return state if rel.startswith("..") else rel


def _project_root(project_dir: Optional[str]) -> str:
    if project_dir:
        root = project_dir
    elif os.environ.get("DBT_PROJECT_DIR"):
        root = os.environ["DBT_PROJECT_DIR"]
    else:
        here = os.getcwd()
        root = next(
            (p for p in [here, *_parents(here)] if os.path.isfile(os.path.join(p, "dbt_project.yml"))), here
        )
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isfile(os.path.join(root, "dbt_project.yml")):
        raise CliError(
            f"dbt-defer: no dbt_project.yml in {root}; run from your dbt project or pass --project-dir", 2
        )
    return root


def _parents(path: str) -> Iterator[str]:
    while True:
        parent = os.path.dirname(path)
        if parent == path:
            return
        yield parent
        path = parent


def _load_project_yml(root: str) -> Dict[str, Any]:
    import yaml

    path = os.path.join(root, "dbt_project.yml")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CliError(f"dbt-defer: cannot read {path} ({first}); fix the file", 2) from None
    if not isinstance(data, dict):
        raise CliError(f"dbt-defer: {path} is not a dbt project file (expected a mapping)", 2)
    return data


def _parse_vars(raw: Optional[str]) -> Dict[str, Any]:
    if not raw:
        return {}
    import yaml

    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise CliError(f"dbt-defer: --vars is not valid YAML ({str(exc).splitlines()[0]})", 2) from None
    if not isinstance(value, dict):
        raise CliError("dbt-defer: --vars must be a YAML mapping, e.g. '{dbt_defer: {max_age_hours: 24}}'", 2)
    return value


def _render_simple(value: str, cli_vars: Dict[str, Any]) -> str:
    """Render env_var()/var() in a project setting the way dbt renders dbt_project.yml."""
    if "{{" not in value:
        return value
    try:
        from dbt.config.renderer import DbtProjectYamlRenderer

        return str(DbtProjectYamlRenderer(None, cli_vars).render_value(value))
    except Exception:
        return value


# --- output --------------------------------------------------------------------------------


# C0 and C1 control characters (ESC starts a terminal escape sequence), DEL, and the Unicode
# direction overrides that reorder what a terminal shows
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def shown(value: Any) -> str:
    """A value as the CLI prints it in text: every control character escaped (``\\x1b``), so
    nothing from a manifest, a path or a remote can drive the terminal. JSON output escapes
    them by itself."""
    text = str(value)
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1] if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}", text)


def _say(text: Any, file=None) -> None:
    print(shown(text), file=file or sys.stdout)


def _print_table(columns: Sequence[str], rows: List[Sequence[Any]], out=None) -> None:
    import agate

    out = out or sys.stdout
    text_rows = [["-" if v is None or v == "" else shown(v) for v in row] for row in rows]
    table = agate.Table(text_rows, list(columns), [agate.Text()] * len(columns))
    table.print_table(max_rows=None, max_columns=None, max_column_width=120, output=out)


def _print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def _age(hours: Optional[float]) -> Optional[str]:
    from dbt_defer.manifests import format_age

    return None if hours is None else format_age(hours)


def _warn(message: str) -> None:
    _say(message, sys.stderr)


# --- status --------------------------------------------------------------------------------


def _load_env(ctx: ProjectContext, spec: EnvironmentSpec, warn=_warn, local: Optional[str] = None):
    """(loaded manifest, manifest path) for one environment, or raise CliError with the clear line.

    ``local``: the state's local folder when the caller has fetched it already."""
    from dbt_defer import guard
    from dbt_defer.manifests import ManifestError

    try:
        manifest = guard.load_environment(
            spec, ctx.target_path, ctx.name, is_compatible=_is_compatible(), warn=warn, local=local
        )
    except (ManifestError, guard.GuardError) as exc:
        raise CliError(spec.redact(str(exc))) from None
    return manifest, manifest.path


def _is_compatible():
    try:
        from dbt.artifacts.schemas.manifest import WritableManifest
    except Exception:  # pragma: no cover
        return None
    return WritableManifest.is_compatible_version


def cmd_status(args: argparse.Namespace) -> int:
    ctx = ProjectContext(args)
    cfg = ctx.cfg
    envs: List[Dict[str, Any]] = []
    problems: List[str] = []
    for spec in cfg.environments:
        row: Dict[str, Any] = {
            "name": spec.name,
            "state": spec.redact(spec.state),  # never a URI's credentials or query string
            "configured_by": spec.source,
            "manifest": None,
            "generated_at": None,
            "age_hours": None,
            "dbt_version": None,
            "nodes": None,
            "stale": None,
            "usable": False,
            "problem": None,
            "published": None,
        }
        try:
            manifest, path = _load_env(ctx, spec)
        except CliError as exc:
            row["problem"] = str(exc)
            problems.append(str(exc))
        else:
            age = manifest.age_hours()
            row["published"] = _published(ctx, spec)
            row.update(
                manifest=path,
                generated_at=manifest.generated_at,
                age_hours=None if age is None else round(age, 2),
                dbt_version=manifest.dbt_version,
                nodes=manifest.node_count,
                stale=bool(age is not None and age > cfg.max_age_hours),
                usable=True,
            )
        envs.append(row)

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
        _print_json(document)
    elif not envs:
        pass
    else:
        rows = []
        for e in envs:
            stale = None if e["stale"] is None else ("STALE" if e["stale"] else "no")
            rows.append(
                [
                    e["name"],
                    ctx.display(e["state"]),
                    e["configured_by"],
                    e["generated_at"],
                    _age(e["age_hours"]),
                    e["dbt_version"],
                    e["nodes"],
                    stale,
                    _published_text(e["published"]),
                    "ok" if e["usable"] else "UNUSABLE",
                ]
            )
        target = ctx.target_name or "(the profile's default)"
        own, chain = cfg.chain_for_target(ctx.target_name or "")
        if own is None:
            _say(f"dbt-defer chain for project {ctx.name!r}, target {target!r}: the target's own relations "
                 "first, then:")
        elif chain:
            _say(f"dbt-defer chain for project {ctx.name!r}: target {target!r} builds environment "
                 f"{own.name!r}, so its runs defer only to {', '.join(e.name for e in chain)}:")
        else:
            _say(f"dbt-defer chain for project {ctx.name!r}: target {target!r} builds environment "
                 f"{own.name!r}, the last of the chain, so its runs are plain dbt (no deferral):")
        _print_table(
            ["name", "source", "configured by", "generated_at", "age", "dbt version", "nodes", "stale",
             "published (invocation, age)", "usable"],
            rows,
        )
        limit_text = (
            f"{limit} rows" if applies and limit is not None else ("none" if applies else "none")
        )
        _say(
            f"dev relations: {cfg.dev_relations} ({cfg.dev_relations_source}); "
            f"max_age_hours: {cfg.max_age_hours:g}; "
            f"limit for target {ctx.target_name or '(unknown)'}: {limit_text}"
        )
        for name, source in cfg.skipped:
            where = "its state in vars: dbt_defer: environments" if source == "vars" else source
            _say(f"skipped: {name} ({where} is empty, so that environment is not in the chain)")
        _say(
            f"ref shim: installed ({shim})" if shim else
            "ref shim: not installed; add macros/ref.sql containing: " + SHIM
        )
    if not envs:
        print(
            "dbt-defer: no environment is configured; add vars: dbt_defer: environments to dbt_project.yml, "
            "or set DBT_DEFER_<NAME>_STATE (or --defer-state/--state)",
            file=sys.stderr,
        )
        return 1
    if limits_warning:
        print(limits_warning, file=sys.stderr)
    for notice in cfg.notices:
        _say(notice, sys.stderr)
    for problem in problems:
        _say(problem, sys.stderr)
    return 1 if problems else 0


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
    if not spec.is_uri:
        return None
    from dbt_defer import remote
    from dbt_defer.manifests import parse_timestamp

    published = remote.published_version(str((remote.cached_meta(ctx.target_path, spec.name) or {}).get("uri") or ""))
    if published is None:
        return None
    out: Dict[str, Any] = dict(published)
    when = parse_timestamp(published["published_at"])
    if when is not None:
        from datetime import datetime, timezone

        out["age_hours"] = round(max(0.0, (datetime.now(timezone.utc) - when).total_seconds() / 3600.0), 2)
    else:
        out["age_hours"] = None
    return out


def _published_text(published: Optional[Dict[str, Any]]) -> Optional[str]:
    if not published:
        return None
    age = _age(published.get("age_hours"))
    return f"{published.get('invocation_id') or '?'} ({age + ' ago' if age else 'age unknown'})"


# --- explain -------------------------------------------------------------------------------


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


def _first_line(text: str) -> str:
    for line in str(text).strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


_GENERIC = re.compile(
    r"^(Encountered an error:?|(Runtime|Compilation|Database|Parsing|Dependency|Internal) Error)$", re.I
)


def _one_line(text: str) -> str:
    """dbt's multi-line error as one line, without its generic headers."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    kept = [line for line in lines if not _GENERIC.match(line)] or lines
    return " ".join(kept) or "(no message)"


def _seed_scratch(ctx: ProjectContext, scratch: str) -> None:
    """Copy (never move) what speeds the compile up: dbt's partial-parse file, fetched state."""
    from dbt_defer import remote

    parse_file = os.path.join(ctx.target_path, "partial_parse.msgpack")
    if os.path.isfile(parse_file):
        shutil.copy2(parse_file, os.path.join(scratch, "partial_parse.msgpack"))
    cache = os.path.join(ctx.target_path, remote.CACHE_DIR)
    if os.path.isdir(cache):
        shutil.copytree(cache, os.path.join(scratch, remote.CACHE_DIR))


def run_explain(ctx: ProjectContext, args: argparse.Namespace) -> Tuple[Dict[str, Any], Optional[str]]:
    """Compile the selection with deferral on into a scratch target path; return the audit and
    the summary line the deferred compile logged (the same line a deferred run ends with)."""
    from dbt.cli.main import dbtRunner

    if not ctx.cfg.configured:
        raise CliError(
            "dbt-defer: no environment is configured, so nothing is deferred; add vars: dbt_defer: "
            "environments to dbt_project.yml or set DBT_DEFER_<NAME>_STATE (see dbt-defer status)",
            2,
        )
    scratch = tempfile.mkdtemp(prefix="dbt-defer-explain-")
    events: List[Tuple[str, str, str]] = []

    def collect(event: Any) -> None:
        info = event.info
        events.append((info.name, str(info.level), info.msg or ""))

    try:
        _seed_scratch(ctx, scratch)
        argv = [
            "compile",
            "--project-dir", ctx.root,
            "--target-path", scratch,
            "--log-path", os.path.join(scratch, "logs"),
            "--log-level", "none",
            "--log-level-file", "none",
            "--no-write-json",
        ]
        if args.profiles_dir:
            argv += ["--profiles-dir", args.profiles_dir]
        if args.target:
            argv += ["--target", args.target]
        if args.select:
            argv += ["--select", *args.select]
        if args.exclude:
            argv += ["--exclude", *args.exclude]
        if args.selector:
            argv += ["--selector", args.selector]
        if args.vars:
            argv += ["--vars", args.vars]
        if args.state:
            argv += ["--state", args.state]
        if args.defer_state:
            argv += ["--defer-state", args.defer_state]
        if args.favor_state:
            argv += ["--favor-state"]
        if args.threads:
            argv += ["--threads", str(args.threads)]
        # DBT_DEFER_EXPLAIN: this compile writes nothing in the warehouse (no audit table)
        with _env({"DBT_DEFER": "1", "DBT_DEFER_COMPILE_AS": args.as_command, "DBT_DEFER_EXPLAIN": "1"}):
            result = dbtRunner(callbacks=[collect]).invoke(argv)

        warnings = [m for (_, level, m) in events if level == "warn" and m.startswith("dbt-defer:")]
        for message in dict.fromkeys(warnings):
            _warn(_first_line(message))
        if not result.success:
            errors = [m for (_, level, m) in events if level == "error" and m.strip()]
            ours = [m for m in errors if "dbt-defer:" in m]
            if result.exception is not None:
                errors.append(str(result.exception))
            if ours:
                text = ours[0]
                raise CliError(_first_line(text[text.find("dbt-defer:"):]))
            raise CliError(f"dbt-defer: dbt compile failed: {_one_line(errors[0] if errors else '')}")
        if any(name in ("NoNodesSelected", "NothingToDo") or "Nothing to do" in msg for (name, _, msg) in events):
            raise CliError("dbt-defer: the selection matched no node; check -s/--select")
        audit_path = os.path.join(scratch, AUDIT_FILE)
        plain = [m for (_, _, m) in events if m.startswith("dbt-defer:") and "nothing to defer to" in m]
        if plain and not os.path.isfile(audit_path):  # the target builds the chain's last environment
            raise CliError(_first_line(plain[0]), 0)
        if not os.path.isfile(audit_path):
            raise CliError("dbt-defer: deferral did not run (no audit was written); check dbt-defer status")
        with open(audit_path, encoding="utf-8") as fh:
            document = json.load(fh)
        lines = [m for (_, level, m) in events if level == "info" and _SUMMARY_LINE.match(m)]
        return document, (lines[-1] if lines else None)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


_SUMMARY_LINE = re.compile(r"^dbt-defer: \d+ refs? resolved")
_TEST_HASH = re.compile(r"^[0-9a-f]{10}$")


def short_id(unique_id: str, project: Optional[str]) -> str:
    """A unique_id as dbt's own log lines name the node: ``model.shop.customers`` -> ``customers``,
    ``test.shop.not_null_customers_id.5c9bf9911d`` -> ``test not_null_customers_id``; another
    package's node keeps its package (``calendar.calendar_years``)."""
    parts = str(unique_id).split(".")
    if len(parts) < 3:
        return str(unique_id)
    kind, package, rest = parts[0], parts[1], parts[2:]
    if kind == "test" and len(rest) > 1 and _TEST_HASH.match(rest[-1]):
        rest = rest[:-1]
    name = ".".join(rest)
    if package != project:
        name = f"{package}.{name}"
    return name if kind == "model" else f"{kind} {name}"


def cmd_explain(args: argparse.Namespace) -> int:
    from dbt_defer import audit

    ctx = ProjectContext(args)
    document, line = run_explain(ctx, args)
    if args.output == "json":
        _print_json(
            {
                "target": document.get("metadata", {}).get("target"),
                "select": args.select or [],
                "environments": document.get("environments", []),
                "resolutions": document.get("resolutions", []),
                "summary": document.get("summary", {}),
            }
        )
        return 0
    records = document.get("resolutions", [])
    if not records:
        print("dbt-defer: the selected nodes contain no ref()")
        return 0
    _print_table(
        ["node", "ref", "env", "relation", "reason", "limit"],
        [[short_id(r["node"], ctx.name), short_id(r["ref"], ctx.name), r["env"], r["relation"], r["reason"],
          r.get("limit")] for r in records],
    )
    crossed = sorted({r["node"] for r in records if r.get("cross_environment")})
    for node in crossed:
        _say(f"note: {short_id(node, ctx.name)} compares data across environments")
    _say("(ids shortened as dbt's own output does; --output json has them in full)")
    _say(line or audit.summary_line(document.get("summary", {}), (r.get("limit") for r in records)))
    return 0


# --- fetch ---------------------------------------------------------------------------------


def cmd_fetch(args: argparse.Namespace) -> int:
    from dbt_defer import remote

    ctx = ProjectContext(args)
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
        }
        try:
            if spec.is_uri:
                from dbt_defer.manifests import ManifestError

                try:
                    result = remote.fetch(spec, ctx.target_path, force=args.force, warn=_warn,
                                          project_name=ctx.name)
                except ManifestError as exc:
                    raise CliError(spec.redact(str(exc))) from None
                row.update(action=result.action, local=result.local, fetched_at=result.fetched_at,
                           run_results=result.run_results, published=remote.published_version(result.uri))
            else:
                row.update(action="local (nothing to fetch)", local=spec.state)
            manifest, path = _load_env(ctx, spec, local=row["local"])
            row.update(generated_at=manifest.generated_at, run_results=manifest.run_results_path is not None,
                       ok=True)
        except CliError as exc:
            row["problem"] = str(exc)
            problems.append(str(exc))
        rows.append(row)
    if args.output == "json":
        _print_json({"target_path": ctx.target_path, "environments": rows})
    else:
        _print_table(
            ["name", "source", "action", "published version", "cached in", "generated_at", "run_results",
             "verified"],
            [
                [
                    r["name"],
                    ctx.display(r["state"]),
                    r["action"] or "failed",
                    (r["published"] or {}).get("version"),
                    ctx.display(r["local"]) if r["local"] and "://" in r["state"] else None,
                    r["generated_at"],
                    None if r["run_results"] is None else ("yes" if r["run_results"] else "no"),
                    "ok" if r["ok"] else "FAILED",
                ]
                for r in rows
            ],
        )
    for problem in problems:
        _say(problem, sys.stderr)
    return 1 if problems else 0


# --- publish -------------------------------------------------------------------------------

_ENV_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def cmd_publish(args: argparse.Namespace) -> int:
    from dbt_defer import publish as pub
    from dbt_defer import remote

    if args.keep < 1:
        raise CliError(f"dbt-defer: --keep {args.keep}: keep at least 1 version (default {pub.DEFAULT_KEEP})", 2)
    env = args.env.lower() if args.env else None
    if env is not None and not _ENV_NAME.match(env):
        raise CliError(f"dbt-defer: --env {args.env!r} is not an environment name; use e.g. prod or staging", 2)
    ctx = ProjectContext(args)
    try:
        artifacts = pub.check_artifacts(ctx.target_path, ctx.name, is_compatible=_is_compatible())
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
    spec = next((s for s in ctx.cfg.environments if s.name == env), None) if env else None
    if spec is not None and spec.is_uri and remote.pointer_root(spec.state) != args.uri.rstrip("/"):
        _warn(
            f"dbt-defer: note: environment '{env}' of this project reads {pub.shown(spec.state)}, not "
            f"{pub.shown(args.uri)}; readers of '{env}' will not see this version"
        )
    try:
        result = pub.publish(args.uri, artifacts, env=env, keep=args.keep)
    except pub.PublishError as exc:
        raise CliError(str(exc)) from None
    where = pub.shown(args.uri.rstrip("/"))
    if args.output == "json":
        _print_json(
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
        pointer = result.pointer
        failed = pointer.get("failed_nodes") or 0
        what = (
            f"invocation {pointer.get('invocation_id')} ({pointer.get('command') or 'dbt'}, "
            f"{pointer.get('results')} results, {failed} not successful; manifest generated_at "
            f"{pointer.get('generated_at')})"
        )
        if result.already:
            _say(f"dbt-defer: {what} is already the published version {result.version} at {where}; nothing uploaded")
        else:
            _say(f"dbt-defer: published {what} as {pub.shown(result.version_uri)}")
            _say(f"dbt-defer: {where}/{remote.POINTER} now names it: readers with state {where} get this pair")
        if result.prune_problem is None:
            _say(f"dbt-defer: kept {len(result.kept)} version(s) (--keep {args.keep}), removed {len(result.removed)}")
    if result.prune_problem is not None:
        _warn(
            f"dbt-defer: published, but old versions under {where}/{remote.PUBLISHED_VERSIONS}/ were not pruned "
            f"({result.prune_problem}); the next publish tries again"
        )
    return 0


# --- the parser ----------------------------------------------------------------------------

_MAIN_EPILOG = """\
examples:
  dbt-defer status                       # where each environment's manifest comes from, and how old it is
  dbt-defer explain -s customers+        # where every ref of the selection would be read from
  dbt-defer fetch                        # refresh the local copies of remote (s3://, https://, ...) manifests
  dbt-defer publish s3://bucket/dbt/prod --env prod   # after a production run: publish its artifacts

configuration (see the README): vars: dbt_defer: environments in dbt_project.yml, or
DBT_DEFER_<NAME>_STATE environment variables, e.g. DBT_DEFER_PROD_STATE=s3://bucket/dbt/prod
"""

_STATUS_EPILOG = """\
Lists the deferral chain after dev (highest priority first): each environment's state
location, who configured it (vars or an environment variable), the manifest's generated_at,
its age, the dbt version that wrote it, its node count, and whether it is older than
max_age_hours (stale). Remote (URI) states are fetched into the cache first.
Exit 1 when an environment is unusable (missing, not a manifest, another project, a schema
this dbt cannot read) or none is configured.

examples:
  dbt-defer status
  dbt-defer status --project-dir analytics --output json
  DBT_DEFER_PROD_STATE=https://artifacts.example.com/prod/manifest.json dbt-defer status
"""

_EXPLAIN_EPILOG = """\
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

_FETCH_EPILOG = """\
Copies each remote environment's manifest.json (and run_results.json when present) into
<target path>/dbt_defer_state/<env>/ and verifies it is a dbt manifest of this project that
this dbt can read. Unchanged remote files (same ETag, or modification time and size) are not
downloaded again. dbt runs with DBT_DEFER=1 fetch on their own; use this to refresh ahead of
time, or in CI to fail fast. If a remote is unreachable, the cached copy is kept and its age
is shown. URIs: file://, http(s):// (pip install "dbt-defer[http]"),
s3:// ("dbt-defer[s3]"), gs:// ("dbt-defer[gcs]").

examples:
  dbt-defer fetch
  dbt-defer fetch --env prod --force
  DBT_DEFER_PROD_STATE=s3://my-bucket/dbt/prod dbt-defer fetch --output json
"""

_PUBLISH_EPILOG = """\
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


def _common(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("project (as for dbt)")
    group.add_argument("--project-dir", metavar="D", help="the dbt project (default: the nearest folder up holding dbt_project.yml, or DBT_PROJECT_DIR)")
    group.add_argument("--profiles-dir", metavar="P", help="folder holding profiles.yml (default: as dbt: DBT_PROFILES_DIR, the current folder, ~/.dbt)")
    group.add_argument("-t", "--target", metavar="T", help="the profile target (your dev target; default: the profile's default)")
    group.add_argument("--vars", metavar="YAML", help="as dbt's --vars; a dbt_defer key overlays vars: dbt_defer, e.g. '{dbt_defer: {max_age_hours: 24}}'")
    group.add_argument("--target-path", metavar="PATH", help="dbt's target path, where fetched state is cached (default: the project's target-path)")
    group.add_argument("--state", metavar="PATH", help="dbt's --state (the single environment 'prod' when nothing else configures one; default DBT_STATE)")
    group.add_argument("--defer-state", metavar="PATH", help="dbt's --defer-state (like --state, and wins over it; default DBT_DEFER_STATE)")
    parser.add_argument("--output", "-o", choices=("table", "json"), default="table", help="table (default) or json")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30, width=min(100, shutil.get_terminal_size((100, 20)).columns))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dbt-defer",
        description="Inspect and prepare dbt-defer's chain of environments (dev -> staging -> prod).",
        epilog=_MAIN_EPILOG,
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"dbt-defer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{status,explain,fetch,publish}")

    status = sub.add_parser(
        "status", help="the chain as a table: source, age, dbt version, nodes, stale",
        description="Show the deferral chain and check every environment's manifest.",
        epilog=_STATUS_EPILOG, formatter_class=_Formatter,
    )
    _common(status)
    status.set_defaults(func=cmd_status)

    explain = sub.add_parser(
        "explain", help="where each ref() of the selection resolves (env, relation, reason, limit)",
        description="Show where each ref() of the selected nodes would be read from, without building anything.",
        epilog=_EXPLAIN_EPILOG, formatter_class=_Formatter,
    )
    sel = explain.add_argument_group("selection (as for dbt)")
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
    _common(explain)
    explain.set_defaults(func=cmd_explain)

    fetch = sub.add_parser(
        "fetch", help="copy remote (URI) state into the local cache and verify it",
        description="Fetch every remote environment's manifest into <target path>/dbt_defer_state/ and verify it.",
        epilog=_FETCH_EPILOG, formatter_class=_Formatter,
    )
    fetch.add_argument("--env", action="append", metavar="NAME", help="only this environment (repeatable)")
    fetch.add_argument("--force", action="store_true", help="download even when the remote looks unchanged")
    _common(fetch)
    fetch.set_defaults(func=cmd_fetch)

    publish = sub.add_parser(
        "publish", help="after a production/staging run: upload its artifacts as a new version",
        description="Publish this run's manifest.json + run_results.json as one new version under URI.",
        epilog=_PUBLISH_EPILOG, formatter_class=_Formatter,
    )
    publish.add_argument("uri", metavar="URI", help="the folder readers use as the state, e.g. s3://bucket/dbt/prod")
    publish.add_argument("--env", metavar="NAME", help="the environment this run built (recorded in the pointer, shown by status)")
    publish.add_argument("--keep", type=int, default=10, metavar="K", help="version folders to keep (default 10)")
    publish.add_argument("--only-success", action="store_true", help="publish nothing (exit 1) if a node errored, failed or was skipped")
    _common(publish)
    publish.set_defaults(func=cmd_publish)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except CliError as exc:
        _say(exc, sys.stderr)
        return exc.code
    except DeferConfigError as exc:
        _say(exc, sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dbt-defer: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line, no traceback (DBT_DEFER_DEBUG=1 shows it)
        if truthy(os.environ.get("DBT_DEFER_DEBUG")):
            raise
        _say(
            f"dbt-defer: unexpected error: {type(exc).__name__}: {_first_line(str(exc))} "
            "(set DBT_DEFER_DEBUG=1 for the traceback)",
            sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
