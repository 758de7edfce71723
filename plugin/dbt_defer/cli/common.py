"""What every ``dbt-defer`` command shares: the project as dbt finds it, output, errors.

Owns: ``ProjectContext`` (project root, dbt_project.yml, --vars, target path, profile target
and the deferral configuration, read the way a deferred dbt run reads them), the project
options every command takes, text/JSON output (every control character escaped), one-line
errors (``CliError``) and node ids as dbt's log lines show them (``short_id``).

May not touch: a command's own logic (status, explain, fetch, publish live in their modules).
Where dbt offers the piece, it is dbt's: the project folder (``default_project_dir``), the
profiles folder (``default_profiles_dir``), profiles.yml (``read_profile``, unrendered, so a
profile with ``env_var()`` secrets is never needed), its YAML loader for dbt_project.yml and
--vars, and its renderers for ``target-path`` and the profile's ``target``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from typing import Any, Dict, List, Optional, Sequence

from dbt_defer.config import DeferConfig, DeferConfigError, EnvironmentSpec, one_line, truthy
from dbt_defer.settings import load_config, overlay_settings, vars_key_notice

AUDIT_FILE = "dbt_defer_audit.json"


class CliError(Exception):
    """One line on stderr and the exit code: 1 when something is unusable, 2 for bad usage."""

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
                vars_notice=vars_key_notice(self.project.get("vars"), self.cli_vars),
            )
        except DeferConfigError as exc:
            raise CliError(str(exc), 2) from None

    def _target_path(self) -> str:
        raw = self.args.target_path or os.environ.get("DBT_TARGET_PATH") or self.project.get("target-path") or "target"
        raw = _render(str(raw), self.cli_vars, profile=False)
        return os.path.normpath(raw if os.path.isabs(raw) else os.path.join(self.root, raw))

    def _profile(self) -> Dict[str, Any]:
        """The project's profile in profiles.yml (unrendered); {} when unknown or unreadable."""
        from dbt.cli.resolvers import default_profiles_dir
        from dbt.config.profile import read_profile

        folder = self.args.profiles_dir or os.environ.get("DBT_PROFILES_DIR") or str(default_profiles_dir())
        try:
            found = (read_profile(folder) or {}).get(self.project.get("profile"), {})
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
        return _render(target, self.cli_vars, profile=True)

    def display(self, state: str) -> str:
        if "://" in state:
            return state
        try:
            rel = os.path.relpath(state, self.root)
        except ValueError:
            return state
        return state if rel.startswith("..") else rel


def _project_root(project_dir: Optional[str]) -> str:
    from dbt.cli.resolvers import default_project_dir

    root = project_dir or os.environ.get("DBT_PROJECT_DIR") or str(default_project_dir())
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isfile(os.path.join(root, "dbt_project.yml")):
        raise CliError(
            f"dbt-defer: no dbt_project.yml in {root}; run from your dbt project or pass --project-dir", 2
        )
    return root


def _load_project_yml(root: str) -> Dict[str, Any]:
    import yaml
    from dbt.clients.yaml_helper import safe_load

    path = os.path.join(root, "dbt_project.yml")
    try:
        with open(path, encoding="utf-8") as fh:
            data = safe_load(fh.read())
    except (OSError, yaml.YAMLError) as exc:
        raise CliError(f"dbt-defer: cannot read {path} ({one_line(exc)}); fix the file", 2) from None
    if not isinstance(data, dict):
        raise CliError(f"dbt-defer: {path} is not a dbt project file (expected a mapping)", 2)
    return data


def _parse_vars(raw: Optional[str]) -> Dict[str, Any]:
    """--vars with dbt's YAML loader (dbt's own ``parse_cli_vars`` would also log an event line)."""
    if not raw:
        return {}
    import yaml
    from dbt.clients.yaml_helper import safe_load

    try:
        value = safe_load(raw)
    except yaml.YAMLError as exc:
        raise CliError(f"dbt-defer: --vars is not valid YAML ({str(exc).splitlines()[0]})", 2) from None
    if not isinstance(value, dict):
        raise CliError("dbt-defer: --vars must be a YAML mapping, e.g. '{dbt_defer: {max_age_hours: 24}}'", 2)
    return value


def _invocation_context() -> None:
    """dbt's ``env_var()`` reads the environment held by the invocation context, which dbt
    sets (a copy of os.environ) when a command starts; the CLI is not a dbt command, so it
    sets a fresh one before rendering (dbt sets its own again at its next command)."""
    try:
        from dbt_common.context import set_invocation_context
    except ImportError:  # pragma: no cover - older dbt-common: env_var reads os.environ itself
        return
    set_invocation_context(os.environ)


def _render(value: str, cli_vars: Dict[str, Any], profile: bool) -> str:
    """env_var()/var() in a project setting (or the profile's target) rendered by dbt's renderer."""
    if "{{" not in value:
        return value
    try:
        _invocation_context()
        if profile:
            from dbt.config.renderer import ProfileRenderer

            return str(ProfileRenderer(cli_vars).render_value(value))
        from dbt.config.renderer import DbtProjectYamlRenderer

        return str(DbtProjectYamlRenderer(None, cli_vars).render_value(value))
    except Exception:
        return value


def add_project_options(parser: argparse.ArgumentParser) -> None:
    """The options every command takes, named and defaulted as dbt's."""
    group = parser.add_argument_group("project (as for dbt)")
    group.add_argument("--project-dir", metavar="D", help="the dbt project (default: the nearest folder up holding dbt_project.yml, or DBT_PROJECT_DIR)")
    group.add_argument("--profiles-dir", metavar="P", help="folder holding profiles.yml (default: as dbt: DBT_PROFILES_DIR, the current folder, ~/.dbt)")
    group.add_argument("-t", "--target", metavar="T", help="the profile target (your dev target; default: the profile's default)")
    group.add_argument("--vars", metavar="YAML", help="as dbt's --vars; a dbt_defer key overlays vars: dbt_defer, e.g. '{dbt_defer: {max_age_hours: 24}}'")
    group.add_argument("--target-path", metavar="PATH", help="dbt's target path, where fetched state is cached (default: the project's target-path)")
    group.add_argument("--state", metavar="PATH", help="dbt's --state (the single environment 'prod' when nothing else configures one; default DBT_STATE)")
    group.add_argument("--defer-state", metavar="PATH", help="dbt's --defer-state (like --state, and wins over it; default DBT_DEFER_STATE)")
    parser.add_argument("--output", "-o", choices=("table", "json"), default="table", help="table (default) or json")


class Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30, width=min(100, shutil.get_terminal_size((100, 20)).columns))


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


def say(text: Any, file=None) -> None:
    print(shown(text), file=file or sys.stdout)


def warn(message: str) -> None:
    say(message, sys.stderr)


def print_table(columns: Sequence[str], rows: List[Sequence[Any]], out=None) -> None:
    import agate

    out = out or sys.stdout
    text_rows = [["-" if v is None or v == "" else shown(v) for v in row] for row in rows]
    table = agate.Table(text_rows, list(columns), [agate.Text()] * len(columns))
    table.print_table(max_rows=None, max_columns=None, max_column_width=120, output=out)


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def age_text(hours: Optional[float]) -> Optional[str]:
    from dbt_defer.manifests import format_age

    return None if hours is None else format_age(hours)


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


# --- the chain's environments, as the commands read them -------------------------------------


def is_compatible():
    """dbt's own test of a manifest's schema version (None when this dbt has none)."""
    try:
        from dbt.artifacts.schemas.manifest import WritableManifest
    except Exception:  # pragma: no cover
        return None
    return WritableManifest.is_compatible_version


def load_env(ctx: ProjectContext, spec: EnvironmentSpec, warn=warn, local: Optional[str] = None):
    """(loaded manifest, manifest path) for one environment, or raise CliError with the clear line.

    ``local``: the state's local folder when the caller has fetched it already."""
    from dbt_defer import chain
    from dbt_defer.manifests import ManifestError

    try:
        manifest = chain.load_environment(
            spec, ctx.target_path, ctx.name, is_compatible=is_compatible(), warn=warn, local=local
        )
    except (ManifestError, chain.ChainError) as exc:
        raise CliError(spec.redact(str(exc))) from None
    return manifest, manifest.path

