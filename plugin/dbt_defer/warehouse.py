"""The warehouse room: does a relation exist? Listing, quoting, and the name checks made
before any name reaches a metadata query (SPEC §7).

Owns ``ExistenceChecker`` (backed by dbt's relation cache and adapter). Imports ``untrusted``
(its name rule) and ``chain`` (the ``Location`` type) only; it never decides which environment
wins (``resolution``, ``chain``) and never writes.
"""

from __future__ import annotations

import concurrent.futures
import re
import threading
from typing import Any, Dict, FrozenSet, List, Optional, Tuple

from dbt_defer.untrusted import unsafe_name
from dbt_defer.chain import Location

_DBT_CACHED: FrozenSet[str] = frozenset({"<cached by dbt>"})  # sentinel: ask dbt's live cache
_BARE_WORD = re.compile(r"^[\w$-]+$")  # what may be rendered unquoted (any script's letters)
# engines whose names are case-insensitive even when quoted (Redshift folds quoted names too,
# unless enable_case_sensitive_identifier); elsewhere (Postgres, Snowflake, BigQuery, ...) a
# quoted "PROD" is another schema than prod
_CASE_INSENSITIVE = frozenset({"duckdb", "spark", "databricks", "sqlite", "redshift"})
_PARTS = ("database", "schema", "identifier")
_UNCHECKED: Any = object()  # ExistenceChecker._schemas: not yet checked


def _unquoted_parts(adapter: Any) -> FrozenSet[str]:
    """The parts of a relation name this project renders unquoted (adapter default + quoting:)."""
    try:
        policy = dict(adapter.Relation.get_default_quote_policy().to_dict(omit_none=True))
        policy.update(getattr(adapter.config, "quoting", None) or {})
    except Exception:  # unknown: the strict rule for every part
        return frozenset({"database", "schema", "identifier"})
    return frozenset(p for p in ("database", "schema", "identifier") if not policy.get(p, False))


def add_to_dbt_cache(cache: Any, relations: List[Any]) -> None:
    """Put listed relations into dbt's relation cache as dbt's own cache population does
    (``RelationsCache.add``), without its per-relation debug event: that event costs ~0.2 ms
    (it is written to logs/dbt.log), seconds for a schema of 20,000 relations, and is most of
    what listing a large schema costs (bench/, SPEC §10). Uses the cache's ``lock``,
    ``_setdefault`` and ``_CachedRelation``, exactly what ``add`` does after its event
    (dbt-adapters 1.x, checked with dbt-core 1.8 and 1.11); when those are not there, the
    public ``add`` for each relation."""
    try:
        from dbt.adapters.cache import _CachedRelation

        lock, setdefault = cache.lock, cache._setdefault
    except (ImportError, AttributeError):
        for relation in relations:
            cache.add(relation)
        return
    with lock:
        for relation in relations:
            setdefault(_CachedRelation(relation))


class ExistenceChecker:
    """Does a relation exist? Backed by dbt's relation cache.

    Every (database, schema) is settled once, under a per-schema lock: a schema dbt cached
    before the run is looked up in dbt's live cache; any other schema is listed once (one
    metadata query) and what was found also goes into dbt's cache. No thread ever reads a
    schema while another is still listing it.
    """

    def __init__(self, adapter: Any) -> None:
        self.adapter = adapter
        self._lock = threading.Lock()
        self._schema_locks: Dict[Tuple[str, str], threading.Lock] = {}
        self._listed: Dict[Tuple[str, str], FrozenSet[str]] = {}
        self.queries: Dict[Tuple[str, str], int] = {}
        self._unquoted: Optional[FrozenSet[str]] = None
        self._exact: Optional[FrozenSet[str]] = None
        # (database, schema) as located -> its key, or None when not safe (exists)
        self._schemas: Dict[Tuple[Optional[str], Optional[str]], Optional[Tuple[str, str]]] = {}

    def _exact_parts(self) -> FrozenSet[str]:
        """The parts compared case-sensitively: quoted ones, on an engine where quoting keeps case."""
        if self._unquoted is None:
            self._unquoted = _unquoted_parts(self.adapter)
        try:
            kind = str(self.adapter.type()).lower()
        except Exception:
            kind = ""
        if kind in _CASE_INSENSITIVE:
            return frozenset()
        return frozenset(_PARTS) - self._unquoted

    def _norm(self, part: str, value: Optional[str]) -> str:
        """A name as this adapter compares it (SPEC §7: no case folding where case matters)."""
        value = value or ""
        return value if part in self._exact else value.lower()

    def _key(self, database: Optional[str], schema: Optional[str]) -> Tuple[str, str]:
        database = database or getattr(self.adapter.config.credentials, "database", "") or ""
        return (self._norm("database", database), self._norm("schema", schema))

    def exists(self, location: Location) -> bool:
        database, schema, identifier = location
        # the checks of a (database, schema) made once: the merge asks of every node of every
        # environment, a few schemas in all (bench 3b)
        key = self._schemas.get((database, schema), _UNCHECKED)
        if key is _UNCHECKED:
            key = self._schema_checks(database, schema)
        if key is None or not self._safe((None, None, identifier)):
            return False  # never pasted into a metadata query (SPEC §7); the reader said why
        listed = self._listed.get(key)
        if listed is None:
            listed = self._settle(key, database, schema)
        if listed is _DBT_CACHED:
            try:
                return self.adapter.get_relation(database, schema, identifier) is not None
            except Exception as exc:  # "PROD" asked, prod cached: another relation (dbt's approximate match)
                if type(exc).__name__ == "ApproximateMatchError":
                    return False
                raise
        return self._norm("identifier", identifier) in listed

    def _schema_checks(self, database: Optional[str], schema: Optional[str]) -> Optional[Tuple[str, str]]:
        """The key of (database, schema) as compared, or None when either is not a safe name."""
        if not self._safe((database, schema, None)):
            key = None
        else:
            if self._exact is None:
                self._exact = self._exact_parts()
            key = self._key(database, schema)
        self._schemas[(database, schema)] = key
        return key

    def _safe(self, location: Location) -> bool:
        """Every part can be a SQL name (untrusted.unsafe_name); a part the adapter renders
        unquoted (quoting off) must moreover be one word (letters, digits, _, $, -)."""
        if self._unquoted is None:
            self._unquoted = _unquoted_parts(self.adapter)
        for part, value in zip(("database", "schema", "identifier"), location):
            if value is None:
                continue
            if unsafe_name(value) is not None:
                return False
            if part in self._unquoted and not _BARE_WORD.match(value):
                return False
        return True

    def _settle(self, key: Tuple[str, str], database: Optional[str], schema: Optional[str]) -> FrozenSet[str]:
        with self._lock:
            schema_lock = self._schema_locks.setdefault(key, threading.Lock())
        with schema_lock:
            listed = self._listed.get(key)
            if listed is not None:
                return listed
            adapter = self.adapter
            # dbt's cache folds case: a schema whose case matters here ("PROD" beside prod) is
            # neither read from it nor added to it (it would stand in for dbt's own prod)
            folds = key == (key[0].lower(), key[1].lower())
            # Only this lock's holder adds this schema to dbt's cache, so if it is there now,
            # dbt cached it itself (complete, and kept current by dbt as the run writes).
            if folds and (database, schema) in adapter.cache:
                self._listed[key] = _DBT_CACHED
                return _DBT_CACHED
            schema_relation = adapter.Relation.create(
                database=database, schema=schema, identifier="", quote_policy=adapter.config.quoting
            ).without_identifier()
            listing = self._list(schema_relation, f"list_{database}_{schema}")
            self.queries[key] = self.queries.get(key, 0) + 1
            # Adapters list with LIKE/ILIKE (dbt-postgres: schemaname ilike 'pro%'): a listed
            # relation counts only if its own database and schema are the ones asked for
            relations = [r for r in listing if self._own(r, key)]
            if folds:
                add_to_dbt_cache(adapter.cache, relations)
                adapter.cache.update_schemas([(database, schema)])
            listed = frozenset(self._norm("identifier", r.identifier) for r in relations)
            self._listed[key] = listed
            return listed

    def _own(self, relation: Any, key: Tuple[str, str]) -> bool:
        """Is a listed relation in exactly the (database, schema) asked for?"""
        database = getattr(relation, "database", None)
        schema = getattr(relation, "schema", None)
        if schema is not None and self._norm("schema", schema) != key[1]:
            return False
        return database is None or self._norm("database", database) == key[0]

    def _list(self, schema_relation: Any, name: str) -> List[Any]:
        """One metadata query on a connection of its own, in its own thread, as dbt's own
        cache population does: the caller's connection (dbt's "master" while deferral is
        merged, or a node's) is never renamed, released or left inside a transaction."""

        def work() -> List[Any]:
            with self.adapter.connection_named(name):
                return list(self.adapter.list_relations_without_caching(schema_relation))

        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(work).result()
