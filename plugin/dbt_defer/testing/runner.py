"""Running dbt in-process for the suite and for dbt-defer's own tests (``tests/dbt_harness``):
one ``dbtRunner`` invocation with a clean environment, its events collected.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

# --- running dbt in-process ---------------------------------------------------------------------

_KEEP_ENV = ("DBT_DEFER_TEST_", "DBT_DEFER_PACKAGE_DIR")
_CLEAN_ENV = ("DBT_DEFER", "DBT_STATE", "DBT_FAVOR_STATE", "DBT_TARGET", "DBT_PROFILES_DIR", "DBT_PROJECT_DIR")
_ENV_LOCK = threading.Lock()


def clean_environment(environ: Dict[str, str], extra: Dict[str, Optional[str]]) -> Dict[str, str]:
    """``environ`` without the calling shell's dbt-defer and dbt deferral/target variables,
    anonymous usage stats off, then ``extra`` (None values dropped): what a dbt run of the
    suite sees, in this process or a subprocess."""
    env = {k: v for k, v in environ.items() if not (k.startswith(_CLEAN_ENV) and not k.startswith(_KEEP_ENV))}
    env["DBT_SEND_ANONYMOUS_USAGE_STATS"] = "false"
    env.update({k: v for k, v in extra.items() if v is not None})
    return env


@contextlib.contextmanager
def dbt_environment(extra: Dict[str, Optional[str]]) -> Iterator[None]:
    """dbt reads flags from the environment: run with ``clean_environment`` in this process,
    restore everything afterwards."""
    with _ENV_LOCK:
        saved = dict(os.environ)
        env = clean_environment(saved, extra)
        os.environ.clear()
        os.environ.update(env)
        try:
            yield
        finally:
            os.environ.clear()
            os.environ.update(saved)


@dataclass
class DbtResult:
    success: bool
    exception: Optional[BaseException]
    messages: List[Dict[str, str]]
    raw: Any

    def text(self) -> str:
        parts = [m["msg"] for m in self.messages]
        if self.exception is not None:
            parts.append(str(self.exception))
        return "\n".join(parts)

    def lines(self, prefix: str = "dbt-defer:", level: Optional[str] = None) -> List[str]:
        return [
            m["msg"] for m in self.messages
            if m["msg"].startswith(prefix) and (level is None or m["level"] == level)
        ]

    def node_results(self) -> Dict[str, Any]:
        """unique_id -> dbt's result object of each node the command ran."""
        results = getattr(self.raw, "results", None) or []
        return {r.node.unique_id: r for r in results if getattr(r, "node", None) is not None}

    def statuses(self) -> Dict[str, str]:
        return {uid: str(r.status) for uid, r in self.node_results().items()}


def _fresh_process_globals() -> None:
    """What a new dbt process starts with and an earlier in-process invocation leaves behind:
    dbt's selection global (set by the node selector, read by refs, ``selected_resources`` and
    dbt-defer), which ``dbt retry`` and ``run-operation`` never set."""
    from dbt import selected_resources

    selected_resources.set_selected_resources(set())


def run_dbt(args: Sequence[str], project_dir: Path, env: Optional[Dict[str, str]] = None,
            expect: Optional[bool] = True) -> DbtResult:
    """One dbt invocation in this process; ``expect`` True/False asserts success/failure."""
    from dbt.cli.main import dbtRunner

    messages: List[Dict[str, str]] = []

    def collect(event: Any) -> None:
        info = event.info
        messages.append({"name": info.name, "level": str(info.level), "msg": info.msg or ""})

    argv = [*args, "--project-dir", str(project_dir), "--profiles-dir", str(project_dir)]
    with dbt_environment(env or {}):
        _fresh_process_globals()
        res = dbtRunner(callbacks=[collect]).invoke(argv)
    result = DbtResult(bool(res.success), res.exception, messages, res.result)
    if expect is not None and result.success != expect:
        tail = "\n".join(m["msg"] for m in messages[-40:] if m["msg"].strip())
        raise AssertionError(
            f"dbt {' '.join(args)} {'failed' if expect else 'succeeded unexpectedly'}"
            f" (exception: {res.exception})\n{tail}"
        )
    return result


def write_yaml(path: Path, value: Any) -> None:
    import yaml  # a dbt dependency

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(value, sort_keys=False))
