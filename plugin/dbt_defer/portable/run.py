"""``dbt-defer run -- <dbt arguments>`` (SPEC §11): one command for the whole portable run.

Computes the state (``state.compute``: chain, guard, listing, merged manifest) for the
selection in the dbt arguments, runs the configured dbt executable (``DBT_DEFER_DBT``, default
``dbt``) with ``--defer --defer-state <folder> --favor-state`` (the merged state alone decides,
SPEC §11) and ``DBT_DEFER_PORTABLE=1`` (``dbt_defer.ref`` then logs one line per ref), passes its
exit code through, and writes ``target/dbt_defer_audit.json`` (SPEC §5 fields) from those lines
and the state's sidecar. A refused selection starts no dbt. Commands that resolve no ref
(deps, parse, ls, clean, debug, ...) run as given.

Imports ``config``, ``audit`` and the portable ``engine``/``project``/``state``.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from dbt_defer import audit
from dbt_defer.config import one_line
import dbt_defer.portable.engine as engine_mod
from dbt_defer.portable.engine import REF_MARK, Engine, marked
from dbt_defer.portable.project import PortableContext
from dbt_defer.portable.state import BUILDING, StateResult, compute, views_of

PASS_THROUGH = frozenset({"deps", "clean", "debug", "init", "parse", "ls", "list", "source", "help", "system",
                          "login", "man"})
_SELECTING = {"-s": "select", "--select": "select", "-m": "select", "--models": "select", "--model": "select",
              "--exclude": "exclude", "--selector": "selector"}
_VALUED = {"-t": "target", "--target": "target", "--project-dir": "project_dir", "--profiles-dir": "profiles_dir",
           "--vars": "vars", "--target-path": "target_path"}
_OURS = ("--defer", "--no-defer", "--favor-state", "--no-favor-state")
_OURS_VALUED = ("--defer-state",)


@dataclass
class DbtArgs:
    """What dbt-defer reads from the user's dbt arguments; ``passed``: what goes to dbt as is."""

    command: Optional[str] = None
    select: List[str] = field(default_factory=list)
    exclude: List[str] = field(default_factory=list)
    selector: Optional[str] = None
    target: Optional[str] = None
    project_dir: Optional[str] = None
    profiles_dir: Optional[str] = None
    vars: Optional[str] = None
    target_path: Optional[str] = None
    favor_state: bool = False
    store_failures: bool = False
    passed: List[str] = field(default_factory=list)


def parse_dbt_args(argv: Sequence[str]) -> DbtArgs:
    out = DbtArgs()
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        key, eq, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if key in _OURS_VALUED:  # the state is ours; dbt's --state (state: selectors) passes through
            i += 1 if eq else 2
            continue
        if key in _OURS:
            out.favor_state = out.favor_state or key == "--favor-state"
            i += 1
            continue
        out.passed.append(arg)
        if key in _SELECTING:
            name = _SELECTING[key]
            values = [inline] if eq else []
            j = i + 1
            while not eq and j < len(args) and not args[j].startswith("-"):
                values.append(args[j])
                out.passed.append(args[j])
                j += 1
            if name == "selector":
                out.selector = values[0] if values else None
            else:
                getattr(out, name).extend(values)
            i = j if not eq else i + 1
            continue
        if key in _VALUED:
            value = inline if eq else (args[i + 1] if i + 1 < len(args) else None)
            if not eq and value is not None:
                out.passed.append(value)
                i += 1
            setattr(out, _VALUED[key], value)
        elif key == "--store-failures":
            out.store_failures = True
        elif not arg.startswith("-") and out.command is None:
            out.command = arg
        i += 1
    return out


@dataclass
class RefLine:
    node: str
    args: List[str]
    version: Optional[str]
    relation: str


def _norm(relation: Optional[str]) -> str:
    return (relation or "").replace('"', "").replace("`", "").lower()


def records_from(lines: Sequence[RefLine], result: StateResult) -> List[audit.Record]:
    """One audit record per (node, ref), from the engine's ref lines and the state's choices."""
    index = result.project.ref_index()
    recorder = audit.Recorder()
    for line in lines:
        if not line.args:
            continue
        package, name = (line.args[0], line.args[1]) if len(line.args) > 1 else (None, line.args[0])
        uid = index.get((package, name, line.version))
        if uid is None:
            continue
        choice = result.choices.get(uid)
        node = result.project.nodes.get(uid)
        dev = node.relation_name if node is not None else None
        if choice is not None and choice.view and _norm(line.relation) == _norm(choice.view):
            # a limited view: recorded as the environment's relation, with its limit (SPEC §5)
            recorder.add(audit.Record(node=line.node, ref=uid, env=choice.env, relation=choice.relation or "",
                                      reason=choice.reason, limit=choice.limit, is_test=line.node.startswith("test.")))
            continue
        if choice is None:
            env, reason = result.target, "dev_exists"
        elif choice.env in ("ephemeral", "missing") or _norm(line.relation) == _norm(choice.relation):
            env, reason = choice.env, choice.reason
        elif _norm(line.relation) == _norm(dev):
            env = result.target
            reason = "selected" if uid in result.selected else choice.reason
        else:  # the engine rendered something the state did not choose: say where it read from
            env, reason = choice.env, choice.reason
        recorder.add(audit.Record(node=line.node, ref=uid, env=env, relation=line.relation, reason=reason,
                                  limit=None, is_test=line.node.startswith("test.")))
    return recorder.records()


def audit_document(lines: Sequence[RefLine], result: StateResult, command: str, builds: bool,
                   invocation_id: Optional[str]) -> Dict[str, Any]:
    records = records_from(lines, result)
    saved = audit.Savings()
    if builds:
        saved = audit.savings(
            audit.upstream_not_selected(result.project, result.selected),
            [(e.name, e.manifest.build_seconds if e.manifest.run_results_path else None) for e in result.environments],
        )
    metadata = {
        "dbt_defer_version": audit.__version__, "invocation_id": invocation_id, "generated_at": audit.now_iso(),
        "target": result.target, "command": command, "mode": "portable", "state": result.folder,
    }
    document = audit.build_document(records, metadata=metadata, environments=result.describe(), saved=saved)
    document["_line"] = audit.summary_line(document["summary"], (r.limit for r in records), saved.measured_in)
    return document


def _invocation_id(target_path: str) -> Optional[str]:
    try:
        with open(os.path.join(target_path, "run_results.json"), encoding="utf-8") as fh:
            value = json.load(fh).get("metadata", {}).get("invocation_id")
        return value if isinstance(value, str) else None
    except (OSError, ValueError, AttributeError):
        return None


def run(argv: Sequence[str], warn: Callable[[str], None], say: Callable[[str], None],
        command: Optional[List[str]] = None, partial_parse: bool = False) -> int:
    dbt = parse_dbt_args(argv)
    command = command or engine_mod.executable()
    if dbt.command is None or dbt.command in PASS_THROUGH:
        return engine_mod.stream(command + list(argv), dict(os.environ), os.getcwd(), lambda line: True)
    ctx = PortableContext(project_dir=dbt.project_dir, profiles_dir=dbt.profiles_dir, target=dbt.target,
                          vars=dbt.vars, target_path=dbt.target_path, favor_state=dbt.favor_state,
                          partial_parse=partial_parse)
    eng = Engine(command, ctx.root, profiles_dir=dbt.profiles_dir, target=dbt.target, vars=dbt.vars)
    builds = dbt.command in BUILDING or ctx.cfg.compile_as == "build"
    result = compute(ctx, eng, select=dbt.select, exclude=dbt.exclude, selector=dbt.selector, builds=builds,
                     store_failures=dbt.store_failures, warn=warn)
    env = dict(os.environ)
    for key in ("DBT_DEFER_STATE", "DBT_FAVOR_STATE"):
        env.pop(key, None)
    views = views_of(result.choices)
    env[engine_mod.PORTABLE_VAR] = json.dumps({"views": views}) if views and not ctx.cfg.limit_tests else "1"
    full = command + list(dbt.passed)
    if not result.plain:
        full += ["--defer", "--defer-state", result.folder, "--favor-state"]
    lines: List[RefLine] = []

    def on_line(text: str) -> bool:
        item = marked(text, REF_MARK)
        if isinstance(item, dict) and isinstance(item.get("node"), str):
            lines.append(RefLine(item["node"], [str(a) for a in item.get("args") or []],
                                 None if item.get("version") is None else str(item["version"]), str(item.get("relation"))))
            return False  # ours: not shown
        return True

    code = engine_mod.stream(full, env, ctx.root, on_line)
    if result.plain:
        return code
    try:
        document = audit_document(lines, result, dbt.command, builds, _invocation_id(ctx.target_path))
        line = document.pop("_line")
        audit.write_document(document, ctx.target_path)
        say(line)
    except Exception as exc:  # the audit never changes the run's outcome
        warn(f"dbt-defer: could not write the audit ({one_line(exc)}); the run is not affected")
    return code
