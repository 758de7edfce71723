"""Configuration: the one frozen object a deferred run works from (``DeferConfig``, one
``EnvironmentSpec`` per environment of the chain), and the small rules every room shares.

This module is the bottom of the package: it imports nothing of ours and nothing of dbt.
Reading the settings (vars, ``DBT_DEFER_*`` variables, dbt's flags) into this object is
``settings``. Also here, because every room needs them: the one error-to-line helper
(``one_line``), secrets in state URIs (``uri_secrets``, ``redact``), a node's
``meta: dbt_defer`` (``node_meta``), the row-limit range and ``DBT_DEFER_MAX_STATE_MB``.
May not touch: files, the environment, the warehouse, dbt.
"""

from __future__ import annotations

import contextlib
import gc
import re
from urllib.parse import unquote
from dataclasses import dataclass
from typing import Any, Iterator, List, Mapping, Optional, Sequence, Tuple

DEV = "dev"
DEV_POLICIES = ("always", "modified", "never")
DEFAULT_MAX_AGE_HOURS = 72.0
MAX_LIMIT = 2**31 - 1  # rows: what every warehouse's LIMIT accepts (and the audit table's integer column)
DEFAULT_MAX_STATE_MB = 512  # SPEC §7
MAX_STATE_MB_VAR = "DBT_DEFER_MAX_STATE_MB"
_MAX_STATE_MB_CEILING = 1024 * 1024  # 1 TiB: beyond any manifest; keeps the number a sane int
_TRUE = {"1", "true", "t", "yes", "y", "on"}


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
# a URI's fragment (#...), which some write a password into: up to the same ends as a query string
_FRAGMENT = re.compile(r"(?P<uri>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s#'\"<>]*?)#(?:[^\s'\"<>)\]:]|:(?!:))+")
_MIN_SECRET = 4  # shorter literal values are not replaced everywhere (they would mangle the text)


def uri_secrets(state: str) -> Tuple[str, ...]:
    """The secret parts of a state URI: each segment's user:password, its query string (and the
    values in it) and its fragment, as written and percent-decoded. Nothing for a local path."""
    found = set()
    if not is_uri(state):
        return ()
    for segment in state.split("::"):
        scheme, sep, rest = segment.partition("://")
        if not sep:
            continue
        rest, hash_mark, fragment = rest.partition("#")
        if hash_mark and fragment:
            found.add(fragment)
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
    """``text`` without the credentials, query strings and fragments of the URIs in it (``***`` instead),
    nor any of ``secrets`` (literal strings, e.g. ``uri_secrets(state)``). One line stays one line."""
    text = str(text)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED + ("@" if secret.endswith("@") else ""))
    text = _USERINFO.sub(lambda m: m.group("scheme") + REDACTED + "@", text)
    text = _FRAGMENT.sub(lambda m: m.group("uri") + "#" + REDACTED, text)
    return _QUERY.sub(lambda m: m.group("uri") + "?" + REDACTED, text)


_ERROR_HEADER = re.compile(
    r"^((Database|Runtime|Compilation|Internal|Parsing|Dependency|Dbt\w*) ?Error( in .*)?|Encountered an error):?$",
    re.I,
)


def exception_chain(exc: BaseException, most: int = 6) -> List[BaseException]:
    """``exc`` and the exceptions behind it (``__cause__``, else ``__context__``), at most ``most``:
    fsspec and botocore wrap the error that tells what went wrong."""
    seen: List[BaseException] = []
    current: Optional[BaseException] = exc
    while current is not None and len(seen) < most:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


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


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused while a large structure is built and kept: a
    20,000-node manifest decodes into ~10 objects per node, and each collection triggered on
    the way scans the whole growing heap again (45% of loading three such manifests, bench/).
    Nothing built under it forms a reference cycle; the collector runs again afterwards."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
