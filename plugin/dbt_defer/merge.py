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
from typing import Any, Callable, FrozenSet, Iterable, Sequence

from dbt_defer.chain import Environment, Location, chain_choice

Warn = Callable[[str], None]


def assign_deferral(manifest: Any, environments: Sequence[Environment], restricted: FrozenSet[str],
                    exists: Callable[[Location], bool], warn: Warn) -> bool:
    """Every node's defer_relation is the chain's choice (None for restricted nodes and nodes no
    environment serves); True when functions changed."""
    from dbt.artifacts.resources import DeferRelation

    for uid, node in list(manifest.nodes.items()):
        if node.resource_type not in ("model", "seed", "snapshot") or node.is_ephemeral_model:
            continue
        defer_relation = None
        env = None if uid in restricted else chain_choice(environments, uid, exists)[0]
        if env is not None:
            database, schema, identifier = env.manifest.nodes[uid].location
            defer_relation = DeferRelation(
                database=database,
                schema=schema,
                alias=identifier,
                relation_name=None,
                resource_type=node.resource_type,
                name=node.name,
                description=node.description,
                compiled_code=None,
                meta=node.meta,
                tags=node.tags,
                config=node.config,
            )
        if getattr(node, "defer_relation", None) != defer_relation:
            manifest.nodes[uid] = with_defer_relation(manifest, node, defer_relation)
    return assign_function_deferral(manifest, environments, restricted, warn)


def assign_function_deferral(manifest: Any, environments: Sequence[Environment], restricted: FrozenSet[str],
                             warn: Warn) -> bool:
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
    flat = flat_graph.get("nodes", {}).get(node.unique_id) if isinstance(flat_graph, dict) else None
    if flat is not None:
        if defer_relation is None:
            flat["defer_relation"] = None
        else:  # DeferRelation.to_dict(omit_none=False), reusing the node's own serialized fields
            flat["defer_relation"] = {
                "database": defer_relation.database,
                "schema": defer_relation.schema,
                "alias": defer_relation.alias,
                "relation_name": defer_relation.relation_name,
                "resource_type": flat["resource_type"],
                "name": flat["name"],
                "description": flat["description"],
                "compiled_code": defer_relation.compiled_code,
                "meta": flat["meta"],
                "tags": flat["tags"],
                "config": flat["config"],
            }
    return new
