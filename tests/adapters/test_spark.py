"""The adapter conformance suite (dbt_defer.testing) on Spark: one subclass per base class.

dbt-spark's ``session`` method on a local Spark (pyspark 3.5, Java 17), with a Hive metastore
(Derby) and a warehouse folder under the session's temp folder. Spark's JVM takes tens of
seconds to start, so one SparkSession serves every class: it is created here, before the first
dbt call, and dbt-spark's ``SparkSession.builder.getOrCreate()`` then returns it.

Run by ``scripts/test-spark`` (its own virtual environment, dbt 1.11); skipped where dbt-spark
or pyspark is not installed, unless DBT_DEFER_TEST_SPARK=require (set by scripts/test-spark).
"""

import os
import shutil

import pytest

try:
    import dbt.adapters.spark  # noqa: F401
    import pyspark  # noqa: F401
except ImportError as exc:
    if os.environ.get("DBT_DEFER_TEST_SPARK") == "require":
        raise ImportError(f"{exc}: scripts/test-spark installs dbt-spark[session] and pyspark") from None
    pytest.skip("dbt-spark[session] and pyspark are not installed here; scripts/test-spark runs this suite",
                allow_module_level=True)
if shutil.which("java") is None:
    pytest.fail("Spark needs Java 17 on PATH (apt-get install openjdk-17-jre-headless)", pytrace=False)

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
def spark_session(tmp_path_factory):
    from pyspark.sql import SparkSession

    root = tmp_path_factory.mktemp("spark")
    session = (
        SparkSession.builder.master("local[2]")
        .appName("dbt-defer-conformance")
        .config("spark.sql.warehouse.dir", str(root / "warehouse"))
        .config("spark.hadoop.javax.jdo.option.ConnectionURL",
                f"jdbc:derby:;databaseName={root / 'metastore_db'};create=true")
        .config("spark.driver.extraJavaOptions",
                f"-Dderby.system.home={root} -Dderby.stream.error.file={root / 'derby.log'}")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.default.parallelism", "2")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.session.timeZone", "UTC")
        .enableHiveSupport()
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    # not stopped here: the suite drops its schemas when the pytest session finishes, through
    # dbt-spark, which would otherwise start a new session; the JVM ends with the process
    return session


@pytest.fixture(scope="class")
def dbt_profile_target(spark_session):
    return {"type": "spark", "method": "session", "host": "localhost", "threads": 2}


class TestChainPerNodeSpark(BaseChainPerNode):
    pass


class TestDevRelationsSpark(BaseDevRelations):
    pass


class TestEphemeralSpark(BaseEphemeral):
    pass


class TestVersionsAndPackagesSpark(BaseVersionsAndPackages):
    pass


class TestSchemasAndIdentifiersSpark(BaseSchemasAndIdentifiers):
    pass


class TestLimitsSpark(BaseLimits):
    pass


class TestNeverDeferSpark(BaseNeverDefer):
    pass


class TestWriteGuardSpark(BaseWriteGuard):
    pass


class TestAuditExactnessSpark(BaseAuditExactness):
    pass


class TestMetadataQueriesSpark(BaseMetadataQueries):
    pass


class TestUnitTestsSpark(BaseUnitTests):
    pass


class TestExplainSpark(BaseExplain):
    pass
