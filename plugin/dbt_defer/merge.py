"""The chain's choice, written into dbt's manifest (SPEC §4): every node's ``defer_relation``
and every function's ``defer_function`` become what the chain resolves them to, so dbt's own
consumers (``dbt clone``, unit-test inputs, foreign keys, ``function()``, the ``graph`` Jinja
variable) read exactly what refs read; restricted nodes get none.

Linear in nodes × environments and cheap at 20,000 nodes (bench/, SPEC §10): see
``with_defer_relation``. Imports ``chain`` (the per-node choice) and dbt's artifact classes
lazily; the existence check is a callable handed in (``warehouse``), never imported.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Optional, Sequence

from dbt_defer.artifact_schema import DECODE_ANY
from dbt_defer.chain import Environment, Location, first_serving
from dbt_defer.manifests import EnvNode

Warn = Callable[[str], None]


def assign_deferral(manifest: Any, environments: Sequence[Environment], restricted: FrozenSet[str],
                    exists: Callable[[Location], bool], warn: Warn, chosen: Optional[Dict[str, str]] = None) -> bool:
    """Every node's defer_relation is the chain's choice (None for restricted nodes and nodes no
    environment serves); True when functions changed. ``chosen`` gets unique_id -> the name of
    the environment each defer_relation and defer_function comes from (for the audit)."""
    chosen = {} if chosen is None else chosen
    for uid, node in list(manifest.nodes.items()):
        if node.resource_type not in ("model", "seed", "snapshot") or node.is_ephemeral_model:
            continue
        defer_relation = None
        env = None if uid in restricted else first_serving(environments, uid, exists)
        if env is not None:
            defer_relation = deferred_record(node, env.manifest.nodes[uid])
            chosen[uid] = env.name
        if getattr(node, "defer_relation", None) != defer_relation:
            manifest.nodes[uid] = with_defer_relation(manifest, node, defer_relation)
    return assign_function_deferral(manifest, environments, restricted, warn, chosen)


def deferred_record(node: Any, chosen: EnvNode) -> Any:
    """The ``DeferRelation`` dbt's own --defer would build from the chosen environment's node
    (``Manifest.merge_from_artifact``): its relation, relation_name, description, compiled_code
    (None for seeds, as dbt), meta, tags and config. Its config object is built when first read
    (``dbt clone``, the ``graph`` variable): dbt's config classes take ~0.1 ms a node to build,
    seconds at 20,000 nodes. A relation_name that does not render the node's own database,
    schema and alias (a foreign manifest: SPEC §7) is left out, as before (None)."""
    database, schema, identifier = chosen.location
    record = chosen.record
    if record is None:  # a node loaded without its record: the relation alone
        return _deferred_relation_class()(
            database=database, schema=schema, alias=identifier, relation_name=None,
            resource_type=node.resource_type, name=node.name, description=node.description,
            compiled_code=None, meta=node.meta, tags=node.tags, config=node.config,
        )
    relation = _deferred_relation_class()(
        database=database,
        schema=schema,
        alias=identifier,
        relation_name=record.relation_name if renders(record.relation_name, chosen.location) else None,
        resource_type=node.resource_type,
        name=node.name,
        description=_decoded(record.description, str, ""),
        compiled_code=None if node.resource_type == "seed" else _decoded(record.compiled_code, str, None),
        meta=_decoded(record.meta, dict, {}),
        tags=_decoded(record.tags, list, []),
        config=None,
    )
    relation.config_source = (record.config, node.config)
    return relation


_EMPTY = {b'""': str, b"{}": dict, b"[]": list}


def _decoded(raw: Any, kind: type, default: Any) -> Any:
    """A field of the environment's record, decoded; ``default`` when it has another type."""
    if len(raw) == 2 and _EMPTY.get(bytes(raw)) is kind:  # "", {}, [] (most descriptions, metas, tags)
        return kind()
    try:
        value = DECODE_ANY.decode(raw)
    except Exception:  # msgspec's errors: a record the loader accepted but this field is not JSON
        return default
    return value if isinstance(value, kind) else default


def renders(relation_name: Any, location: Location) -> bool:
    """Does ``relation_name`` name ``location`` (its parts, each quoted with " or ` or not at
    all, joined by dots; the database and schema may be left out, as dbt's include policy does)?
    The parts themselves are names ``untrusted`` accepted: no quotes, no comment markers."""
    if not isinstance(relation_name, str):
        return False
    parts = [p for p in location if p]
    if relation_name == '"' + '"."'.join(parts) + '"':  # the common case, decided at once
        return True
    return any(_joined(relation_name, parts[start:]) for start in range(len(parts)))


def _joined(text: str, parts: Sequence[str]) -> bool:
    pos = 0
    for i, part in enumerate(parts):
        quote = text[pos:pos + 1] if text[pos:pos + 1] in ('"', "`") else ""
        token = f"{quote}{part}{quote}"
        if not text.startswith(token, pos):
            return False
        pos += len(token)
        if i < len(parts) - 1:
            if text[pos:pos + 1] != ".":
                return False
            pos += 1
    return pos == len(text)


_DEFERRED_RELATION: List[Any] = []


def _deferred_relation_class() -> Any:
    """dbt's ``DeferRelation`` whose ``config`` is built from the chosen environment's record
    when first read (then kept): the same object for every reader, dbt's serializer included."""
    if not _DEFERRED_RELATION:
        from dbt.artifacts.resources import DeferRelation

        def get_config(self: Any) -> Any:
            values = self.__dict__
            source = values.get("config_source")
            if source is not None:  # two threads may both build it (equal); neither sees None
                raw, current = source
                config = _decoded(raw, dict, None)
                try:
                    values["config"] = type(current).from_dict(config) if config is not None else current
                except Exception:  # a config dbt cannot read: the project's own, as before
                    values["config"] = current
                values.pop("config_source", None)
            return values.get("config")

        def set_config(self: Any, value: Any) -> None:
            self.__dict__.pop("config_source", None)
            self.__dict__["config"] = value

        _DEFERRED_RELATION.append(type("DeferRelation", (DeferRelation,), {
            "config": property(get_config, set_config),
            "__module__": __name__,
        }))
    return _DEFERRED_RELATION[0]


def assign_function_deferral(manifest: Any, environments: Sequence[Environment], restricted: FrozenSet[str],
                             warn: Warn, chosen: Optional[Dict[str, str]] = None) -> bool:
    """dbt >= 1.11 functions: ``defer_function`` from the first environment whose
    run_results.json records the function as built; else from the first environment that
    lists it and did not fail it. (A function is not a relation: no listing can confirm it.)"""
    functions = getattr(manifest, "functions", None)
    if not functions:
        return False
    from dbt.artifacts.resources.v1.function import DeferFunction

    changed = False
    for uid, function in list(functions.items()):
        if uid in restricted:
            continue
        listing = [e for e in environments if uid in e.manifest.functions and not e.manifest.bad_status.get(uid)]
        built = [e for e in listing if uid in e.manifest.built]
        for env in built + [e for e in listing if e not in built]:
            raw = env.manifest.functions[uid]
            fields = {k: raw.get(k) for k in (
                "database", "schema", "alias", "arguments", "returns", "resource_type", "name",
                "description", "compiled_code", "meta", "tags", "config")}
            for key, empty in (("meta", {}), ("tags", []), ("arguments", []), ("description", "")):
                fields[key] = fields[key] or empty
            try:
                defer_fn = DeferFunction.from_dict(fields)
            except Exception as exc:  # an unreadable record: that environment cannot serve it
                warn(f"dbt-defer: environment '{env.name}': cannot read function {uid} ({exc}); skipped")
                continue
            functions[uid] = dataclasses.replace(function, defer_function=defer_fn)
            if chosen is not None:
                chosen[uid] = env.name
            changed = True
            break
    if changed and hasattr(manifest, "_function_lookup"):
        manifest._function_lookup = None
    return changed


def drop_deferral(manifest: Any, unique_ids: Iterable[str]) -> bool:
    """Native mode: these nodes (restricted) lose dbt's own deferral."""
    changed = False
    for uid in unique_ids:
        node = manifest.nodes.get(uid)
        if node is not None and getattr(node, "defer_relation", None) is not None:
            manifest.nodes[uid] = with_defer_relation(manifest, node, None)
            changed = True
    return changed


def with_defer_relation(manifest: Any, node: Any, defer_relation: Any) -> Any:
    """``node`` with ``defer_relation`` set, for ``manifest.nodes[uid]``; the 'graph' Jinja
    variable (``manifest.flat_graph``) gets the same ``defer_relation``.

    Linear and cheap at 20k nodes (bench/, SPEC §10): a shallow copy instead of dbt's
    ``dataclasses.replace`` (which re-runs the node's __init__, ~5x slower), and the flat graph
    patched in place instead of ``build_flat_graph`` (which serializes every node again: seconds
    at 20k). The result equals what dbt's replace + build_flat_graph would give (tests/test_merge.py).
    """
    new = copy.copy(node)
    new.defer_relation = defer_relation
    flat_graph = getattr(manifest, "flat_graph", None)
    # dbt <= 1.11 keeps the 'graph' variable as dicts; later dbt serializes each node when read
    # (a view: nothing to patch, and reading it here would serialize every node)
    nodes = flat_graph.get("nodes") if isinstance(flat_graph, dict) else None
    flat = nodes.get(node.unique_id) if type(nodes) is dict else None
    if flat is not None:
        if defer_relation is None:
            flat["defer_relation"] = None
        else:  # DeferRelation.to_dict(omit_none=False); the config as its record holds it
            source = getattr(defer_relation, "__dict__", {}).get("config_source")
            config = _decoded(source[0], dict, None) if source is not None else None
            flat["defer_relation"] = {
                "database": defer_relation.database,
                "schema": defer_relation.schema,
                "alias": defer_relation.alias,
                "relation_name": defer_relation.relation_name,
                "resource_type": flat["resource_type"],
                "name": flat["name"],
                "description": defer_relation.description,
                "compiled_code": defer_relation.compiled_code,
                "meta": defer_relation.meta,
                "tags": defer_relation.tags,
                "config": config if config is not None else flat["config"],
            }
    return new
