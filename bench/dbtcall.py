"""Run dbt as a subprocess (through _dbt_entry.py) and time it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ENTRY = Path(__file__).with_name("_dbt_entry.py")
# dbt / dbt-defer settings that must not leak from the caller's shell
_SCRUB_PREFIXES = ("DBT_DEFER", "DBT_STATE", "DBT_FAVOR_STATE", "DBT_TARGET_PATH",
                   "DBT_PROFILES_DIR", "DBT_PROJECT_DIR", "DBT_TARGET", "DBT_SELECT")


class DbtFailed(RuntimeError):
    pass


@dataclass
class Call:
    """One dbt invocation: project dir, args, extra env, plugin hidden or not."""
    project: Path
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    hide_plugin: bool = False

    def describe(self) -> str:
        env = " ".join(f"{k}={v}" for k, v in self.env.items())
        hidden = "[plugin hidden] " if self.hide_plugin else ""
        return f"{hidden}{env + ' ' if env else ''}dbt {' '.join(self.args)}"


@dataclass
class Outcome:
    seconds: float
    cpu_seconds: float  # user + sys of the dbt process
    plugin_loaded: bool | None
    counts: dict | None
    timers: dict | None = None
    peak_mb: float = 0.0  # peak resident memory (maxrss) of the dbt process


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUB_PREFIXES)}
    env.update(DBT_SEND_ANONYMOUS_USAGE_STATS="false", DBT_USE_COLORS="false",
               DBT_PARTIAL_PARSE="true", DBT_VERSION_CHECK="false", PYTHONHASHSEED="0")
    return env


def run(call: Call, count: bool = False, timers: bool = False, quiet: bool = True) -> Outcome:
    with tempfile.TemporaryDirectory(prefix="dbtbench-") as tmp:
        probe, counts = Path(tmp, "probe.json"), Path(tmp, "counts.json")
        timers_file = Path(tmp, "timers.json")
        opts = ["--probe", str(probe)]
        if call.hide_plugin:
            opts.append("--hide-plugin")
        if count:
            opts += ["--count", str(counts)]
        if timers:
            opts += ["--timers", str(timers_file)]
        cmd = [sys.executable, str(ENTRY), *opts, "--",
               *call.args, "--profiles-dir", str(call.project)]
        env = {**base_env(), **call.env}
        out_file, err_file = Path(tmp, "stdout"), Path(tmp, "stderr")
        with out_file.open("wb") as out, err_file.open("wb") as err:
            start = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=call.project, env=env, stdout=out, stderr=err)
            _, status, usage = os.wait4(proc.pid, 0)  # this process's own CPU time and peak memory
            seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        cpu = usage.ru_utime + usage.ru_stime
        peak_mb = usage.ru_maxrss / 1024  # KiB on Linux
        proc.stdout = out_file.read_text(errors="replace")
        proc.stderr = err_file.read_text(errors="replace")
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + "\n" + proc.stderr).strip().splitlines()[-40:])
            raise DbtFailed(f"exit {proc.returncode}: {call.describe()}\n  cwd={call.project}\n"
                            f"--- output tail ---\n{tail}")
        if not quiet:
            print(proc.stdout)
        loaded = json.loads(probe.read_text())["dbt_defer_loaded"] if probe.exists() else None
        data = json.loads(counts.read_text()) if count and counts.exists() else None
        timed = json.loads(timers_file.read_text()) if timers and timers_file.exists() else None
        return Outcome(seconds, cpu, loaded, data, timed, peak_mb)
