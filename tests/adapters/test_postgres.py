"""The adapter conformance suite (dbt_defer.testing) on Postgres: one subclass per base class.

The server comes from DBT_DEFER_TEST_PG_*; unreachable, the tests skip (fail under CI=true).
"""

import pytest

from conftest import require_adapter
from dbt_harness import pg_settings

from dbt_defer.testing import (
    BaseAuditExactness,
    BaseChainPerNode,
    BaseDevRelations,
    BaseEphemeral,
    BaseExplain,
    BaseLimits,
    BaseMetadataQueries,
    BaseNeverDefer,
    BaseSchemasAndIdentifiers,
    BaseUnitTests,
    BaseVersionsAndPackages,
    BaseWriteGuard,
)


@pytest.fixture(scope="class")
def dbt_profile_target():
    require_adapter("postgres")
    s = pg_settings()
    return {
        "type": "postgres", "host": s["host"], "port": int(s["port"]), "user": s["user"],
        "password": s["password"], "dbname": s["dbname"], "threads": 4,
    }


class TestChainPerNodePostgres(BaseChainPerNode):
    pass


class TestDevRelationsPostgres(BaseDevRelations):
    pass


class TestEphemeralPostgres(BaseEphemeral):
    pass


class TestVersionsAndPackagesPostgres(BaseVersionsAndPackages):
    pass


class TestSchemasAndIdentifiersPostgres(BaseSchemasAndIdentifiers):
    pass


class TestLimitsPostgres(BaseLimits):
    pass


class TestNeverDeferPostgres(BaseNeverDefer):
    pass


class TestWriteGuardPostgres(BaseWriteGuard):
    pass


class TestAuditExactnessPostgres(BaseAuditExactness):
    pass


class TestMetadataQueriesPostgres(BaseMetadataQueries):
    pass


class TestUnitTestsPostgres(BaseUnitTests):
    pass


class TestExplainPostgres(BaseExplain):
    pass
