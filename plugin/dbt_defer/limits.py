"""Row limits that keep the SQL around a limited ref valid and meaning the same (SPEC §6).

dbt renders a limited relation as a subquery, ``(select * from x limit N)``, plus on some
adapters an alias of its own (``_dbt_limit_subq_x``). Either way the SQL around the ref can
break: ``{{ ref('x') }} c`` gets two aliases, ``x.col`` loses the name ``x``.

So a ref dbt-defer limits renders in two steps:

1. ``limited_relation`` gives the relation a class whose rendering appends a marker comment
   to the subquery: ``(select * from x limit N)/*dbt-defer-limited-ref 23 "x"*/ _dbt_limit_subq_x``.
   The marker carries the length of dbt's own alias that follows it and the alias to use
   when the SQL has none. Without step 2 the text is dbt's rendering plus a comment: still
   valid SQL (e.g. inside a hook, which dbt renders at run time).
2. ``resolve`` runs over each node's compiled SQL (patched into dbt's compile step, see
   ``patches``). It touches only the marked spans: it drops the marker and dbt's alias, then
   reads the tokens after the span (skipping whitespace and comments). ``as y`` or an
   identifier ``y`` that is not a SQL keyword is the user's alias and the subquery takes it;
   anything else (a keyword, ``)``, ``,``, the end) gets the ref's own identifier as alias,
   so ``x.col`` keeps working. The user's SQL elsewhere is never rewritten.

Pure functions (no dbt import at module level), plus the limit a ref gets, the unknown-target
warning (reading the profile's targets through dbt's ``read_profile``) and the line about
failing tests on limited data. Imports ``config`` only.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set

from dbt_defer.config import LIMIT_RANGE, node_meta, valid_limit

MARK = "/*dbt-defer-limited-ref "
_MARK_RE = re.compile(r"/\*dbt-defer-limited-ref (\d+) ([^\n]*?)\*/")
_DBT_ALIAS = re.compile(r"(\s+[^\W\d][\w$]*)?")  # what dbt may append after the subquery
_WORD = re.compile(r"[^\W\d][\w$]*")
_QUOTES = ('"', "`", "[")

# Words that may follow a table reference and so are not an alias of it. Deliberately broad:
# classifying a keyword as an alias would leave the subquery unaliased (wrong for x.col), while
# an alias named like one of these is rare.
KEYWORDS = frozenset(
    """
    all and anti any apply array asof between by case cluster collate connect cross default
    distribute else end except exists fetch final for force format from full global group
    having ignore in inner intersect into is join lateral left like limit lock match_recognize
    minus natural not null offset on option or order outer over partition pivot positional
    prewhere qualify returning right sample select semi set settings some sort start
    straight_join tablesample then top union unpivot use using values when where window with
    """.split()
)


# --- step 1: rendering ---------------------------------------------------------------------------

_CLASSES: Dict[type, type] = {}


def alias_of(relation: Any) -> str:
    """The ref's own identifier, quoted as the relation quotes it (so it names what ``x`` named)."""
    identifier = relation.identifier or ""
    policy = getattr(relation, "quote_policy", None)
    if policy is not None and policy.get_part("identifier"):
        return relation.quoted(identifier)
    return identifier


def mark(rendered: str, alias: str) -> str:
    """dbt's rendering of a limited relation with the marker after the subquery; unchanged when it
    is not the ``(...)`` + optional alias shape this module knows, or the alias cannot be carried."""
    if not rendered.startswith("("):
        return rendered
    close = rendered.rfind(")")
    tail = rendered[close + 1 :]
    if close < 0 or _DBT_ALIAS.fullmatch(tail) is None or not alias or "\n" in alias or "*/" in alias:
        return rendered
    return f"{rendered[: close + 1]}{MARK}{len(tail)} {alias}*/{tail}"


def limited_relation(relation: Any) -> Any:
    """The same relation (same fields, same class behaviour) rendering its limit with the marker."""
    cls = type(relation)
    if cls in _CLASSES.values():
        return relation
    marked = _CLASSES.get(cls)
    if marked is None:

        def render_limited(self: Any) -> str:
            rendered = cls.render_limited(self)
            return rendered if self.limit is None else mark(rendered, alias_of(self))

        marked = type(cls.__name__, (cls,), {"render_limited": render_limited, "__module__": cls.__module__})
        _CLASSES[cls] = marked
    copied = copy.copy(relation)
    object.__setattr__(copied, "__class__", marked)  # frozen dataclass: same fields, new class
    return copied


# --- step 2: the pass over compiled SQL -----------------------------------------------------------


def resolve(sql: str) -> str:
    """Give every marked subquery in ``sql`` its alias; text outside the marked spans is unchanged."""
    if MARK not in sql:
        return sql
    out: List[str] = []
    pos = 0
    for m in _MARK_RE.finditer(sql):
        end = m.end() + int(m.group(1))  # after dbt's own alias
        out.append(sql[pos : m.start()])
        if not has_alias(sql, end):
            out.append(" " + m.group(2))
        pos = end
    out.append(sql[pos:])
    return "".join(out)


def skip_blank(sql: str, i: int) -> int:
    """The index of the next token at or after ``i``: skips whitespace and comments."""
    n = len(sql)
    while i < n:
        if sql[i].isspace():
            i += 1
        elif sql.startswith("--", i) or sql[i] == "#":
            j = sql.find("\n", i)
            i = n if j < 0 else j + 1
        elif sql.startswith("/*", i):
            j = sql.find("*/", i + 2)
            i = n if j < 0 else j + 2
        else:
            break
    return i


def has_alias(sql: str, i: int) -> bool:
    """Does a table alias (``as y``, ``y``, ``"y"``) start at the next token after ``i``?"""
    i = skip_blank(sql, i)
    word = _WORD.match(sql, i)
    if word:
        text = word.group(0).lower()
        return text == "as" or text not in KEYWORDS
    return sql.startswith(_QUOTES, i)


# --- checks and messages ---------------------------------------------------------------------------


class LimitError(ValueError):
    """An invalid ``meta: dbt_defer: limit``; the message is the one line."""


def limit_for(cfg: Any, target_name: str, node: Any, target: Any) -> Optional[int]:
    """The row limit of ``node``'s ref to ``target`` (SPEC §6), or None; the line
    (LimitError) for an invalid ``meta: dbt_defer: limit``."""
    applies, limit = cfg.limit_for_target(target_name)
    if not applies:
        return None
    if node.resource_type == "test" and not cfg.limit_tests:
        return None
    meta = node_meta(target)
    if "limit" in meta:
        value = meta["limit"]
        if not valid_limit(value):
            raise LimitError(f"dbt-defer: meta dbt_defer.limit of {target.unique_id} is {value!r}; {LIMIT_RANGE}")
        return value
    return limit


def bad_meta_limits(nodes: Iterable[Any]) -> Optional[str]:
    """One line naming every node whose ``meta: dbt_defer: limit`` is not a valid limit (checked
    at the start of a deferred run, like the vars, not only when a ref reads that node), or None."""
    bad = []
    for node in nodes:
        meta = node_meta(node)
        if "limit" in meta and not valid_limit(meta["limit"]):
            where = getattr(node, "patch_path", None) or getattr(node, "original_file_path", None) or "?"
            bad.append((node.unique_id, meta["limit"], str(where).split("://", 1)[-1]))
    if not bad:
        return None
    bad.sort(key=lambda b: b[0])
    uid, value, where = bad[0]
    line = f"dbt-defer: meta dbt_defer.limit of {uid} is {value!r} ({where}); {LIMIT_RANGE}"
    if len(bad) > 1:
        line += f"; also bad in {', '.join(b[0] for b in bad[1:4])}" + (" and more" if len(bad) > 4 else "")
    return line


def profile_targets(config: Any, args: Any) -> Optional[List[str]]:
    """The targets (outputs) of the running profile in profiles.yml; None when unreadable."""
    try:
        from dbt.config.profile import read_profile

        folder = getattr(args, "profiles_dir", None) or getattr(args, "PROFILES_DIR", None)
        outputs = read_profile(str(folder)).get(config.profile_name, {}).get("outputs")
    except Exception:
        return None
    return [str(name) for name in outputs] if isinstance(outputs, dict) else None


def unknown_targets(limits: Sequence[Any], profile_targets: Iterable[str]) -> List[str]:
    """Keys of ``limits`` that are not a target (output) of the profile."""
    known = set(profile_targets)
    return [name for name, _ in limits if name not in known]


def unknown_targets_warning(unknown: Sequence[str], profile: str, profile_targets: Iterable[str]) -> str:
    names = ", ".join(repr(n) for n in unknown)
    targets = ", ".join(sorted(profile_targets)) or "(none)"
    plural = "s are not targets" if len(unknown) > 1 else " is not a target"
    return (
        f"dbt-defer: vars: dbt_defer: limits key{plural} of profile {profile!r}: {names}; "
        f"no limit applies under {'them' if len(unknown) > 1 else 'it'}. "
        f"The profile's targets are: {targets}; rename the key to one of them"
    )


def limited_nodes(records: Iterable[Any]) -> Set[str]:
    """Nodes that read limited data in this run: a limited ref of their own, or a ref resolved to
    the current target (``dev``) of a node that did, transitively."""
    records = list(records)
    affected = {r.node for r in records if r.limit is not None}
    dev_edges = [(r.node, r.ref) for r in records if r.env == "dev"]
    changed = True
    while changed:
        changed = False
        for node, ref in dev_edges:
            if ref in affected and node not in affected:
                affected.add(node)
                changed = True
    return affected


def limited_tests_text(records: Iterable[Any]) -> str:
    """The summary's tail naming the data tests that read row-limited parents in this run
    (their own limited ref, or a dev model built from limited data), or ''."""
    records = list(records)
    affected = limited_nodes(records)
    tests = sorted({r.node for r in records if r.is_test and (r.node in affected or r.ref in affected)})
    if not tests:
        return ""
    shown = ", ".join(tests[:5]) + (f" and {len(tests) - 5} more" if len(tests) > 5 else "")
    return f"; {len(tests)} data test{'s' if len(tests) != 1 else ''} read row-limited parents ({shown})"


def failing_tests_line(records: Iterable[Any], failing: Iterable[str]) -> Optional[str]:
    """One line naming the failing data tests whose parents were limited in this run, or None."""
    records = list(records)
    affected = limited_nodes(records)
    refs: Dict[str, Set[str]] = {}
    for r in records:
        refs.setdefault(r.node, set()).add(r.ref)
    hit = sorted(t for t in set(failing) if t in affected or refs.get(t, set()) & affected)
    if not hit:
        return None
    shown = ", ".join(hit[:5]) + (f" and {len(hit) - 5} more" if len(hit) > 5 else "")
    tests = "data test" if len(hit) == 1 else "data tests"
    return (
        f"dbt-defer: {len(hit)} {tests} with failures read row-limited parents in this run ({shown}); "
        "a capped parent can make a test fail falsely (e.g. relationships); check without limits: "
        "--vars '{dbt_defer: {limits: {}}}'"
    )
