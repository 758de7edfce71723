"""Environment names (SPEC §3): the rule (lower-case ``[a-z][a-z0-9_]*``, ``dev`` reserved for
the current target) and the near-miss notice for a ``DBT_DEFER_<NAME>_STATE`` that adds an
environment nobody listed (``DBT_DEFER_PRDO_STATE``: did you mean ``DBT_DEFER_PROD_STATE``?).
Imports ``config`` only; used by ``settings``.
"""

from __future__ import annotations

import re
from typing import Any, Optional

from dbt_defer.config import DEV, DeferConfigError

NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not NAME.match(name.lower()):
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


WELL_KNOWN_NAMES = ("prod", "production", "staging", "stage", "qa", "uat", "preprod", "ci", "test")


def distance(a: str, b: str) -> int:
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


def unknown_name_notice(name: str, key: str, configured: list, others: list) -> Optional[str]:
    """A warning for a DBT_DEFER_<NAME>_STATE that adds an environment the vars do not list
    (always when vars list environments), or whose name is a near-miss of a configured or
    well-known one (``others``: the names other DBT_DEFER_<NAME>_STATE variables set)."""
    if not configured and name in WELL_KNOWN_NAMES:
        return None
    known = sorted(set(configured) | set(others) | set(WELL_KNOWN_NAMES))
    near = min(known, key=lambda k: (distance(name, k), k))
    close = distance(name, near) <= (1 if len(name) <= 3 else 2)
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


# the DBT_DEFER_* variables read besides DBT_DEFER_<NAME>_STATE (dbt's own DBT_DEFER_STATE included)
KNOWN_VARIABLES = (
    "DBT_DEFER_STATE", "DBT_DEFER_DEV_RELATIONS", "DBT_DEFER_COMPILE_AS", "DBT_DEFER_EXPLAIN",
    "DBT_DEFER_MAX_STATE_MB", "DBT_DEFER_FETCH_TIMEOUT", "DBT_DEFER_DEBUG", "DBT_DEFER_PACKAGE_DIR",
    "DBT_DEFER_DBT", "DBT_DEFER_PARTIAL_PARSE",
)
STATE_SUFFIX = "_STATE"


def unknown_variable_notice(key: str) -> Optional[str]:
    """A did-you-mean line for a DBT_DEFER_* variable dbt-defer does not read but that is a near
    miss of one it does (DBT_DEFER_PROD_STAT -> DBT_DEFER_PROD_STATE); None otherwise (other
    tools' DBT_DEFER_* variables are left alone)."""
    upper = key.upper()
    if not upper.startswith("DBT_DEFER_") or upper in KNOWN_VARIABLES or upper.endswith(STATE_SUFFIX):
        return None
    guesses = [k for k in KNOWN_VARIABLES if distance(upper, k) <= 2]
    head, sep, last = upper[len("DBT_DEFER_"):].rpartition("_")
    if sep and head and distance(last, "STATE") <= 2:
        guesses.append(f"DBT_DEFER_{head}{STATE_SUFFIX}")
    if not guesses:
        return None
    guess = min(guesses, key=lambda k: (distance(upper, k), k))
    return f"dbt-defer: environment variable {key} is not read by dbt-defer; did you mean {guess}? Rename it"


def misspelled_vars_key_notice(project_vars: Any, cli_vars: Any) -> Optional[str]:
    """A did-you-mean line for a mapping under a near miss of ``vars: dbt_defer`` (``dbt-defer``,
    ``dbtDefer``, ``dbt_defre``) while ``dbt_defer`` itself is absent; None otherwise."""
    for where, found in (("dbt_project.yml", project_vars), ("--vars", cli_vars)):
        if not isinstance(found, dict) or "dbt_defer" in found:
            continue
        for key, value in found.items():
            if not isinstance(key, str) or not isinstance(value, dict):
                continue
            folded = re.sub(r"[^a-z]", "", key.lower())
            if folded == "dbtdefer" or distance(key.lower(), "dbt_defer") <= 2:
                return (
                    f"dbt-defer: vars: {key} ({where}) is not read by dbt-defer; did you mean vars: dbt_defer "
                    "(with an underscore)? Rename the key"
                )
    return None
