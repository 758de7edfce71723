"""The adapter conformance suite (dbt_defer.testing) on DuckDB: one subclass per base class."""

import pytest

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


@pytest.fixture(scope="session")
def duckdb_path(tmp_path_factory):
    return str(tmp_path_factory.mktemp("duckdb") / "warehouse.duckdb")


@pytest.fixture(scope="class")
def dbt_profile_target(duckdb_path):
    return {"type": "duckdb", "path": duckdb_path, "threads": 4}


class TestChainPerNodeDuckDB(BaseChainPerNode):
    pass


class TestDevRelationsDuckDB(BaseDevRelations):
    pass


class TestEphemeralDuckDB(BaseEphemeral):
    pass


class TestVersionsAndPackagesDuckDB(BaseVersionsAndPackages):
    pass


class TestSchemasAndIdentifiersDuckDB(BaseSchemasAndIdentifiers):
    pass


class TestLimitsDuckDB(BaseLimits):
    pass


class TestNeverDeferDuckDB(BaseNeverDefer):
    pass


class TestWriteGuardDuckDB(BaseWriteGuard):
    pass


class TestAuditExactnessDuckDB(BaseAuditExactness):
    pass


class TestMetadataQueriesDuckDB(BaseMetadataQueries):
    pass


class TestUnitTestsDuckDB(BaseUnitTests):
    pass


class TestExplainDuckDB(BaseExplain):
    pass
