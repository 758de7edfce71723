"""Configuration: project vars + environment variables + dbt's own flags -> one frozen object.

This module is the bottom of the package: it imports nothing of ours and nothing of dbt,
so it can be unit-tested with plain dicts. It also holds the package's one error-to-line
helper (``one_line``) and reads a node's ``meta: dbt_defer`` settings (``node_meta``).

Sources, later wins (SPEC §3):
1. ``vars: dbt_defer: {...}`` in dbt_project.yml (and ``--vars``);
2. environment variables ``DBT_DEFER_<NAME>_STATE``, ``DBT_DEFER_DEV_RELATIONS``;
3. dbt's ``--defer-state`` / ``--state`` as the single environment ``prod`` when nothing
   above configures one.
"""

from __future__ import annotations

import os
import re
from urllib.parse import unquote
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Tuple

DEV = "dev"
DEV_POLICIES = ("always", "modified", "never")
DEFAULT_MAX_AGE_HOURS = 72.0
MAX_LIMIT = 2**31 - 1  # rows: what every warehouse's LIMIT accepts (and the audit table's integer column)
DEFAULT_MAX_STATE_MB = 512  # SPEC §7
MAX_STATE_MB_VAR = "DBT_DEFER_MAX_STATE_MB"
_MAX_STATE_MB_CEILING = 1024 * 1024  # 1 TiB: beyond any manifest; keeps the number a sane int
_ENV_STATE = re.compile(r"^DBT_DEFER_(?P<name>[A-Za-z0-9_]+?)_STATE$")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_TRUE = {"1", "true", "t", "yes", "y", "on"}
_KNOWN_KEYS = {
    "environments",
    "dev_relations",
    "limits",
    "limit_tests",
    "never_defer",
    "max_age_hours",
    "audit_table",
}
_ENVIRONMENT_KEYS = ("name", "state", "target")  # the keys of one vars: dbt_defer: environments item


class DeferConfigError(ValueError):
    """A bad configuration value; the message is one line naming the thing, the place, the fix."""


@dataclass(frozen=True)
class EnvironmentSpec:
    name: str
    state: str  # absolute local path or a URI
    source: str  # where it was configured: "vars", "DBT_DEFER_PROD_STATE", "--defer-state", ...
    target: str = ""  # the dbt target that builds this environment (default: its own name)

    @property
    def is_uri(self) -> bool:
        return is_uri(self.state)

    def redact(self, text: str) -> str:
        """``text`` as it may be shown: no credentials or query string of any URI in it, and none
        of this environment's own secret parts (also where a message quotes them without the URI)."""
        return redact(text, secrets=uri_secrets(self.state))

    @property
    def builds_with(self) -> str:
        return self.target or self.name

    @property
    def native(self) -> bool:
        """Configured only by dbt's own --state/--defer-state (SPEC §2 native mode)."""
        return self.source.startswith("--")


@dataclass(frozen=True)
class DeferConfig:
    environments: Tuple[EnvironmentSpec, ...] = ()
    dev_relations: str = "always"
    dev_relations_source: str = "default"
    limits: Tuple[Tuple[str, Optional[int]], ...] = ()
    limit_tests: bool = False
    never_defer: Tuple[str, ...] = ()
    max_age_hours: float = DEFAULT_MAX_AGE_HOURS
    audit_table: bool = False
    # how compile/show/docs treat selected nodes: "compile" (from dev if built there, else the
    # chain, like dbt's --defer) or "build" (always dev, as the build would; write guard on)
    compile_as: str = "compile"
    # set by `dbt-defer explain` (DBT_DEFER_EXPLAIN=1) for its in-process dbt compile: the
    # invocation writes nothing in the warehouse (no audit table)
    explain: bool = False
    max_state_bytes: int = DEFAULT_MAX_STATE_MB * 1024 * 1024  # DBT_DEFER_MAX_STATE_MB
    # configured with an empty state, so not in the chain (SPEC §3): (name, where it was set)
    skipped: Tuple[Tuple[str, str], ...] = ()
    # warnings about the configuration itself (a DBT_DEFER_<NAME>_STATE that looks misspelled)
    notices: Tuple[str, ...] = ()

    @property
    def configured(self) -> bool:
        return bool(self.environments)

    @property
    def native(self) -> bool:
        """SPEC §2: the chain comes only from dbt's --state/--defer-state; every outcome is dbt's."""
        return bool(self.environments) and all(e.native for e in self.environments)

    def chain_for_target(self, target_name: str) -> Tuple[Optional[EnvironmentSpec], Tuple[EnvironmentSpec, ...]]:
        """(the environment the running target builds or None, the chain of this run).

        SPEC §3: when the running target builds an environment, the run defers only to the
        environments after it (a staging job defers to prod; a prod job to nothing).
        """
        if not self.native:
            for i, env in enumerate(self.environments):
                if env.builds_with == target_name:
                    return env, self.environments[i + 1 :]
        return None, self.environments

    def limit_for_target(self, target_name: str) -> Tuple[bool, Optional[int]]:
        """(True, N) when the running target is a key of ``limits``; (False, None) otherwise."""
        for name, value in self.limits:
            if name == target_name:
                return True, value
        return False, None


def is_uri(state: str) -> bool:
    return "://" in state


# --- secrets in state URIs (SPEC §7): rendered as *** wherever a state is shown ----------------

REDACTED = "***"
# the user[:password]@ of a URI's authority (no '/', '?', '#' or space before the '@')
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)[^/\s?#'\"<>@]*@")
# a URI's query string, up to a space, a quote, a bracket or an fsspec chain separator (::)
_QUERY = re.compile(r"(?P<uri>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s?'\"<>]*?)\?(?:[^\s'\"<>)\]:]|:(?!:))*")
_MIN_SECRET = 4  # shorter literal values are not replaced everywhere (they would mangle the text)


def uri_secrets(state: str) -> Tuple[str, ...]:
    """The secret parts of a state URI: each segment's user:password and its query string (and the
    values in it), as written and percent-decoded. Nothing for a local path."""
    found = set()
    if not is_uri(state):
        return ()
    for segment in state.split("::"):
        scheme, sep, rest = segment.partition("://")
        if not sep:
            continue
        location, q, query = rest.partition("?")
        if q and query:
            found.add(query)
            for pair in query.split("&"):
                found.add(pair.partition("=")[2])
        if "@" in location:
            userinfo = location.rsplit("@", 1)[0]
            user, colon, password = userinfo.partition(":")
            # user:pass@host, also with a '/' in the password (an S3 secret key); not host/path@x
            # nor host:port/path@x
            if "/" not in userinfo or (colon and "/" not in user and not password.split("/")[0].isdigit()):
                found.update((userinfo + "@", password, *password.split("/")))
    out = set()
    for value in found:
        for form in (value, unquote(value)):
            if len(form) >= _MIN_SECRET:
                out.add(form)
    return tuple(sorted(out, key=len, reverse=True))  # longest first: no partial replacements


def redact(text: str, secrets: Sequence[str] = ()) -> str:
    """``text`` without the credentials and query strings of the URIs in it (``***`` instead),
    nor any of ``secrets`` (literal strings, e.g. ``uri_secrets(state)``). One line stays one line."""
    text = str(text)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED + ("@" if secret.endswith("@") else ""))
    text = _USERINFO.sub(lambda m: m.group("scheme") + REDACTED + "@", text)
    return _QUERY.sub(lambda m: m.group("uri") + "?" + REDACTED, text)


_ERROR_HEADER = re.compile(
    r"^((Database|Runtime|Compilation|Internal|Parsing|Dependency|Dbt\w*) ?Error( in .*)?|Encountered an error):?$",
    re.I,
)


def one_line(error: Any, *, pick: str = "first", limit: Optional[int] = None) -> str:
    """The one error-to-line helper: an exception (or its text) as one line for messages, the
    audit and warnings.

    Blank lines and dbt's generic headers ("Runtime Error", "Database Error in model x",
    "Encountered an error") are dropped, unless nothing else is left; dbt-defer's own line wins
    when there is one (from "dbt-defer:" on). Then ``pick``: the "first" meaningful line, the
    "last" (dbt's selector errors end with the cause), or "all" of them joined by spaces.
    Whitespace runs become one space; ``limit``: at most that many characters. Nothing left:
    the exception's type name.
    """
    lines = [" ".join(line.split()) for line in str(error).splitlines() if line.strip()]
    ours = [line[line.find("dbt-defer:"):] for line in lines if "dbt-defer:" in line]
    kept = ours[:1] or [line for line in lines if not _ERROR_HEADER.match(line)] or lines
    if not kept:
        return type(error).__name__ if isinstance(error, BaseException) else "(no message)"
    text = " ".join(kept) if pick == "all" else kept[-1] if pick == "last" else kept[0]
    return text[:limit] if limit else text


def truthy(value: Optional[str]) -> bool:
    """dbt's reading of boolean env vars such as DBT_DEFER / DBT_FAVOR_STATE."""
    return value is not None and value.strip().lower() in _TRUE


def _where(key: str) -> str:
    return f"vars: dbt_defer: {key} (dbt_project.yml or --vars)"


def _resolve_state(raw: str, project_root: str) -> str:
    raw = raw.strip()
    if is_uri(raw):
        return raw
    path = os.path.expanduser(raw)
    if not os.path.isabs(path):
        path = os.path.join(project_root, path)
    return os.path.normpath(path)


def _check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name.lower()):
        raise DeferConfigError(
            f"dbt-defer: environment name {name!r} in {where} is not valid; "
            "use a lower-case word such as 'staging' or 'prod'"
        )
    name = name.lower()
    if name == DEV:
        raise DeferConfigError(
            f"dbt-defer: environment name 'dev' in {where} is reserved for the current target; "
            "rename that environment"
        )
    return name


def _environments_from_vars(raw: Any, project_root: str) -> list:
    if raw is None:
        return []
    where = _where("environments")
    if not isinstance(raw, (list, tuple)):
        raise DeferConfigError(
            f"dbt-defer: {where} must be a list of {{name, state}} mappings, got {type(raw).__name__}"
        )
    envs = []
    seen = set()
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping):
            raise DeferConfigError(
                f"dbt-defer: item {i} of {where} must be a mapping with 'name' and 'state', got {item!r}"
            )
        # a typo'd key (sate:) would otherwise drop the environment silently
        unknown = sorted(repr(k) for k in item if not (isinstance(k, str) and k in _ENVIRONMENT_KEYS))
        if unknown:
            raise DeferConfigError(
                f"dbt-defer: unknown key(s) {', '.join(unknown)} in item {i} ({_item_name(item)}) "
                f"of {where}; accepted keys are {', '.join(_ENVIRONMENT_KEYS)}"
            )
        if "name" not in item:
            raise DeferConfigError(
                f"dbt-defer: item {i} of {where} must be a mapping with 'name' and 'state', got {item!r}"
            )
        name = _check_name(item["name"], where)
        target = item.get("target")
        if target is not None and not isinstance(target, str):  # empty: the default (its name)
            raise DeferConfigError(
                f"dbt-defer: target of environment {name!r} in {where} must be the name of the dbt "
                f"target that builds it (e.g. target: production), got {target!r}"
            )
        if name in seen:
            raise DeferConfigError(f"dbt-defer: environment {name!r} is listed twice in {where}; keep one")
        seen.add(name)
        state = item.get("state")
        if state is not None and not isinstance(state, str):
            raise DeferConfigError(
                f"dbt-defer: state of environment {name!r} in {where} must be a path or URI string, got {state!r}"
            )
        envs.append([name, state or "", "vars", (target or "").strip()])
    return envs


def _item_name(item: Mapping[str, Any]) -> str:
    name = item.get("name")
    return f"name {name!r}" if isinstance(name, str) else "no usable name"


def _looks_like_state_var(key: str) -> bool:
    """DBT_DEFER_<something>_STATE in any spelling (dbt's own DBT_DEFER_STATE excluded)."""
    upper = key.upper()
    return upper.startswith("DBT_DEFER_") and upper.endswith("_STATE") and len(upper) > len("DBT_DEFER__STATE")


def _env_var_states(environ: Mapping[str, str]) -> dict:
    found = {}
    for key, value in sorted(environ.items()):
        m = _ENV_STATE.match(key)
        if not m and _looks_like_state_var(key):
            # an environment the user meant to add must not vanish silently (PRÖD, PROD-EU, ...)
            raise DeferConfigError(
                f"dbt-defer: environment variable {key!r} is not a valid DBT_DEFER_<NAME>_STATE: "
                "environment names are lower-case [a-z][a-z0-9_]* (in the variable: upper-case "
                "letters, digits, underscores), e.g. DBT_DEFER_PROD_EU_STATE; rename or unset it"
            )
        if m:
            name = _check_name(m.group("name").lower(), f"environment variable {key}")
            if name in found and found[name][1] != value:
                raise DeferConfigError(
                    f"dbt-defer: environment variables {found[name][0]} and {key} both set the state of "
                    f"environment {name!r}, to different values; keep one"
                )
            found[name] = (key, value)
    return found


WELL_KNOWN_NAMES = ("prod", "production", "staging", "stage", "qa", "uat", "preprod", "ci", "test")


def _distance(a: str, b: str) -> int:
    """Edit distance (insert, delete, substitute, swap two neighbours), small strings only."""
    previous2: list = []
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        row = [i]
        for j, cb in enumerate(b, 1):
            cost = min(previous[j] + 1, row[j - 1] + 1, previous[j - 1] + (ca != cb))
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                cost = min(cost, previous2[j - 2] + 1)
            row.append(cost)
        previous2, previous = previous, row
    return previous[-1]


def _unknown_name_notice(name: str, key: str, configured: list, others: list) -> Optional[str]:
    """A warning for a DBT_DEFER_<NAME>_STATE that adds an environment the vars do not list
    (always when vars list environments), or whose name is a near-miss of a configured or
    well-known one (``others``: the names other DBT_DEFER_<NAME>_STATE variables set)."""
    if not configured and name in WELL_KNOWN_NAMES:
        return None
    known = sorted(set(configured) | set(others) | set(WELL_KNOWN_NAMES))
    near = min(known, key=lambda k: (_distance(name, k), k))
    close = _distance(name, near) <= (1 if len(name) <= 3 else 2)
    guess = f"; did you mean DBT_DEFER_{near.upper()}_STATE?" if close else "."
    if configured:
        return (
            f"dbt-defer: {key} adds environment {name!r}, which vars: dbt_defer: environments does not "
            f"list ({', '.join(configured)}){guess} If it is meant, list it in environments to fix "
            "its place in the chain; otherwise unset it"
        )
    if close:
        return (
            f"dbt-defer: {key} adds environment {name!r}{guess} Unset it and set that variable if "
            "it is a typo"
        )
    return None


def _dev_policy(settings: Mapping[str, Any], environ: Mapping[str, str], favor_state: bool) -> Tuple[str, str]:
    if favor_state:
        return "never", "--favor-state"
    value, source = settings.get("dev_relations"), _where("dev_relations")
    env_value = environ.get("DBT_DEFER_DEV_RELATIONS")
    if env_value:
        value, source = env_value, "DBT_DEFER_DEV_RELATIONS"
    if value is None:
        return "always", "default"
    if not isinstance(value, str) or value.strip().lower() not in DEV_POLICIES:
        raise DeferConfigError(
            f"dbt-defer: {source} is {value!r}; use one of: {', '.join(DEV_POLICIES)}"
        )
    return value.strip().lower(), source


def _limits(raw: Any) -> Tuple[Tuple[str, Optional[int]], ...]:
    if raw is None:
        return ()
    where = _where("limits")
    if not isinstance(raw, Mapping):
        raise DeferConfigError(f"dbt-defer: {where} must map target names to row counts, e.g. {{dev: 1000}}")
    out = []
    for target, value in raw.items():
        if not valid_limit(value):
            raise DeferConfigError(
                f"dbt-defer: {where} for target {target!r} is {value!r}; {LIMIT_RANGE}"
            )
        out.append((str(target), value))
    return tuple(out)


LIMIT_RANGE = f"use a whole number from 0 to {MAX_LIMIT}, or null for no limit"


def valid_limit(value: Any) -> bool:
    """A row limit: None (no limit) or an int in 0..MAX_LIMIT (not a bool, not a float)."""
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_LIMIT)


def node_meta(node: Any) -> Mapping[str, Any]:
    """A dbt node's ``meta: dbt_defer: {...}`` (node meta, then config meta); {} when absent."""
    meta: dict = {}
    config = getattr(node, "config", None)
    for source in (getattr(node, "meta", None), getattr(config, "meta", None)):
        if isinstance(source, dict):
            meta.update(source)
    value = meta.get("dbt_defer")
    return value if isinstance(value, dict) else {}


def max_state_bytes(environ: Mapping[str, str]) -> int:
    """DBT_DEFER_MAX_STATE_MB (default 512) in bytes: the largest manifest.json or
    run_results.json dbt-defer reads from a local state or downloads. A bad value is one line naming the variable."""
    raw = environ.get(MAX_STATE_MB_VAR)
    if raw is None or not raw.strip():
        return DEFAULT_MAX_STATE_MB * 1024 * 1024
    text = raw.strip()
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= _MAX_STATE_MB_CEILING:
        raise DeferConfigError(
            f"dbt-defer: {MAX_STATE_MB_VAR} is {raw[:40]!r}; use a whole number of megabytes from 1 to "
            f"{_MAX_STATE_MB_CEILING} (default {DEFAULT_MAX_STATE_MB}), or unset it"
        )
    return int(text) * 1024 * 1024


def _bool(settings: Mapping[str, Any], key: str) -> bool:
    value = settings.get(key, False)
    if isinstance(value, str) and value.strip().lower() in _TRUE | {"0", "false", "f", "no", "n", "off"}:
        return value.strip().lower() in _TRUE
    if not isinstance(value, bool):
        raise DeferConfigError(f"dbt-defer: {_where(key)} is {value!r}; use true or false")
    return value


def _never_defer(raw: Any) -> Tuple[str, ...]:
    if raw is None:
        return ()
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, (list, tuple)) or not all(isinstance(s, str) and s.strip() for s in raw):
        raise DeferConfigError(
            f"dbt-defer: {_where('never_defer')} must be a list of dbt selectors, e.g. [\"tag:pii\"]"
        )
    return tuple(s.strip() for s in raw)


def _max_age(raw: Any) -> float:
    if raw is None:
        return DEFAULT_MAX_AGE_HOURS
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not raw > 0:  # NaN is not > 0
        raise DeferConfigError(f"dbt-defer: {_where('max_age_hours')} is {raw!r}; use a positive number of hours")
    try:
        return float(raw)
    except OverflowError:  # an int too large for a float: never stale
        return float("inf")


COMPILE_AS = ("compile", "build")


def _compile_as(environ: Mapping[str, str]) -> str:
    value = (environ.get("DBT_DEFER_COMPILE_AS") or "compile").strip().lower()
    if value not in COMPILE_AS:
        raise DeferConfigError(
            f"dbt-defer: DBT_DEFER_COMPILE_AS is {value!r}; use 'compile' (default) or 'build'"
        )
    return value


def overlay_settings(project_vars: Any, cli_vars: Any) -> Optional[Mapping[str, Any]]:
    """``vars: dbt_defer`` from dbt_project.yml, overlaid key by key by ``--vars '{dbt_defer: ...}'``."""
    project = project_vars if isinstance(project_vars, Mapping) else {}
    cli = cli_vars if isinstance(cli_vars, Mapping) else {}
    base, override = project.get("dbt_defer"), cli.get("dbt_defer")
    if override is None:
        return base
    if not isinstance(base, Mapping) or not isinstance(override, Mapping):
        return override
    return {**base, **override}


def load_config(
    settings: Optional[Mapping[str, Any]],
    environ: Mapping[str, str],
    project_root: str,
    *,
    defer_state: Optional[str] = None,
    state: Optional[str] = None,
    favor_state: bool = False,
) -> DeferConfig:
    """Build the one frozen configuration object. Raises DeferConfigError on bad input."""
    if settings is None:
        settings = {}
    if not isinstance(settings, Mapping):
        raise DeferConfigError(
            "dbt-defer: vars: dbt_defer must be a mapping (environments, limits, ...); "
            f"got {type(settings).__name__}"
        )
    unknown = sorted(set(map(str, settings)) - _KNOWN_KEYS)
    if unknown:
        raise DeferConfigError(
            f"dbt-defer: unknown key(s) {', '.join(map(repr, unknown))} in vars: dbt_defer; "
            f"known keys are {', '.join(sorted(_KNOWN_KEYS))}"
        )

    envs = _environments_from_vars(settings.get("environments"), project_root)
    by_name = {e[0]: e for e in envs}
    extra = []
    notices = []
    from_env = _env_var_states(environ)
    for name, (key, value) in sorted(from_env.items()):
        if name in by_name:
            by_name[name][1], by_name[name][2] = value, key
        else:
            extra.append([name, value, key, ""])
            notice = _unknown_name_notice(name, key, list(by_name), [n for n in from_env if n != name])
            if notice:
                notices.append(notice)
    # New names go in front of 'prod' (or at the end when there is no prod); 'prod' itself last.
    extra.sort(key=lambda e: (e[0] == "prod", e[0]))
    prod_at = next((i for i, e in enumerate(envs) if e[0] == "prod"), len(envs))
    envs[prod_at:prod_at] = extra

    specs = []
    skipped = []
    for name, raw_state, source, target in envs:
        if not raw_state or not raw_state.strip():
            skipped.append((name, source))  # configured but empty: skipped (SPEC §3)
            continue
        specs.append(EnvironmentSpec(name, _resolve_state(raw_state, project_root), source, target))

    if not specs:
        fallback = defer_state or state
        if fallback:
            source = "--defer-state/DBT_DEFER_STATE" if defer_state else "--state/DBT_STATE"
            specs.append(EnvironmentSpec("prod", _resolve_state(str(fallback), project_root), source))

    policy, policy_source = _dev_policy(settings, environ, favor_state)
    return DeferConfig(
        environments=tuple(specs),
        dev_relations=policy,
        dev_relations_source=policy_source,
        limits=_limits(settings.get("limits")),
        limit_tests=_bool(settings, "limit_tests"),
        never_defer=_never_defer(settings.get("never_defer")),
        max_age_hours=_max_age(settings.get("max_age_hours")),
        audit_table=_bool(settings, "audit_table"),
        compile_as=_compile_as(environ),
        explain=truthy(environ.get("DBT_DEFER_EXPLAIN")),
        max_state_bytes=max_state_bytes(environ),
        skipped=tuple(skipped),
        notices=tuple(notices),
    )
