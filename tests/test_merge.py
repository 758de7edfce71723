"""The chain's merge into dbt's manifest (SPEC §4, §10): every node's defer_relation, in
``manifest.nodes`` and in the 'graph' Jinja variable, exactly as dbt's own
``dataclasses.replace`` + ``build_flat_graph`` would give, without their cost."""

from __future__ import annotations

import dataclasses

from dbt.artifacts.resources import DeferRelation
from dbt.artifacts.schemas.manifest import WritableManifest
from dbt.contracts.graph.manifest import Manifest

from dbt_defer.manifests import load_manifest
from dbt_defer.merge import deferred_record, renders, with_defer_relation


def test_with_defer_relation_equals_dbts_replace_and_flat_graph(envs):
    path = envs.root / "prod-artifacts" / "manifest.json"
    manifest = Manifest.from_writable_manifest(WritableManifest.read_and_check_versions(str(path)))
    manifest.build_flat_graph()
    refable = [n for n in manifest.nodes.values() if n.resource_type in ("model", "seed", "snapshot")]
    assert {n.resource_type for n in refable} == {"model", "seed", "snapshot"}
    expected = {}
    for node in refable:
        defer_relation = DeferRelation(
            database=node.database, schema="elsewhere", alias=node.alias, relation_name=None,
            resource_type=node.resource_type, name=node.name, description=node.description,
            compiled_code=None, meta=node.meta, tags=node.tags, config=node.config,
        )
        expected[node.unique_id] = dataclasses.replace(node, defer_relation=defer_relation)
        new = with_defer_relation(manifest, node, defer_relation)
        assert node.defer_relation is None, "the original node is not changed"
        manifest.nodes[node.unique_id] = new
    patched = manifest.flat_graph["nodes"]
    manifest.build_flat_graph()  # what dbt's own merge does: serialize every node again
    for uid, node in expected.items():
        assert manifest.nodes[uid] == node
        assert patched[uid] == manifest.flat_graph["nodes"][uid] == node.to_dict(omit_none=False)
        assert patched[uid]["defer_relation"]["schema"] == "elsewhere"

    # and back to no deferral
    some = refable[0]
    manifest.nodes[some.unique_id] = with_defer_relation(manifest, manifest.nodes[some.unique_id], None)
    assert manifest.flat_graph["nodes"][some.unique_id]["defer_relation"] is None
    assert manifest.nodes[some.unique_id].defer_relation is None


def test_deferred_record_is_what_dbts_defer_builds_from_that_state(envs):
    """SPEC §4: the chain's deferred record carries every field dbt's ``merge_from_artifact``
    fills from its --state node, in the node and in the 'graph' variable (dbt <= 1.11 keeps it
    as dicts: simulated here; later dbt serializes the node when read)."""
    path = envs.root / "prod-artifacts" / "manifest.json"
    state = Manifest.from_writable_manifest(WritableManifest.read_and_check_versions(str(path)))
    current = Manifest.from_writable_manifest(WritableManifest.read_and_check_versions(str(path)))
    env = load_manifest("prod", str(path))
    current.merge_from_artifact(state)  # dbt's own --defer
    ours = Manifest.from_writable_manifest(WritableManifest.read_and_check_versions(str(path)))
    ours.flat_graph = {"nodes": {uid: n.to_dict(omit_none=False) for uid, n in ours.nodes.items()}}
    refable = [uid for uid, n in ours.nodes.items() if n.resource_type in ("model", "seed", "snapshot")
               and not n.is_ephemeral_model]
    for uid in refable:
        node = ours.nodes[uid]
        ours.nodes[uid] = with_defer_relation(ours, node, deferred_record(node, env.nodes[uid]))
    for uid in refable:
        expected = current.nodes[uid].defer_relation
        got = ours.nodes[uid].defer_relation
        assert expected.relation_name and (expected.compiled_code or expected.resource_type == "seed")
        assert ours.flat_graph["nodes"][uid]["defer_relation"] == expected.to_dict(omit_none=False), uid
        assert got.to_dict(omit_none=False) == expected.to_dict(omit_none=False), uid
        assert type(got.config) is type(expected.config) and got.config == expected.config, uid
        assert ours.nodes[uid].to_dict(omit_none=False) == current.nodes[uid].to_dict(omit_none=False), uid


def test_a_relation_name_that_does_not_name_the_relation_is_left_out():
    location = ("db", "prod", "orders")
    for name in ('"db"."prod"."orders"', "db.prod.orders", "`db`.`prod`.`orders`", '"prod"."orders"', "orders",
                 'db."prod".orders'):
        assert renders(name, location), name
    for name in ('"db"."prod"."orders"; drop table x', '"db"."dev"."orders"', '"db"."prod"."orders" --', None, "",
                 '"db"."prod".""orders""', "db.prod.orders.x"):
        assert not renders(name, location), name
