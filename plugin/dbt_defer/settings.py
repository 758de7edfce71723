"""Reading the settings (SPEC §3): ``vars: dbt_defer``, the ``DBT_DEFER_*`` environment
variables and dbt's own ``--defer-state``/``--state`` -> one frozen ``config.DeferConfig``.

Sources, later wins:
1. ``vars: dbt_defer: {...}`` in dbt_project.yml (and ``--vars``: ``overlay_settings``);
2. environment variables ``DBT_DEFER_<NAME>_STATE``, ``DBT_DEFER_DEV_RELATIONS``, ...;
3. dbt's ``--defer-state`` / ``--state`` as the single environment ``prod`` when nothing
   above configures one.

Owns every check of a setting's value (one line naming the setting, where it was set and the
fix) and the did-you-mean notices for ``DBT_DEFER_<NAME>_STATE`` names. Imports ``config``
only, and nothing of dbt: it is unit-tested with plain dicts (the caller hands in the vars,
the environment and dbt's flags). May not touch: files, the warehouse, dbt's objects.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Optional, Tuple

from dbt_defer.config import (
    _TRUE,
    DEFAULT_MAX_AGE_HOURS,
    DEV_POLICIES,
    LIMIT_RANGE,
    DeferConfig,
    DeferConfigError,
    EnvironmentSpec,
    is_uri,
    max_state_bytes,
    truthy,
    valid_limit,
)
from dbt_defer.env_names import check_name, misspelled_vars_key_notice, unknown_name_notice, unknown_variable_notice

_ENV_STATE = re.compile(r"^DBT_DEFER_(?P<name>[A-Za-z0-9_]+?)_STATE$")
_FALSE = {"0", "false", "f", "no", "n", "off"}
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
        name = check_name(item["name"], where)
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
            name = check_name(m.group("name").lower(), f"environment variable {key}")
            if name in found and found[name][1] != value:
                raise DeferConfigError(
                    f"dbt-defer: environment variables {found[name][0]} and {key} both set the state of "
                    f"environment {name!r}, to different values; keep one"
                )
            found[name] = (key, value)
    return found


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
        if isinstance(value, str) and value.strip().isdigit():
            raise DeferConfigError(
                f"dbt-defer: {where} for target {target!r} is the string {value!r}; write {value.strip()} "
                f"without quotes (settings take their YAML type; {LIMIT_RANGE})"
            )
        if not valid_limit(value):
            raise DeferConfigError(
                f"dbt-defer: {where} for target {target!r} is {value!r}; {LIMIT_RANGE}"
            )
        out.append((str(target), value))
    return tuple(out)


# One rule for every value of vars: dbt_defer: it has its YAML type. true/false and numbers are
# written unquoted (a quoted "yes" or "1000" is refused, with the unquoted form as the fix), and
# never_defer is a list even for one selector.


def _bool(settings: Mapping[str, Any], key: str) -> bool:
    value = settings.get(key, False)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        raise DeferConfigError(
            f"dbt-defer: {_where(key)} is the string {value!r}; write {str(truthy(value)).lower()} "
            "without quotes (settings take their YAML type, as limits do)"
        )
    if not isinstance(value, bool):
        raise DeferConfigError(f"dbt-defer: {_where(key)} is {value!r}; use true or false")
    return value


def _never_defer(raw: Any) -> Tuple[str, ...]:
    if raw is None:
        return ()
    if isinstance(raw, str):
        raise DeferConfigError(
            f"dbt-defer: {_where('never_defer')} is the string {raw!r}; it must be a list of dbt selectors: "
            f"never_defer: [{raw.strip()!r}]".replace("'", '"')
        )
    if not isinstance(raw, (list, tuple)) or not all(isinstance(s, str) and s.strip() for s in raw):
        raise DeferConfigError(
            f"dbt-defer: {_where('never_defer')} must be a list of dbt selectors, e.g. [\"tag:pii\"]"
        )
    return tuple(s.strip() for s in raw)


def _max_age(raw: Any) -> float:
    if raw is None:
        return DEFAULT_MAX_AGE_HOURS
    if isinstance(raw, str) and raw.strip().replace(".", "", 1).isdigit():
        raise DeferConfigError(
            f"dbt-defer: {_where('max_age_hours')} is the string {raw!r}; write {raw.strip()} without quotes "
            "(settings take their YAML type)"
        )
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


def vars_key_notice(project_vars: Any, cli_vars: Any) -> Optional[str]:
    """The did-you-mean line for ``vars: dbt-defer`` (a near miss of ``dbt_defer``), or None."""
    return misspelled_vars_key_notice(project_vars, cli_vars)


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
    vars_notice: Optional[str] = None,
) -> DeferConfig:
    """Build the one frozen configuration object. Raises DeferConfigError on bad input.
    ``vars_notice``: ``vars_key_notice``'s line, kept with the other notices."""
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
    notices = [vars_notice] if vars_notice else []
    from_env = _env_var_states(environ)
    for key in sorted(environ):
        notice = unknown_variable_notice(key)
        if notice:
            notices.append(notice)
    for name, (key, value) in sorted(from_env.items()):
        if name in by_name:
            by_name[name][1], by_name[name][2] = value, key
        else:
            extra.append([name, value, key, ""])
            notice = unknown_name_notice(name, key, list(by_name), [n for n in from_env if n != name])
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
