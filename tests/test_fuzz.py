"""Property-based tests (hypothesis) over the two readers of untrusted input.

Whatever the vars structure, the environment variables or the bytes of a manifest, the result is a
clean ``DeferConfigError`` / ``ManifestError`` (one line, naming the thing) or a valid result —
never any other exception.
"""

from __future__ import annotations

import json
import math
import os
from datetime import datetime, timezone

from hypothesis import HealthCheck, assume, example, given, settings, strategies as st

from dbt_defer import chain
from dbt_defer.config import DEV, DEV_POLICIES, DeferConfig, DeferConfigError, EnvironmentSpec
from dbt_defer.settings import load_config
from dbt_defer.manifests import ManifestError, load_manifest, manifest_path_for

ROOT = "/projects/shop"
# In CI the examples are derandomized, so a landing never hinges on luck; locally they explore.
_CI = os.environ.get("CI", "").lower() == "true"
FUZZ = settings(
    max_examples=300, deadline=None, derandomize=_CI, suppress_health_check=[HealthCheck.too_slow]
)
FILES = settings(
    max_examples=300, deadline=None, derandomize=_CI,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# --- strategies --------------------------------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
)
# what YAML / --vars can produce: nested mappings and lists of scalars
yaml_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=10), st.integers(), st.booleans()), children, max_size=4),
    ),
    max_leaves=20,
)
env_names = st.one_of(
    st.sampled_from(["staging", "prod", "qa", "dev", "PROD", "Staging", "1bad", "", "x-y", "ünï"]),
    st.text(max_size=12),
)
environment_items = st.one_of(
    st.fixed_dictionaries({"name": env_names}, optional={"state": st.one_of(st.text(max_size=30), yaml_values)}),
    yaml_values,
)
known = {
    "environments": st.one_of(st.lists(environment_items, max_size=4), yaml_values),
    "dev_relations": st.one_of(st.sampled_from(list(DEV_POLICIES) + ["ALWAYS", " never ", "sometimes"]), yaml_values),
    "limits": st.one_of(
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), st.one_of(st.none(), st.integers(), scalars), max_size=3),
        yaml_values,
    ),
    "limit_tests": st.one_of(st.booleans(), st.sampled_from(["true", "no", "maybe"]), yaml_values),
    "never_defer": st.one_of(st.lists(st.text(max_size=12), max_size=3), st.text(max_size=12), yaml_values),
    "max_age_hours": st.one_of(
        st.floats(allow_nan=True, allow_infinity=True), st.integers(min_value=-(10**400), max_value=10**400), yaml_values
    ),
    "audit_table": st.one_of(st.booleans(), yaml_values),
}
settings_strategy = st.one_of(
    st.none(),
    st.fixed_dictionaries({}, optional=known),
    yaml_values,
)
env_keys = st.one_of(
    st.sampled_from([
        "DBT_DEFER_PROD_STATE", "DBT_DEFER_STAGING_STATE", "DBT_DEFER_Prod_STATE", "DBT_DEFER_DEV_STATE",
        "DBT_DEFER___STATE", "DBT_DEFER_1_STATE", "DBT_DEFER_DEV_RELATIONS", "DBT_DEFER_STATE", "DBT_STATE", "HOME",
    ]),
    st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdef0123456789", max_size=12).map(lambda s: f"DBT_DEFER_{s}_STATE"),
)
environ_strategy = st.dictionaries(env_keys, st.text(max_size=30), max_size=5)
state_flags = st.one_of(st.none(), st.text(max_size=20))


def check_valid(cfg: DeferConfig) -> None:
    """What the rest of the package relies on."""
    assert isinstance(cfg, DeferConfig)
    names = [e.name for e in cfg.environments]
    assert len(names) == len(set(names)), names
    for env in cfg.environments:
        assert isinstance(env, EnvironmentSpec)
        assert env.name != DEV and env.name == env.name.lower() and env.name[:1].isalpha()
        assert isinstance(env.state, str) and env.state.strip()
        assert env.is_uri or os.path.isabs(env.state)
    assert cfg.dev_relations in DEV_POLICIES
    assert isinstance(cfg.limit_tests, bool) and isinstance(cfg.audit_table, bool)
    assert isinstance(cfg.max_age_hours, float) and cfg.max_age_hours > 0 and not math.isnan(cfg.max_age_hours)
    for target, limit in cfg.limits:
        assert isinstance(target, str)
        assert limit is None or (type(limit) is int and limit >= 0)
    assert all(isinstance(s, str) and s.strip() == s and s for s in cfg.never_defer)


def check_message(exc: Exception, *user_text: str) -> None:
    """One line starting 'dbt-defer: ' (a path the user gave may itself hold a newline)."""
    text = str(exc)
    assert text.startswith("dbt-defer: "), text
    for part in user_text:
        text = text.replace(part, "")
    assert "\n" not in text and "\r" not in text, text
    assert "Traceback" not in text


# --- config --------------------------------------------------------------------------------


@FUZZ
@given(settings_strategy, environ_strategy, state_flags, state_flags, st.booleans())
@example({"max_age_hours": float("nan")}, {}, None, None, False)
@example({"max_age_hours": 10**400}, {}, None, None, False)
@example(None, {"DBT_DEFER_PROD_STATE": "a", "DBT_DEFER_Prod_STATE": "b"}, None, None, False)
@example({"environments": [{"name": "prod", "state": "x\x00y"}]}, {}, None, None, False)
def test_load_config_never_crashes(settings_value, environ, defer_state, state, favor_state):
    try:
        cfg = load_config(settings_value, environ, ROOT, defer_state=defer_state, state=state, favor_state=favor_state)
    except DeferConfigError as exc:
        check_message(exc)
        return
    check_valid(cfg)


@FUZZ
@given(st.lists(st.tuples(env_names, st.text(max_size=10)), max_size=5), environ_strategy)
def test_chain_order_is_deterministic(pairs, environ):
    """The same input gives the same chain, whatever the order of the environment mapping."""
    settings_value = {"environments": [{"name": n, "state": s} for n, s in pairs]}
    outcomes = []
    for env in (environ, dict(reversed(list(environ.items())))):
        try:
            outcomes.append(load_config(settings_value, env, ROOT).environments)
        except DeferConfigError as exc:
            outcomes.append(str(exc))
    assert outcomes[0] == outcomes[1]


# --- manifests -------------------------------------------------------------------------------

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=25,
)
schema_versions = st.one_of(
    st.sampled_from([
        "https://schemas.getdbt.com/dbt/manifest/v12.json", "https://schemas.getdbt.com/dbt/manifest/v3.json",
        "https://schemas.getdbt.com/dbt/run-results/v6.json", "", "/manifest/",
    ]),
    json_values,
)
node_fields = {
    "resource_type": st.one_of(st.sampled_from(["model", "seed", "snapshot", "test", "analysis"]), json_values),
    "database": st.one_of(st.none(), st.text(max_size=8), json_values),
    "schema": st.one_of(st.none(), st.text(max_size=8), json_values),
    "alias": st.one_of(st.none(), st.text(max_size=8), json_values),
    "name": st.one_of(st.text(max_size=8), json_values),
    "config": st.one_of(
        st.fixed_dictionaries({}, optional={
            "materialized": st.one_of(st.sampled_from(["table", "view", "ephemeral"]), json_values),
            "enabled": st.one_of(st.booleans(), json_values),
        }),
        json_values,
    ),
    "checksum": st.one_of(st.fixed_dictionaries({"checksum": st.text(max_size=8)}), json_values),
    "unrendered_config": json_values,
}
manifest_like = st.fixed_dictionaries(
    {},
    optional={
        "metadata": st.one_of(
            st.fixed_dictionaries({}, optional={
                "dbt_schema_version": schema_versions,
                "dbt_version": st.one_of(st.text(max_size=8), json_values),
                "generated_at": st.one_of(
                    st.datetimes(timezones=st.one_of(st.none(), st.timezones())).map(lambda d: d.isoformat()),
                    st.text(max_size=30), json_values,
                ),
                "project_name": st.one_of(st.none(), st.text(max_size=8), json_values),
                "project_id": st.one_of(st.none(), st.text(max_size=8), json_values),
            }),
            json_values,
        ),
        "nodes": st.one_of(
            st.dictionaries(st.text(max_size=20), st.fixed_dictionaries({}, optional=node_fields), max_size=3),
            json_values,
        ),
    },
)
run_results_like = st.one_of(
    st.fixed_dictionaries({}, optional={
        "results": st.one_of(
            st.lists(st.fixed_dictionaries({}, optional={
                "unique_id": st.one_of(st.text(max_size=10), json_values),
                "status": st.one_of(st.sampled_from(["success", "error", "fail", "skipped", "runtime error"]), json_values),
                "execution_time": st.one_of(st.floats(), st.integers(), json_values),
            }), max_size=3),
            json_values,
        )
    }),
    json_values,
)


def _is_compatible(version) -> bool:
    return version == "https://schemas.getdbt.com/dbt/manifest/v12.json"


def check_loaded(loaded, path: str) -> None:
    assert loaded.path == path
    assert "/manifest/" in loaded.schema_version
    assert isinstance(loaded.node_count, int) and loaded.node_count >= len(loaded.nodes)
    for uid, node in loaded.nodes.items():
        assert node.unique_id == uid and node.resource_type in ("model", "seed", "snapshot")
        assert isinstance(node.identifier, str)
    for status in loaded.bad_status.values():
        assert status.lower() in ("error", "fail", "skipped", "runtime error")
    for seconds in loaded.build_seconds.values():  # what saved_seconds sums
        assert isinstance(seconds, float) and math.isfinite(seconds) and seconds >= 0
    # what the session and `dbt-defer status` then do with it
    age = loaded.age_hours(datetime(2030, 1, 1, tzinfo=timezone.utc))
    assert age is None or age >= 0
    spec = EnvironmentSpec("prod", "/p", "vars")
    warning = chain.stale_warning(spec, loaded, 72.0)
    assert warning is None or (
        warning.startswith("dbt-defer: environment 'prod'") and ("old" in warning or "in the future" in warning)
    )
    try:
        chain.check_project(spec, loaded, "shop")
    except chain.ChainError as exc:
        check_message(exc, path)


def _load(folder, raw: bytes, results=None, compatible=None):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "manifest.json"
    path.write_bytes(raw)
    results_path = folder / "run_results.json"
    if results is None:
        if results_path.exists():
            results_path.unlink()
    else:
        results_path.write_bytes(results)
    try:
        loaded = load_manifest("prod", str(path), is_compatible=compatible)
    except ManifestError as exc:
        check_message(exc, str(path), str(results_path))
        assert "environment 'prod'" in str(exc)
        return None
    check_loaded(loaded, str(path))
    return loaded


_counter = iter(range(10**9))


@FILES
@given(st.binary(max_size=400))
@example(b"")
@example(b"\xff\xfe{}")
@example(b"null")
@example(b'{"metadata": null, "nodes": null}')
@example(b"[" * 3000 + b"]" * 3000)
@example(b'{"metadata": {"dbt_schema_version": "https://schemas.getdbt.com/dbt/manifest/v12.json", "generated_at": "0001-01-01T00:00:00+05:00"}, "nodes": {}}')
def test_load_manifest_arbitrary_bytes(tmp_path, raw):
    _load(tmp_path / str(next(_counter)), raw)


@FILES
@given(manifest_like, st.one_of(st.none(), run_results_like), st.booleans())
@example(
    {"metadata": {"dbt_schema_version": "https://schemas.getdbt.com/dbt/manifest/v12.json"},
     "nodes": {"model.a.b": {"unrendered_config": {"k": [[[]]]}}}},
    {"results": [{"unique_id": "model.a.b", "status": "error"}]},
    True,
)
def test_load_manifest_arbitrary_json(tmp_path, document, results, compatible):
    results_raw = None if results is None else json.dumps(results).encode()
    _load(tmp_path / str(next(_counter)), json.dumps(document).encode(), results_raw, _is_compatible if compatible else None)


@FILES
@given(st.text(max_size=40))
@example("a\x00b.json")
@example("\x00")
def test_manifest_path_for_arbitrary_states(tmp_path, state):
    try:
        path = manifest_path_for("prod", state)
    except ManifestError as exc:
        check_message(exc, state)
        return
    try:
        load_manifest("prod", path)
    except ManifestError as exc:
        check_message(exc, state, os.path.abspath(path))
