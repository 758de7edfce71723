"""Unit tests for dbt_defer.settings.load_config: every source and precedence of SPEC §3."""

from __future__ import annotations

import os

import pytest

from dbt_defer.config import DeferConfigError, truthy
from dbt_defer.settings import load_config

ROOT = "/projects/shop"


def chain(cfg):
    return [(e.name, e.state, e.source) for e in cfg.environments]


def names(cfg):
    return [e.name for e in cfg.environments]


def vars_envs(*pairs):
    return {"environments": [{"name": n, "state": s} for n, s in pairs]}


# --- source 1: project vars ---------------------------------------------------------------


def test_vars_chain_keeps_order_and_resolves_relative_paths_against_project_root():
    cfg = load_config(vars_envs(("staging", "staging-artifacts"), ("prod", "prod-artifacts")), {}, ROOT)
    assert chain(cfg) == [
        ("staging", os.path.join(ROOT, "staging-artifacts"), "vars"),
        ("prod", os.path.join(ROOT, "prod-artifacts"), "vars"),
    ]
    assert cfg.configured


def test_vars_order_is_priority_even_when_prod_is_first():
    cfg = load_config(vars_envs(("prod", "p"), ("qa", "q")), {}, ROOT)
    assert names(cfg) == ["prod", "qa"]


def test_absolute_paths_file_paths_and_uris_are_kept():
    cfg = load_config(
        vars_envs(("staging", "/abs/staging/manifest.json"), ("prod", "s3://bucket/prod")), {}, ROOT
    )
    assert chain(cfg) == [
        ("staging", "/abs/staging/manifest.json", "vars"),
        ("prod", "s3://bucket/prod", "vars"),
    ]
    assert cfg.environments[1].is_uri and not cfg.environments[0].is_uri


def test_relative_path_is_normalised_against_project_root():
    cfg = load_config(vars_envs(("prod", "../shared/./prod-artifacts")), {}, ROOT)
    assert cfg.environments[0].state == "/projects/shared/prod-artifacts"


def test_names_are_lower_cased():
    cfg = load_config(vars_envs(("Staging", "s")), {}, ROOT)
    assert names(cfg) == ["staging"]


# --- source 2: DBT_DEFER_<NAME>_STATE -------------------------------------------------------


def test_env_vars_alone_give_staging_then_prod():
    environ = {"DBT_DEFER_PROD_STATE": "prod-artifacts", "DBT_DEFER_STAGING_STATE": "staging-artifacts"}
    cfg = load_config(None, environ, ROOT)
    assert chain(cfg) == [
        ("staging", os.path.join(ROOT, "staging-artifacts"), "DBT_DEFER_STAGING_STATE"),
        ("prod", os.path.join(ROOT, "prod-artifacts"), "DBT_DEFER_PROD_STATE"),
    ]


def test_env_var_overrides_the_state_of_a_listed_environment_and_keeps_its_position():
    settings = vars_envs(("staging", "staging-artifacts"), ("prod", "prod-artifacts"))
    cfg = load_config(settings, {"DBT_DEFER_STAGING_STATE": "/elsewhere/staging"}, ROOT)
    assert chain(cfg) == [
        ("staging", "/elsewhere/staging", "DBT_DEFER_STAGING_STATE"),
        ("prod", os.path.join(ROOT, "prod-artifacts"), "vars"),
    ]


def test_env_var_for_an_unlisted_name_is_added_in_front_of_prod():
    settings = vars_envs(("staging", "s"), ("prod", "p"))
    cfg = load_config(settings, {"DBT_DEFER_QA_STATE": "qa-artifacts"}, ROOT)
    assert names(cfg) == ["staging", "qa", "prod"]
    assert cfg.environments[1].state == os.path.join(ROOT, "qa-artifacts")
    assert cfg.environments[1].source == "DBT_DEFER_QA_STATE"


def test_env_var_for_an_unlisted_name_goes_last_when_there_is_no_prod():
    cfg = load_config(vars_envs(("staging", "s")), {"DBT_DEFER_QA_STATE": "q"}, ROOT)
    assert names(cfg) == ["staging", "qa"]


def test_env_var_prod_only():
    cfg = load_config(None, {"DBT_DEFER_PROD_STATE": "p"}, ROOT)
    assert chain(cfg) == [("prod", os.path.join(ROOT, "p"), "DBT_DEFER_PROD_STATE")]


def test_unrelated_env_vars_are_not_environments():
    environ = {
        "DBT_DEFER": "1",
        "DBT_DEFER_STATE": "x",  # dbt's own variable, not an environment named ''
        "DBT_DEFER_DEV_RELATIONS": "always",
        "DBT_STATE": "y",
        "DBT_DEFER_PROD_STATE": "p",
    }
    cfg = load_config(None, environ, ROOT)
    assert names(cfg) == ["prod"]


# --- empty values are skipped ----------------------------------------------------------------


def test_empty_env_var_skips_a_listed_environment():
    settings = vars_envs(("staging", "s"), ("prod", "p"))
    cfg = load_config(settings, {"DBT_DEFER_STAGING_STATE": ""}, ROOT)
    assert names(cfg) == ["prod"]


def test_whitespace_only_env_var_is_empty_too():
    cfg = load_config(vars_envs(("staging", "s"), ("prod", "p")), {"DBT_DEFER_PROD_STATE": "  "}, ROOT)
    assert names(cfg) == ["staging"]


def test_empty_state_in_vars_is_skipped():
    cfg = load_config({"environments": [{"name": "staging", "state": ""}, {"name": "prod", "state": "p"}]}, {}, ROOT)
    assert names(cfg) == ["prod"]


def test_empty_new_env_var_adds_nothing():
    cfg = load_config(None, {"DBT_DEFER_STAGING_STATE": "", "DBT_DEFER_PROD_STATE": "p"}, ROOT)
    assert names(cfg) == ["prod"]


# --- source 3: dbt's --defer-state / --state --------------------------------------------------


def test_defer_state_is_the_single_prod_environment_when_nothing_else_is_configured():
    cfg = load_config(None, {}, ROOT, defer_state="defer-dir", state="state-dir")
    assert chain(cfg) == [("prod", os.path.join(ROOT, "defer-dir"), "--defer-state/DBT_DEFER_STATE")]


def test_state_is_the_fallback_without_defer_state():
    cfg = load_config(None, {}, ROOT, state="/abs/state")
    assert chain(cfg) == [("prod", "/abs/state", "--state/DBT_STATE")]


def test_state_is_not_used_when_the_chain_is_configured():
    cfg = load_config(None, {"DBT_DEFER_STAGING_STATE": "s"}, ROOT, defer_state="d", state="x")
    assert names(cfg) == ["staging"]
    assert cfg.environments[0].state == os.path.join(ROOT, "s")


def test_state_is_used_when_every_configured_environment_is_empty():
    cfg = load_config(vars_envs(("staging", ""),), {"DBT_DEFER_PROD_STATE": ""}, ROOT, state="st")
    assert chain(cfg) == [("prod", os.path.join(ROOT, "st"), "--state/DBT_STATE")]


def test_nothing_configured_anywhere():
    cfg = load_config(None, {}, ROOT)
    assert cfg.environments == () and not cfg.configured
    assert (cfg.dev_relations, cfg.dev_relations_source) == ("always", "default")


# --- dev_relations ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["always", "modified", "never", "MODIFIED", " never "])
def test_dev_relations_from_vars(value):
    cfg = load_config({"dev_relations": value}, {}, ROOT)
    assert cfg.dev_relations == value.strip().lower()
    assert "dev_relations" in cfg.dev_relations_source


def test_dev_relations_env_var_overrides_vars():
    cfg = load_config({"dev_relations": "always"}, {"DBT_DEFER_DEV_RELATIONS": "modified"}, ROOT)
    assert (cfg.dev_relations, cfg.dev_relations_source) == ("modified", "DBT_DEFER_DEV_RELATIONS")


def test_empty_dev_relations_env_var_leaves_the_var():
    cfg = load_config({"dev_relations": "modified"}, {"DBT_DEFER_DEV_RELATIONS": ""}, ROOT)
    assert cfg.dev_relations == "modified"


def test_favor_state_means_never_and_wins_over_everything():
    cfg = load_config(
        {"dev_relations": "modified"}, {"DBT_DEFER_DEV_RELATIONS": "always"}, ROOT, favor_state=True
    )
    assert (cfg.dev_relations, cfg.dev_relations_source) == ("never", "--favor-state")


@pytest.mark.parametrize("value", ["1", "true", "True", "yes"])
def test_truthy_reads_dbt_style_booleans(value):
    assert truthy(value)


@pytest.mark.parametrize("value", [None, "", "0", "false", "no"])
def test_truthy_false_values(value):
    assert not truthy(value)


# --- bad values: DeferConfigError, one clear line ---------------------------------------------


def _error(settings, environ=None, **kw):
    with pytest.raises(DeferConfigError) as info:
        load_config(settings, environ or {}, ROOT, **kw)
    message = str(info.value)
    assert "\n" not in message, message
    assert message.startswith("dbt-defer:"), message
    return message


def test_bad_dev_relations_var():
    msg = _error({"dev_relations": "sometimes"})
    assert "sometimes" in msg and "dev_relations" in msg and "always, modified, never" in msg


def test_bad_dev_relations_env_var_names_the_variable():
    msg = _error(None, {"DBT_DEFER_DEV_RELATIONS": "bogus"})
    assert "DBT_DEFER_DEV_RELATIONS" in msg and "bogus" in msg


def test_settings_not_a_mapping():
    assert "must be a mapping" in _error(["staging"])


def test_unknown_key_is_named():
    msg = _error({"enviroments": []})
    assert "enviroments" in msg and "environments" in msg


def test_environments_not_a_list():
    assert "must be a list" in _error({"environments": {"name": "prod", "state": "p"}})


def test_environment_item_without_name():
    msg = _error({"environments": [{"state": "p"}]})
    assert "item 0" in msg and "'name'" in msg


def test_duplicate_environment():
    msg = _error(vars_envs(("prod", "a"), ("prod", "b")))
    assert "'prod'" in msg and "twice" in msg


def test_dev_is_a_reserved_environment_name():
    msg = _error(vars_envs(("dev", "d")))
    assert "'dev'" in msg and "reserved" in msg


def test_dev_is_reserved_through_env_vars_too():
    msg = _error(None, {"DBT_DEFER_DEV_STATE": "d"})
    assert "DBT_DEFER_DEV_STATE" in msg and "reserved" in msg


def test_invalid_environment_name():
    msg = _error(vars_envs(("my-env", "x")))
    assert "my-env" in msg and "not valid" in msg


def test_state_must_be_a_string():
    msg = _error({"environments": [{"name": "prod", "state": 3}]})
    assert "'prod'" in msg and "3" in msg


@pytest.mark.parametrize(
    "settings, needle",
    [
        ({"limits": [1000]}, "limits"),
        ({"limits": {"dev": -1}}, "'dev'"),
        ({"limits": {"dev": "many"}}, "'many'"),
        ({"limits": {"dev": True}}, "True"),
        ({"limit_tests": "maybe"}, "limit_tests"),
        ({"audit_table": 2}, "audit_table"),
        ({"never_defer": [""]}, "never_defer"),
        ({"never_defer": 5}, "never_defer"),
        ({"max_age_hours": 0}, "max_age_hours"),
        ({"max_age_hours": "soon"}, "max_age_hours"),
    ],
)
def test_other_bad_values(settings, needle):
    assert needle in _error(settings)


def test_good_other_values():
    cfg = load_config(
        {
            "limits": {"dev": 1000, "ci": None},
            "limit_tests": True,
            "never_defer": ["tag:pii"],
            "max_age_hours": 1.5,
            "audit_table": True,
        },
        {},
        ROOT,
    )
    assert cfg.limit_for_target("dev") == (True, 1000)
    assert cfg.limit_for_target("ci") == (True, None)
    assert cfg.limit_for_target("prod") == (False, None)
    assert cfg.limit_tests is True and cfg.audit_table is True
    assert cfg.never_defer == ("tag:pii",) and cfg.max_age_hours == 1.5


def test_compile_as_defaults_to_compile_and_accepts_build():
    assert load_config({}, {}, "/p").compile_as == "compile"
    assert load_config({}, {"DBT_DEFER_COMPILE_AS": "Build"}, "/p").compile_as == "build"


def test_compile_as_rejects_other_values_in_one_line():
    with pytest.raises(DeferConfigError) as exc:
        load_config({}, {"DBT_DEFER_COMPILE_AS": "run"}, "/p")
    message = str(exc.value)
    assert "DBT_DEFER_COMPILE_AS" in message and "'build'" in message and "\n" not in message


def test_overlay_settings_cli_vars_win_key_by_key():
    from dbt_defer.settings import overlay_settings

    project = {"dbt_defer": {"limits": {"dev": 10}, "max_age_hours": 5}, "other": 1}
    assert overlay_settings(project, {"dbt_defer": {"max_age_hours": 1}}) == {"limits": {"dev": 10}, "max_age_hours": 1}
    assert overlay_settings(project, {}) == {"limits": {"dev": 10}, "max_age_hours": 5}
    assert overlay_settings({}, None) is None
    assert overlay_settings(None, {"dbt_defer": {"audit_table": True}}) == {"audit_table": True}


# --- environment items: unknown keys are errors (issue 17) ---------------------------------


def test_typo_in_an_environment_item_is_named_with_the_accepted_keys():
    """{name: staging, sate: ...} used to drop staging silently (refs then went to prod)."""
    msg = _error({"environments": [{"name": "staging", "sate": "staging-artifacts"}, {"name": "prod", "state": "p"}]})
    assert "'sate'" in msg and "item 0" in msg and "'staging'" in msg
    assert "accepted keys are name, state, target" in msg


def test_typo_of_name_is_named_too():
    msg = _error({"environments": [{"nmae": "staging", "state": "s"}]})
    assert "'nmae'" in msg and "no usable name" in msg and "accepted keys are name, state, target" in msg


def test_several_unknown_keys_and_odd_keys_are_all_named_on_one_line():
    msg = _error({"environments": [{"name": "prod", "state": "p", "zz": 1, 3: 2, "a\nb": 0, None: 1}]})
    for key in ("'zz'", "3", "'a\\nb'", "None"):
        assert key in msg, msg


def test_known_environment_keys_are_accepted():
    cfg = load_config({"environments": [{"name": "prod", "state": "p", "target": "prod"}]}, {}, ROOT)
    assert names(cfg) == ["prod"]


from hypothesis import given, settings as hsettings, strategies as st  # noqa: E402

_KEYS = ("name", "state", "target")
_odd_keys = st.one_of(
    st.text(max_size=12).filter(lambda k: k not in _KEYS),
    st.sampled_from(["sate", "Name", "STATE", "name ", "targets", "", "\x1b[31m"]),
    st.integers(), st.booleans(), st.none(),
)


@hsettings(max_examples=200, deadline=None, derandomize=os.environ.get("CI", "").lower() == "true")
@given(
    st.lists(st.sampled_from(["staging", "prod", "qa"]), min_size=1, max_size=3, unique=True),
    st.data(),
)
def test_fuzz_any_unknown_key_in_any_item_is_an_error_naming_it(env_names, data):
    items = [{"name": n, "state": f"{n}-artifacts"} for n in env_names]
    bad_at = data.draw(st.integers(0, len(items) - 1))
    key = data.draw(_odd_keys)
    items[bad_at][key] = data.draw(st.one_of(st.text(max_size=5), st.integers(), st.none()))
    msg = _error({"environments": items})
    assert f"item {bad_at}" in msg and repr(key) in msg and "accepted keys are name, state, target" in msg


@hsettings(max_examples=200, deadline=None, derandomize=os.environ.get("CI", "").lower() == "true")
@given(st.lists(st.fixed_dictionaries({"name": st.sampled_from(["staging", "prod", "qa", "ci"])},
                                      optional={"state": st.text(min_size=1, max_size=8).filter(str.strip),
                                                "target": st.text(max_size=8)}),
                max_size=4, unique_by=lambda d: d["name"]))
def test_fuzz_items_with_known_keys_only_never_fail_on_keys(items):
    cfg = load_config({"environments": items}, {}, ROOT)
    assert names(cfg) == [i["name"] for i in items if i.get("state", "").strip()]


# --- issue 11: bounded values, names that cannot vanish ------------------------------------


@pytest.mark.parametrize("value", [9223372036854775808, 2**31, -1, 1.5, 1000.0, True, False, "10", float("nan")])
def test_out_of_range_limits_name_the_key_and_the_range(value):
    msg = _error({"limits": {"dev": value}})
    assert "limits" in msg and "'dev'" in msg and "from 0 to 2147483647" in msg, msg
    assert "\n" not in msg


@pytest.mark.parametrize("value", [0, 1, 2**31 - 1, None])
def test_limits_in_range_are_accepted(value):
    assert load_config({"limits": {"dev": value}}, {}, ROOT).limits == (("dev", value),)


@pytest.mark.parametrize("key", ["DBT_DEFER_PRÖD_STATE", "DBT_DEFER_PROD-EU_STATE", "DBT_DEFER_PROD EU_STATE",
                                 "dbt_defer_prod_state"])
def test_env_var_with_an_unusable_name_is_one_line_not_ignored(key):
    with pytest.raises(DeferConfigError) as info:
        load_config(None, {key: "prod-artifacts"}, ROOT)
    msg = str(info.value)
    assert repr(key) in msg and "[a-z][a-z0-9_]*" in msg and "DBT_DEFER_PROD_EU_STATE" in msg, msg
    assert "\n" not in msg


def test_max_state_mb_default_and_value():
    assert load_config(None, {}, ROOT).max_state_bytes == 512 * 1024 * 1024
    assert load_config(None, {"DBT_DEFER_MAX_STATE_MB": " 10 "}, ROOT).max_state_bytes == 10 * 1024 * 1024


@pytest.mark.parametrize("value", ["abc", "0", "-1", "1.5", "nan", "inf", "１０", "99999999999999999999"])
def test_bad_max_state_mb_names_the_variable(value):
    with pytest.raises(DeferConfigError) as info:
        load_config(None, {"DBT_DEFER_MAX_STATE_MB": value}, ROOT)
    msg = str(info.value)
    assert "DBT_DEFER_MAX_STATE_MB" in msg and repr(value) in msg and "megabytes" in msg, msg


# --- issue 14: a misspelled DBT_DEFER_<NAME>_STATE, an environment skipped by an empty state ----

CHAIN_VARS = {"environments": [{"name": "staging", "state": "s"}, {"name": "prod", "state": "p"}]}


def test_a_misspelled_state_variable_is_a_did_you_mean_warning():
    cfg = load_config(CHAIN_VARS, {"DBT_DEFER_PRDO_STATE": "x"}, ROOT)
    [notice] = cfg.notices
    assert notice.startswith("dbt-defer: DBT_DEFER_PRDO_STATE adds environment 'prdo', which vars: dbt_defer: "
                             "environments does not list (staging, prod); did you mean DBT_DEFER_PROD_STATE?")
    assert [e.name for e in cfg.environments] == ["staging", "prdo", "prod"]  # still added, as before
    # without vars: a near-miss of a well-known or another configured name
    assert "did you mean DBT_DEFER_STAGING_STATE?" in load_config(
        None, {"DBT_DEFER_STAGNIG_STATE": "x"}, ROOT).notices[0]
    assert "did you mean DBT_DEFER_ANALYTICS_STATE?" in load_config(
        None, {"DBT_DEFER_ANALYTICS_STATE": "x", "DBT_DEFER_ANALYTCS_STATE": "y"}, ROOT).notices[0]


def test_names_far_from_any_known_one_are_quiet_without_vars_and_said_with_them():
    assert load_config(None, {"DBT_DEFER_CI_STATE": "x", "DBT_DEFER_PROD_STATE": "y",
                              "DBT_DEFER_EU_WAREHOUSE_STATE": "z"}, ROOT).notices == ()
    [notice] = load_config(CHAIN_VARS, {"DBT_DEFER_EU_WAREHOUSE_STATE": "z"}, ROOT).notices
    assert "does not list (staging, prod). If it is meant, list it in environments" in notice
    assert load_config(CHAIN_VARS, {"DBT_DEFER_PROD_STATE": "elsewhere"}, ROOT).notices == ()


def test_environments_skipped_by_an_empty_state_are_recorded():
    cfg = load_config(CHAIN_VARS, {"DBT_DEFER_STAGING_STATE": ""}, ROOT)
    assert [e.name for e in cfg.environments] == ["prod"]
    assert cfg.skipped == (("staging", "DBT_DEFER_STAGING_STATE"),)


@pytest.mark.parametrize(
    "settings, needle",
    [
        ({"never_defer": "tag:pii"}, 'is the string "tag:pii"; it must be a list of dbt selectors: never_defer: ["tag:pii"]'),
        ({"audit_table": "yes"}, "audit_table (dbt_project.yml or --vars) is the string 'yes'; write true without quotes"),
        ({"limit_tests": "false"}, "limit_tests (dbt_project.yml or --vars) is the string 'false'; write false without"),
        ({"limits": {"dev": "1000"}}, "limits (dbt_project.yml or --vars) for target 'dev' is the string '1000'; write 1000 without quotes"),
        ({"max_age_hours": "24"}, "max_age_hours (dbt_project.yml or --vars) is the string '24'; write 24 without quotes"),
    ],
)
def test_quoted_values_are_refused_alike_with_the_unquoted_fix(settings, needle):
    message = _error(settings)
    assert needle in message and "\n" not in message


def test_a_misspelled_state_variable_suffix_gets_one_did_you_mean():
    cfg = load_config({}, {"DBT_DEFER_PROD_STAT": "x", "DBT_DEFER_STAGING_STATE": "s"}, ROOT)
    assert cfg.notices == (
        "dbt-defer: environment variable DBT_DEFER_PROD_STAT is not read by dbt-defer; did you mean "
        "DBT_DEFER_PROD_STATE? Rename it",
    )
    cfg = load_config({}, {"DBT_DEFER_DEV_RELATION": "never", "DBT_DEFER_TEST_PG_HOST": "h", "DBT_DEFER": "1"}, ROOT)
    assert [n.split(";")[1] for n in cfg.notices] == [" did you mean DBT_DEFER_DEV_RELATIONS? Rename it"]


def test_a_hyphenated_vars_key_gets_one_did_you_mean():
    from dbt_defer.settings import vars_key_notice

    line = vars_key_notice({"dbt-defer": {"environments": []}}, {})
    assert line == ("dbt-defer: vars: dbt-defer (dbt_project.yml) is not read by dbt-defer; did you mean "
                    "vars: dbt_defer (with an underscore)? Rename the key")
    assert "(--vars)" in vars_key_notice({}, {"dbtDefer": {"limits": {}}})
    assert vars_key_notice({"dbt_defer": {}, "dbt-defer": {}}, {}) is None
    assert vars_key_notice({"dbt_date": {"x": 1}, "dbt-defer": "not a mapping"}, {}) is None
    assert load_config({}, {}, ROOT, vars_notice=line).notices == (line,)
