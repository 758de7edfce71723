"""Real dbt runs for the tests: a copy of integration_tests/ per adapter, profiles per run.

Each test project gets its own DuckDB file, or its own schema prefix on the Postgres server,
so tests never see each other's relations. dbt runs in-process through ``dbtRunner``.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from dbt_defer.testing.project import ProjectFolder
from dbt_defer.testing.runner import DbtResult, dbt_environment

REPO = Path(__file__).resolve().parents[1]
INTEGRATION = REPO / "integration_tests"


def pg_settings() -> Dict[str, str]:
    return {
        "host": os.environ.get("DBT_DEFER_TEST_PG_HOST", "127.0.0.1"),
        "port": os.environ.get("DBT_DEFER_TEST_PG_PORT", "5432"),
        "user": os.environ.get("DBT_DEFER_TEST_PG_USER", "postgres"),
        "password": os.environ.get("DBT_DEFER_TEST_PG_PASSWORD", ""),
        "dbname": os.environ.get("DBT_DEFER_TEST_PG_DBNAME", "test"),
    }


def pg_connect():
    import psycopg2

    s = pg_settings()
    return psycopg2.connect(
        host=s["host"], port=int(s["port"]), user=s["user"], password=s["password"], dbname=s["dbname"],
        connect_timeout=3,
    )


def postgres_reachable() -> Optional[str]:
    try:
        pg_connect().close()
        return None
    except Exception as exc:  # psycopg2.OperationalError and friends
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


Result = DbtResult  # success, exception, messages, raw; text(), statuses(), node_results()


@dataclass
class Project(ProjectFolder):
    root: Path
    adapter: str
    schema_prefix: str
    duckdb_path: Optional[Path] = None
    created_schemas: List[str] = field(default_factory=list)

    # --- paths --------------------------------------------------------------------
    def schema(self, env: str) -> str:
        return f"{self.schema_prefix}_{env}"

    @property
    def database(self) -> str:
        return pg_settings()["dbname"] if self.adapter == "postgres" else self.duckdb_path.stem

    # --- files --------------------------------------------------------------------
    def compiled(self, rel_path: str) -> str:
        """Compiled SQL of a node, e.g. 'models/marts/customers.sql'."""
        return (self.target / "compiled" / "dbt_defer_integration_tests" / rel_path).read_text()

    def uid(self, name: str, kind: str = "model") -> str:
        return f"{kind}.dbt_defer_integration_tests.{name}"

    # --- dbt ----------------------------------------------------------------------
    def relation_exists(self, env: str, name: str) -> bool:
        return name.lower() in self.list_relations(env)

    def list_relations(self, env: str) -> List[str]:
        schema = self.schema(env)
        if self.adapter == "postgres":
            with pg_connect() as conn, conn.cursor() as cur:
                cur.execute(
                    "select table_name from information_schema.tables where table_schema = %s", (schema,)
                )
                return sorted(r[0] for r in cur.fetchall())
        with _duckdb_connect(self.duckdb_path) as con:
            rows = con.execute(
                "select table_name from information_schema.tables where table_schema = ?", [schema]
            ).fetchall()
        return sorted(r[0] for r in rows)

    def query(self, sql: str) -> list:
        if self.adapter == "postgres":
            with pg_connect() as conn, conn.cursor() as cur:
                cur.execute(sql)
                return cur.fetchall()
        with _duckdb_connect(self.duckdb_path) as con:
            return con.execute(sql).fetchall()

    def drop_schemas(self) -> None:
        if self.adapter != "postgres":
            return
        with pg_connect() as conn, conn.cursor() as cur:
            cur.execute(
                "select schema_name from information_schema.schemata where schema_name like %s",
                (self.schema_prefix + "%",),
            )
            for (name,) in cur.fetchall():
                cur.execute(f'drop schema if exists "{name}" cascade')


def _duckdb_connect(path: Path):
    """Read-only when possible; dbt-duckdb keeps its own (read-write) handle open in-process after a
    run, and DuckDB refuses a second handle with another configuration, so then use the default."""
    import duckdb

    try:
        return duckdb.connect(str(path), read_only=True)
    except duckdb.ConnectionException:
        return duckdb.connect(str(path))


_environment = dbt_environment  # the one clean environment for a dbt run (dbt_defer.testing)


def _profiles(project: Project, threads: int) -> str:
    lines = ["dbt_defer_integration_tests:", "  target: dev", "  outputs:"]
    for target in ("prod", "staging", "dev", "ci"):
        lines.append(f"    {target}:")
        if project.adapter == "duckdb":
            lines += [
                "      type: duckdb",
                f"      path: '{project.duckdb_path}'",
            ]
        else:
            s = pg_settings()
            lines += [
                "      type: postgres",
                f"      host: '{s['host']}'",
                f"      port: {int(s['port'])}",
                f"      user: '{s['user']}'",
                f"      password: '{s['password']}'",
                f"      dbname: '{s['dbname']}'",
            ]
        env = "dev" if target == "ci" else target
        lines += [f"      schema: {project.schema(env)}", f"      threads: {threads}"]
    return "\n".join(lines) + "\n"


def make_project(tmp: Path, adapter: str, threads: int = 4, source: Path = INTEGRATION) -> Project:
    root = tmp / "project"
    shutil.copytree(
        source, root, ignore=shutil.ignore_patterns("target", "dbt_packages", "logs", "*.duckdb", "profiles.yml")
    )
    packages = (root / "packages.yml").read_text().replace("local: ../", f"local: {REPO}/", 1)
    (root / "packages.yml").write_text(packages)
    prefix = f"dd_{uuid.uuid4().hex[:8]}"
    project = Project(root=root, adapter=adapter, schema_prefix=prefix)
    if adapter == "duckdb":
        project.duckdb_path = tmp / "warehouse.duckdb"
    (root / "profiles.yml").write_text(_profiles(project, threads))
    return project
