import os
import shutil

import pytest

from dbt_harness import make_project, postgres_reachable

ADAPTERS = ["duckdb", "postgres"]


def require_adapter(adapter: str) -> None:
    if adapter != "postgres":
        return
    problem = postgres_reachable()
    if problem is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"Postgres is unreachable under CI=true ({problem}); start it, the Postgres tests must run")
    pytest.skip(f"Postgres unreachable: {problem}")


def built_environments(project) -> None:
    """prod built in full; staging built in part (staging layer + orders only)."""
    project.dbt("deps")
    project.dbt("build", "--target", "prod")
    project.save_artifacts("prod-artifacts")
    project.dbt("build", "--target", "staging", "-s", "raw_customers", "raw_orders", "stg_customers", "stg_orders", "orders")
    project.save_artifacts("staging-artifacts")


@pytest.fixture(scope="module", params=ADAPTERS)
def envs(request, tmp_path_factory):
    """A project with prod and (part of) staging built, per adapter; shared by a module's tests."""
    adapter = request.param
    require_adapter(adapter)
    project = make_project(tmp_path_factory.mktemp(adapter), adapter)
    built_environments(project)
    yield project
    project.drop_schemas()
