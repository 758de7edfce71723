"""The dbt executable of the portable mode, run as a subprocess (SPEC §11): dbt Core v2
(``dbt`` 2.x, or ``dbt-core-experimental-parser``), or a dbt 1.x.

Owns building its command lines (project options passed through), the read-only calls the
state step makes (``ls``/``parse`` into a scratch target path, ``run-operation
dbt_defer.portable_relations``: the existence listing through the engine's own adapter, so no
warehouse driver of ours), and reading the structured lines our macros log
(``dbt-defer-portable {json}``, ``dbt-defer-ref {json}``). Imports ``config`` only; knows nothing
of chains or rules.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from dbt_defer.config import one_line

ENGINE_VAR = "DBT_DEFER_DBT"  # the dbt executable (default: dbt)
PORTABLE_VAR = "DBT_DEFER_PORTABLE"  # set for the engine: dbt_defer.ref logs one line per ref
LISTING_MARK = "dbt-defer-portable "
REF_MARK = "dbt-defer-ref "
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# dbt's own variables that would change what a read-only call does (deferral, another state)
_ENGINE_OWN = ("DBT_DEFER", "DBT_STATE", "DBT_DEFER_STATE", "DBT_FAVOR_STATE", "DBT_TARGET_PATH")


class EngineError(RuntimeError):
    """The engine could not do a read-only step; the message is the one line."""


def executable(environ: Optional[Dict[str, str]] = None) -> List[str]:
    """The configured dbt command (``DBT_DEFER_DBT``, shell-split; default ``dbt``)."""
    environ = os.environ if environ is None else environ
    raw = (environ.get(ENGINE_VAR) or "dbt").strip()
    return shlex.split(raw) or ["dbt"]


def marked(line: str, mark: str) -> Optional[Any]:
    """The JSON a line carries after ``mark`` (anywhere in the line: dbt 1.x prefixes a time,
    v2 may colour it), or None."""
    line = _ANSI.sub("", line)
    at = line.find(mark)
    if at < 0:
        return None
    text = line[at + len(mark):].strip()
    try:
        return json.loads(text)
    except ValueError:
        return None


@dataclass
class Engine:
    """One dbt executable plus the project options every call passes through."""

    command: List[str]
    project_dir: str
    profiles_dir: Optional[str] = None
    target: Optional[str] = None
    vars: Optional[str] = None
    calls: List[List[str]] = field(default_factory=list)  # every command line run (for tests/bench)
    seconds: float = 0.0  # time spent in the engine's read-only calls (summed over concurrent calls)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def elsewhere(self, project_dir: str, profiles_dir: Optional[str]) -> "Engine":
        """The same executable and target for another project folder (the listing project)."""
        return Engine(list(self.command), project_dir, profiles_dir or self.profiles_dir, self.target, self.vars)

    def absorb(self, other: "Engine") -> None:
        """Count another Engine's calls and time as this one's (the sidecar reports them all)."""
        with self._lock:
            self.calls.extend(other.calls)
            self.seconds += other.seconds

    def options(self, target_path: Optional[str] = None) -> List[str]:
        out = ["--project-dir", self.project_dir]
        if self.profiles_dir:
            out += ["--profiles-dir", self.profiles_dir]
        if self.target:
            out += ["--target", self.target]
        if self.vars:
            out += ["--vars", self.vars]
        if target_path:
            out += ["--target-path", target_path]
        return out

    def read_only_env(self) -> Dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _ENGINE_OWN}
        env.pop(PORTABLE_VAR, None)
        return env

    def _call(self, args: List[str]) -> str:
        line = self.command + args
        with self._lock:
            self.calls.append(line)
        started = time.perf_counter()
        try:
            done = subprocess.run(line, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  errors="replace", env=self.read_only_env(), cwd=self.project_dir)
        except OSError as exc:
            raise EngineError(
                f"dbt-defer: cannot start the dbt executable {' '.join(self.command)!r} ({one_line(exc)}); "
                f"install dbt (dbt Core v2 or dbt 1.x) or point {ENGINE_VAR} at it"
            ) from None
        with self._lock:
            self.seconds += time.perf_counter() - started
        if done.returncode != 0:
            tail = [l for l in _ANSI.sub("", done.stdout).splitlines() if l.strip()][-12:]
            raise EngineError(
                f"dbt-defer: `{os.path.basename(self.command[-1])} {args[0]}` failed (exit {done.returncode}) "
                "before anything was built; its last lines:\n" + "\n".join(tail)
            )
        return done.stdout

    def parse(self, target_path: str, flags: Sequence[str] = ()) -> None:
        """``dbt parse`` into ``target_path`` (the project's manifest.json, as this engine renders it)."""
        self._call(["parse"] + self.options(target_path) + list(flags))

    def ls(self, target_path: str, select: Sequence[str], exclude: Sequence[str] = (),
           selector: Optional[str] = None, flags: Sequence[str] = ()) -> List[str]:
        """The unique_ids ``dbt ls`` selects (every resource type); writes the project's
        manifest.json into ``target_path`` as a side effect, as every dbt command does.
        ``flags``: more engine options (``--partial-parse``)."""
        args = ["ls", "--output", "json"] + self.options(target_path) + list(flags)
        if select:
            args += ["--select", *select]
        if exclude:
            args += ["--exclude", *exclude]
        if selector:
            args += ["--selector", selector]
        found = []
        for raw in self._call(args).splitlines():
            line = _ANSI.sub("", raw).strip()
            start = line.find("{")
            if start < 0:
                continue
            try:
                item = json.loads(line[start:])
            except ValueError:
                continue
            if isinstance(item, dict) and isinstance(item.get("unique_id"), str):
                found.append(item["unique_id"])
        return found

    def list_relations(self, schemas: Iterable[Tuple[Optional[str], Optional[str]]], target_path: str,
                       extra: Iterable[Tuple[Optional[str], Optional[str], str]] = (),
                       dev_schemas: bool = False) -> "Listing":
        """One ``run-operation dbt_defer.portable_relations``: the running target's names and the
        relations of each (database, schema) asked for — one metadata query per schema, through
        the engine's own adapter. ``extra``: identifiers the project's own nodes do not have (an
        environment's alias of a node), which dbt 1.x (no listing in Jinja) must probe by name."""
        pairs = sorted({(d or "", s or "") for d, s in schemas})
        more = sorted({(d or "", s or "", i) for d, s, i in extra})
        args = ["run-operation", "dbt_defer.portable_relations", "--args",
                json.dumps({"schemas": [list(p) for p in pairs], "extra": [list(m) for m in more],
                            "dev_schemas": dev_schemas})] + self.options(target_path)
        return Listing.from_output(self._call(args))

    def create_limited_views(self, views: List[Dict[str, Any]], target_path: str) -> Dict[str, str]:
        """One ``run-operation dbt_defer.portable_limited_views``: each view (re)created in the
        running target's scratch schema; unique_id -> the view's relation as the engine renders it."""
        args = ["run-operation", "dbt_defer.portable_limited_views", "--args",
                json.dumps({"views": views})] + self.options(target_path)
        out: Dict[str, str] = {}
        for line in self._call(args).splitlines():
            item = marked(line, LISTING_MARK)
            if isinstance(item, dict) and item.get("kind") == "view":
                out[str(item.get("uid"))] = str(item.get("relation"))
        missing = [v["uid"] for v in views if v["uid"] not in out]
        if missing:
            raise EngineError(f"dbt-defer: the engine created no limited view for {', '.join(missing[:5])}; "
                              "is the dbt_defer package at this dbt-defer's version (dbt deps)?")
        return out


@dataclass
class Listing:
    target: Dict[str, Any] = field(default_factory=dict)
    relations: Dict[Tuple[str, str], set] = field(default_factory=dict)  # (db, schema) lower -> identifiers lower
    listed: set = field(default_factory=set)  # (db, schema) lower: answered

    @classmethod
    def from_output(cls, text: str) -> "Listing":
        out = cls()
        for line in text.splitlines():
            item = marked(line, LISTING_MARK)
            if not isinstance(item, dict):
                continue
            if item.get("kind") == "target":
                out.target = item
            elif item.get("kind") == "schema":
                key = ((item.get("database") or "").lower(), (item.get("schema") or "").lower())
                out.listed.add(key)
                found = out.relations.setdefault(key, set())
                found.update(str(i).lower() for i in item.get("identifiers") or () if i is not None)
        if not out.target:
            raise EngineError(
                "dbt-defer: the dbt executable ran run-operation dbt_defer.portable_relations but printed "
                "none of its lines; is the dbt_defer package installed (packages.yml + dbt deps) and at "
                "this dbt-defer's version?"
            )
        return out

    def add(self, other: "Listing") -> None:
        """Another call's schemas (a later listing of the schemas this one did not ask for)."""
        for key, found in other.relations.items():
            self.relations.setdefault(key, set()).update(found)
        self.listed |= other.listed

    @property
    def engine_major(self) -> Optional[int]:
        head = str(self.target.get("dbt_version") or "").split(".")[0]
        return int(head) if head.isdigit() else None

    def exists(self, location: Tuple[Optional[str], Optional[str], str], default_database: Optional[str]) -> bool:
        database, schema, identifier = location
        key = ((database or default_database or "").lower(), (schema or "").lower())
        return (identifier or "").lower() in self.relations.get(key, ())


def stream(command: List[str], env: Dict[str, str], cwd: str, on_line: Callable[[str], bool]) -> int:
    """Run the engine for the user's command: every output line goes to ``on_line`` (which says
    whether to show it); returns the exit code. Interrupts reach the engine."""
    try:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", env=env, cwd=cwd, bufsize=1)
    except OSError as exc:
        raise EngineError(
            f"dbt-defer: cannot start the dbt executable {command[0]!r} ({one_line(exc)}); "
            f"install dbt or point {ENGINE_VAR} at it"
        ) from None
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            if on_line(line):
                sys.stdout.write(line)
                sys.stdout.flush()
        return proc.wait()
    except KeyboardInterrupt:
        proc.wait()
        raise
