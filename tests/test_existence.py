"""ExistenceChecker under threads: one listing per schema, and no thread reads a half-listed schema.

A fake adapter stands in for dbt's (the real one is exercised by every integration test); its
cache adds relations slowly, so a reader that trusted the cache mid-listing would miss the last one.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from types import SimpleNamespace

from dbt_defer.warehouse import ExistenceChecker


@dataclass(frozen=True)
class FakeRelation:
    database: str
    schema: str
    identifier: str = ""

    def without_identifier(self):
        return FakeRelation(self.database, self.schema, "")


class FakeCache:
    def __init__(self, cached=()):
        self.schemas = {(d.lower(), s.lower()) for d, s in cached}
        self.relations = set()

    def __contains__(self, key):
        return (key[0].lower(), key[1].lower()) in self.schemas

    def add(self, relation):
        self.schemas.add((relation.database.lower(), relation.schema.lower()))  # as dbt's cache does
        time.sleep(0.01)
        self.relations.add((relation.database.lower(), relation.schema.lower(), relation.identifier.lower()))

    def update_schemas(self, schemas):
        self.schemas.update((d.lower(), s.lower()) for d, s in schemas)


class FakeAdapter:
    def __init__(self, warehouse, cached=()):
        self.warehouse = warehouse  # schema -> identifiers
        self.cache = FakeCache(cached)
        for database, schema in cached:
            for ident in warehouse.get(schema, []):
                self.cache.relations.add((database, schema, ident))
        self.config = SimpleNamespace(credentials=SimpleNamespace(database="db"), quoting={})
        self.Relation = SimpleNamespace(
            create=lambda database, schema, identifier, quote_policy: FakeRelation(database, schema, identifier)
        )
        self.listed = []
        self.connections = []  # (connection name, thread) of each listing

    @contextlib.contextmanager
    def connection_named(self, name):
        self.connections.append((name, threading.current_thread().name))
        yield

    def list_relations_without_caching(self, schema_relation):
        self.listed.append(schema_relation.schema)
        time.sleep(0.05)
        return [FakeRelation("db", schema_relation.schema, i) for i in self.warehouse.get(schema_relation.schema, [])]

    def get_relation(self, database, schema, identifier):
        found = (database.lower(), schema.lower(), identifier.lower()) in self.cache.relations
        return FakeRelation(database, schema, identifier) if found else None


def _hammer(checker, location, threads=8):
    """Threads arrive one by one over the listing (0.05 s) and the cache filling (0.1 s)."""
    results = []

    def work(i):
        time.sleep(i * 0.015)
        results.append(checker.exists(location))

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return results


def test_threads_never_see_a_half_listed_schema_and_list_it_once():
    idents = [f"t{i}" for i in range(10)]
    adapter = FakeAdapter({"prod": idents})
    checker = ExistenceChecker(adapter)
    results = _hammer(checker, ("db", "prod", "t9"))  # the last relation the listing adds
    assert results == [True] * 8
    assert adapter.listed == ["prod"]
    assert checker.queries == {("db", "prod"): 1}
    assert checker.exists(("db", "PROD", "T3")) and not checker.exists(("db", "prod", "nope"))
    assert adapter.listed == ["prod"]


def test_a_schema_dbt_cached_is_read_from_dbts_cache_without_a_query():
    adapter = FakeAdapter({"dev": ["a"]}, cached=[("db", "dev")])
    checker = ExistenceChecker(adapter)
    assert _hammer(checker, ("db", "dev", "a")) == [True] * 8
    assert not checker.exists(("db", "dev", "b"))
    adapter.cache.relations.add(("db", "dev", "b"))  # dbt's cache stays live for its own schemas
    assert checker.exists(("db", "dev", "b"))
    assert adapter.listed == [] and checker.queries == {}


def test_an_empty_or_missing_schema_is_listed_once():
    adapter = FakeAdapter({})
    checker = ExistenceChecker(adapter)
    assert _hammer(checker, ("db", "staging", "x")) == [False] * 8
    assert adapter.listed == ["staging"]


def test_listing_runs_on_its_own_named_connection_in_its_own_thread():
    """Never on the caller's connection: during the merge that is dbt's "master", which a listing
    would leave inside a transaction (dbt 1.8 + dbt-duckdb: every on-run-start hook then failed)."""
    adapter = FakeAdapter({"prod": ["a"]})
    checker = ExistenceChecker(adapter)
    assert checker.exists(("db", "prod", "a"))
    [(name, thread)] = adapter.connections
    assert name == "list_db_prod" and thread != threading.current_thread().name


def test_listed_relations_go_into_dbts_real_cache_without_one_event_each():
    """With dbt's own RelationsCache: what the checker listed is in dbt's cache (dbt's later
    get_relation needs no query), put there without RelationsCache.add's per-relation event."""
    from dbt.adapters.base.relation import BaseRelation
    from dbt.adapters.cache import RelationsCache

    adapter = FakeAdapter({})
    adapter.cache = RelationsCache()
    adapter.list_relations_without_caching = lambda schema_relation: [
        BaseRelation.create(database="db", schema=schema_relation.schema, identifier=f"m{i}", type="view")
        for i in range(3)
    ]

    def no_add(relation):
        raise AssertionError("RelationsCache.add fires an event per relation: not on this path")

    adapter.cache.add = no_add
    checker = ExistenceChecker(adapter)
    assert checker.exists(("db", "prod", "m1")) and not checker.exists(("db", "prod", "m9"))
    assert ("db", "prod") in adapter.cache
    assert sorted(r.identifier for r in adapter.cache.get_relations("db", "prod")) == ["m0", "m1", "m2"]


# --- names compared exactly (issue 22, item 6): a real dbt run on Postgres ----------------------

import json  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def pg_prod(tmp_path_factory):
    from conftest import require_adapter
    from dbt_harness import make_project

    require_adapter("postgres")
    p = make_project(tmp_path_factory.mktemp("existence"), "postgres")
    p.dbt("deps")
    p.dbt("build", "--target", "prod", "-s", "raw_customers", "stg_customers")
    p.save_artifacts("prod-artifacts")
    yield p
    p.drop_schemas()
    _drop(p.schema("prod").upper())


def _drop(schema: str) -> None:
    from dbt_harness import pg_connect

    with pg_connect() as conn, conn.cursor() as cur:
        cur.execute(f'drop schema if exists "{schema}" cascade')


def _foreign_state(p, schema: str):
    """staging's artifacts: prod's, but staging records stg_customers in ``schema``."""
    state = p.root / "foreign-artifacts"
    if state.exists():
        shutil.rmtree(state)
    shutil.copytree(p.root / "prod-artifacts", state)
    manifest = json.loads((state / "manifest.json").read_text())
    manifest["nodes"][p.uid("stg_customers")]["schema"] = schema
    (state / "manifest.json").write_text(json.dumps(manifest))
    return state


@pytest.mark.postgres
@pytest.mark.parametrize("variant", ["percent", "underscore", "upper"])
def test_a_listed_relation_matches_only_its_own_schema_on_postgres(pg_prod, variant):
    """dbt-postgres lists a schema with ``schemaname ilike '<schema>'``: staging's record of
    stg_customers in schema ``..._pro%``, ``..._pro_`` or ``"..._PROD"`` (none exists) matched prod's
    relations and was reported as existing, so the ref was read from a relation that is not
    there. Each listed relation now counts only in its own schema: the ref falls through to prod.
    And a schema whose case differs but which exists ("..._PROD" on Postgres) is found."""
    p = pg_prod
    prod = p.schema("prod")
    schema = {"percent": prod[:-1] + "%", "underscore": prod[:-1] + "_", "upper": prod.upper()}[variant]
    env = {
        "DBT_DEFER": "1",
        "DBT_DEFER_STAGING_STATE": str(_foreign_state(p, schema)),
        "DBT_DEFER_PROD_STATE": str(p.root / "prod-artifacts"),
    }
    key = (p.uid("dim_customers.v1"), p.uid("stg_customers"))
    p.dbt("compile", "-s", "dim_customers_v1", env=env)
    record = p.resolutions()[key]
    assert record["env"] == "prod", record
    assert f'"{prod}"."stg_customers"' in p.compiled("models/marts/dim_customers_v1.sql")
    if variant != "upper":
        return
    from dbt_harness import pg_connect

    with pg_connect() as conn, conn.cursor() as cur:  # now "..._PROD" exists, beside ..._prod
        cur.execute(f'create schema "{schema}"')
        cur.execute(f'create table "{schema}".stg_customers as select * from "{prod}".stg_customers')
    try:
        p.dbt("compile", "-s", "dim_customers_v1", env=env)
        assert p.resolutions()[key]["env"] == "staging"
    finally:
        _drop(schema)
