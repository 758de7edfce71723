"""``DeferProject``: one test class's copy of the suite's project — its files, its dev schema,
dbt runs with and without deferral, the audit, and warehouse checks made through dbt itself
(the project's ``dbt_defer_testing_probe`` macro).
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from dbt_defer.testing.files import ENVIRONMENTS, PROJECT, save_artifacts
from dbt_defer.testing.runner import DbtResult, dbt_environment, run_dbt

class ProjectFolder:
    """A dbt project folder under test (``root``): its files, dbt runs in this process, the
    audit dbt-defer wrote. Shared by the suite's ``DeferProject`` and dbt-defer's own tests."""

    root: Path

    # --- files --------------------------------------------------------------------------------
    @property
    def target(self) -> Path:
        return self.root / "target"

    def write(self, rel: str, text: str) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def read(self, rel: str) -> str:
        return (self.root / rel).read_text()

    @contextlib.contextmanager
    def edited(self, rel: str, text: str) -> Iterator[None]:
        """The file holds ``text`` inside the block and its old content afterwards."""
        path = self.root / rel
        old = path.read_text() if path.exists() else None
        self.write(rel, text)
        try:
            yield
        finally:
            if old is None:
                path.unlink()
            else:
                path.write_text(old)

    def save_artifacts(self, folder: str) -> Path:
        return save_artifacts(self.target, self.root / folder)

    def dbt(self, *args: str, env: Optional[Dict[str, str]] = None, expect: Optional[bool] = True) -> DbtResult:
        """dbt with deferral off (plain dbt), unless ``env`` turns it on."""
        return run_dbt(args, self.root, env, expect)

    def audit(self) -> Dict[str, Any]:
        return json.loads((self.target / "dbt_defer_audit.json").read_text())

    def resolutions(self) -> Dict[Tuple[str, str], Dict[str, Any]]:
        return {(r["node"], r["ref"]): r for r in self.audit()["resolutions"]}


# --- a test class's project ----------------------------------------------------------------------


@dataclass
class DeferProject(ProjectFolder):
    """A copy of the suite's project for one test class: its own dev schema and artifacts."""

    root: Path
    schemas: Dict[str, str]  # "prod", "staging", "dev" -> schema name
    profile_target: Dict[str, Any]

    # --- dbt ----------------------------------------------------------------------------------
    def chain_env(self, **extra: str) -> Dict[str, str]:
        env = {"DBT_DEFER": "1"}
        for name in ENVIRONMENTS:
            env[f"DBT_DEFER_{name.upper()}_STATE"] = f"{name}-artifacts"
        env.update(extra)
        return env

    def deferred(self, *args: str, expect: Optional[bool] = True, **extra_env: str) -> DbtResult:
        """dbt with the chain (staging then prod) on; a stale audit never survives."""
        audit = self.target / "dbt_defer_audit.json"
        if audit.exists():
            audit.unlink()
        return run_dbt(args, self.root, self.chain_env(**extra_env), expect)

    def explain(self, *args: str, env: Optional[Dict[str, str]] = None) -> Tuple[int, str, str]:
        """``dbt-defer explain`` in-process: (exit code, stdout, stderr)."""
        from dbt_defer import cli

        out, err = io.StringIO(), io.StringIO()
        argv = ["explain", *args, "--project-dir", str(self.root), "--profiles-dir", str(self.root)]
        chain = {k: v for k, v in self.chain_env().items() if k != "DBT_DEFER"}
        with dbt_environment(chain if env is None else env), contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            code = cli.main(argv)
        return code, out.getvalue(), err.getvalue()

    # --- what dbt wrote -------------------------------------------------------------------------
    def manifest(self, env: str = "dev") -> Dict[str, Any]:
        path = self.target / "manifest.json" if env == "dev" else self.root / f"{env}-artifacts" / "manifest.json"
        return json.loads(path.read_text())

    def relation(self, env: str, unique_id: str) -> str:
        """The relation as dbt renders it for ``env``: its relation_name in that manifest
        (dev: the last invocation's target/manifest.json)."""
        name = self.manifest(env)["nodes"][unique_id]["relation_name"]
        assert name, f"{unique_id} has no relation in the {env} manifest"
        return name

    def compiled(self, unique_id: str) -> str:
        node = self.manifest("dev")["nodes"][unique_id]
        return (self.target / "compiled" / node["package_name"] / node["original_file_path"]).read_text()

    def test_ids(self, prefix: str) -> List[str]:
        """unique_ids of the data tests whose id starts with test.<project>.<prefix>."""
        return sorted(u for u in self.manifest("dev")["nodes"] if u.startswith(f"test.{PROJECT}.{prefix}"))

    # --- the warehouse (through dbt run-operation) ----------------------------------------------
    def probe(self, exists: Sequence[Tuple[str, str]] = (), schemas: Sequence[str] = (),
              counts: Sequence[Tuple[str, str]] = (), scalars: Sequence[str] = (),
              drop: Sequence[str] = ()) -> Dict[str, List[Any]]:
        """exists, counts: (env, identifier) pairs; schemas: env names; scalars: SQL whose first
        cell is returned as a string; drop: schema names. One dbt invocation."""
        args = {
            "exists": [[self.schemas[env], name] for env, name in exists],
            "schemas": [self.schemas[env] for env in schemas],
            "counts": [[self.schemas[env], name] for env, name in counts],
            "scalars": list(scalars),
            "drop": list(drop),
        }
        res = self.dbt("run-operation", "dbt_defer_testing_probe", "--args", json.dumps(args), "--log-level", "none")
        line = next(m for m in reversed(res.lines("dbt-defer-testing: ")))
        return json.loads(line[len("dbt-defer-testing: "):])

    def exists(self, env: str, *names: str) -> List[bool]:
        return self.probe(exists=[(env, n) for n in names])["exists"]

    def counts(self, *relations: str) -> List[int]:
        return [int(v) for v in self.probe(scalars=[f"select count(*) from {r}" for r in relations])["scalars"]]


def uid(name: str, kind: str = "model", package: str = PROJECT) -> str:
    return f"{kind}.{package}.{name}"
