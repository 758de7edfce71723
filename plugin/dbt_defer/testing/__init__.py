"""The dbt-defer adapter conformance suite, in dbt-tests-adapter's style.

An adapter maintainer runs it against their own warehouse by subclassing the ``Base*`` classes
and providing a ``dbt_profile_target`` fixture (the same fixture dbt-tests-adapter uses)::

    # tests/functional/test_dbt_defer.py
    import pytest
    from dbt_defer.testing import *  # noqa: F403  (the Base* classes)

    @pytest.fixture(scope="class")
    def dbt_profile_target():
        return {"type": "postgres", "host": "localhost", "port": 5432, "user": "postgres",
                "password": "", "dbname": "test", "threads": 4}

    class TestChainPerNode(BaseChainPerNode): pass
    class TestDevRelations(BaseDevRelations): pass
    ...

Optional fixtures: ``project_config_update`` (a dict merged into dbt_project.yml, e.g. a
``+file_format``) and ``dbt_defer_package`` (the packages.yml entry of the dbt_defer macro
package; default: the checkout this module is installed from, or ``DBT_DEFER_PACKAGE_DIR``).

How it works: one small jaffle-shop-like project is built once per profile and session into two
schemas, ``<prefix>_prod`` (in full) and ``<prefix>_staging`` (staging layer + orders only), and
their artifacts are kept. Each test class gets its own copy of the project, with its own dev
schema and its own copy of the artifacts, so classes never see each other's dev relations or
file edits. dbt runs in-process (``dbtRunner``): on engines with a slow start (Spark's JVM)
one process runs every class. Every warehouse check goes through dbt itself (a run-operation
of the project's ``dbt_defer_testing_probe`` macro), so nothing here is adapter-specific; the
relations expected in the audit are the ``relation_name`` dbt itself wrote into each
environment's manifest. All schemas are dropped when the pytest session finishes (keep session
fixtures your profile needs, e.g. a SparkSession, alive until then).
"""

from dbt_defer.testing.cases_features import (
    BaseAuditExactness,
    BaseExplain,
    BaseLimits,
    BaseMetadataQueries,
    BaseNeverDefer,
    BaseUnitTests,
    BaseWriteGuard,
)
from dbt_defer.testing.cases_rules import (
    BaseChainPerNode,
    BaseDevRelations,
    BaseEphemeral,
    BaseSchemasAndIdentifiers,
    BaseVersionsAndPackages,
)
from dbt_defer.testing.files import save_artifacts
from dbt_defer.testing.project import DeferProject
from dbt_defer.testing.runner import DbtResult, dbt_environment, run_dbt

__all__ = [
    "BaseChainPerNode",
    "BaseDevRelations",
    "BaseEphemeral",
    "BaseVersionsAndPackages",
    "BaseSchemasAndIdentifiers",
    "BaseLimits",
    "BaseNeverDefer",
    "BaseWriteGuard",
    "BaseAuditExactness",
    "BaseMetadataQueries",
    "BaseUnitTests",
    "BaseExplain",
    "DeferProject",
    "DbtResult",
    "dbt_environment",
    "run_dbt",
    "save_artifacts",
]
