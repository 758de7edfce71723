"""The chain's merge into dbt's manifest (SPEC §4, §10): every node's defer_relation, in
``manifest.nodes`` and in the 'graph' Jinja variable, exactly as dbt's own
``dataclasses.replace`` + ``build_flat_graph`` would give, without their cost."""

from __future__ import annotations

import dataclasses

from dbt.artifacts.resources import DeferRelation
from dbt.artifacts.schemas.manifest import WritableManifest
from dbt.contracts.graph.manifest import Manifest

from dbt_defer.merge import with_defer_relation


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
