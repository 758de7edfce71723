"""The lightweight schema of dbt's artifacts: only the fields deferral reads.

msgspec decodes manifest.json and run_results.json into these structs and skips every other
field without building it (the speed of SPEC §10 item 3: a 10,000-node manifest in a fraction
of dbt's own load). Unknown or missing fields are fine; a field of the wrong type is a
``msgspec.ValidationError`` that ``manifests`` turns into one line. Imports nothing of ours.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import msgspec


class _Checksum(msgspec.Struct):
    checksum: str = ""


class _Config(msgspec.Struct):
    materialized: Optional[str] = None
    enabled: bool = True


_EMPTY_STR, _NULL, _EMPTY_OBJECT, _EMPTY_LIST = (msgspec.Raw(b'""'), msgspec.Raw(b"null"),
                                                 msgspec.Raw(b"{}"), msgspec.Raw(b"[]"))


class _Node(msgspec.Struct):
    resource_type: str = ""
    database: Optional[str] = None
    schema: Optional[str] = None
    alias: Optional[str] = None
    identifier: Optional[str] = None  # sources
    name: str = ""
    package_name: str = ""
    relation_name: Optional[str] = None
    # kept encoded (a slice of the file, no copy): decoded only for the environment the chain
    # picks for a node (``DECODE_CONFIG`` for its materialized/enabled at load)
    config: msgspec.Raw = _EMPTY_OBJECT
    checksum: _Checksum = msgspec.field(default_factory=_Checksum)
    unrendered_config: Dict[str, Any] = msgspec.field(default_factory=dict)
    # what dbt's deferral record copies from the state's node (SPEC §4), kept encoded too
    description: msgspec.Raw = _EMPTY_STR
    compiled_code: msgspec.Raw = _NULL
    meta: msgspec.Raw = _EMPTY_OBJECT
    tags: msgspec.Raw = _EMPTY_LIST


class _Metadata(msgspec.Struct):
    dbt_schema_version: str = ""
    dbt_version: str = ""
    generated_at: str = ""
    invocation_id: Optional[str] = None
    project_name: Optional[str] = None
    project_id: Optional[str] = None
    adapter_type: Optional[str] = None


class _Manifest(msgspec.Struct):
    metadata: Optional[_Metadata] = None
    nodes: Optional[Dict[str, _Node]] = None
    sources: Optional[Dict[str, _Node]] = None
    functions: Optional[Dict[str, Dict[str, Any]]] = None  # dbt >= 1.11; kept whole (few)


class _MetadataOnly(msgspec.Struct):
    """Decoded only when the full decode fails, to tell "wrong version" from "not a manifest"."""

    metadata: Any = None


class _Result(msgspec.Struct):
    unique_id: str = ""
    status: Optional[str] = None
    execution_time: Optional[float] = None


class _RunResults(msgspec.Struct):
    results: list[_Result] = msgspec.field(default_factory=list)


DECODE_MANIFEST = msgspec.json.Decoder(_Manifest)
DECODE_CONFIG = msgspec.json.Decoder(_Config)
DECODE_ANY = msgspec.json.Decoder()
DECODE_RESULTS = msgspec.json.Decoder(_RunResults)
DECODE_METADATA_ONLY = msgspec.json.Decoder(_MetadataOnly)
