"""The mistakes new users really make are said at start, in one line (issue 14), and
dbt-defer's end-of-run lines come before dbt's own closing lines. Real dbt runs on DuckDB
(nothing here depends on the adapter)."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from conftest import built_environments
from dbt_harness import make_project

ENV = {"DBT_DEFER": "1", "DBT_DEFER_STAGING_STATE": "staging-artifacts", "DBT_DEFER_PROD_STATE": "prod-artifacts"}
REL_TEST = "test.dbt_defer_integration_tests.relationships_model_b_id__id__ref_model_a_.ea90810b97"


@pytest.fixture(scope="module")
def proj(tmp_path_factory):
    p = make_project(tmp_path_factory.mktemp("duckdb"), "duckdb")
    built_environments(p)
    yield p
    p.drop_schemas()


def ours(result, level=None):
    return [m["msg"] for m in result.messages
            if m["msg"].startswith("dbt-defer:") and (level is None or m["level"] == level)]


def test_defer_state_flag_is_said_to_be_unused_when_the_chain_is_configured(proj):
    result = proj.dbt("compile", "-s", "stg_customers", "--defer-state", "prod-artifacts", env=ENV)
    [line] = [m for m in ours(result, "info") if "--defer-state" in m]
    assert line.startswith("dbt-defer: --defer-state prod-artifacts is not used")
    assert "staging, prod" in line
    # dbt's own flag alone is still the prod environment: nothing to say then
    alone = proj.dbt("compile", "-s", "stg_customers", "--defer-state", "prod-artifacts", env={"DBT_DEFER": "1"})
    assert not [m for m in ours(alone) if "--defer-state" in m]


def test_two_environments_reading_one_state_are_refused_at_start(proj):
    env = {**ENV, "DBT_DEFER_STAGING_STATE": "prod-artifacts"}
    result = proj.dbt("compile", "-s", "customers", env=env, expect=False)
    assert re.search(r"dbt-defer: environments 'staging' \(DBT_DEFER_STAGING_STATE=\S*/prod-artifacts\) and "
                     r"'prod' \(DBT_DEFER_PROD_STATE=\S*/prod-artifacts\) read the same state; point each "
                     r"environment at its own artifacts", str(result.exception))
    # a manifest file and its folder are one state too
    env = {**ENV, "DBT_DEFER_STAGING_STATE": "prod-artifacts/manifest.json"}
    result = proj.dbt("compile", "-s", "customers", env=env, expect=False)
    assert "read the same state" in str(result.exception)


def test_a_dev_manifest_given_as_prod_is_named_at_start(proj):
    proj.dbt("compile")  # writes the dev target's own manifest into target/
    copied = proj.root / "dev-copy"
    copied.mkdir(exist_ok=True)
    shutil.copy(proj.target / "manifest.json", copied / "manifest.json")
    result = proj.dbt("compile", "-s", "customers", env={"DBT_DEFER": "1", "DBT_DEFER_PROD_STATE": "dev-copy"})
    [line] = [m for m in ours(result, "warn") if "records this target's own relations" in m]
    assert re.match(r"dbt-defer: environment 'prod' \(DBT_DEFER_PROD_STATE=\S*/dev-copy\) records this "
                    r"target's own relations for \d+ of \d+ models", line)
    assert "target 'dev'" in line and "name: prod, target: dev" in line
    # real prod artifacts: not a word
    fine = proj.dbt("compile", "-s", "customers", env=ENV)
    assert not [m for m in ours(fine) if "own relations" in m]


def test_jinja_in_a_state_is_explained_by_the_run(proj):
    settings = {"dbt_defer": {"environments": [{"name": "prod", "state": "{{ env_var('PROD_STATE') }}"}]}}
    result = proj.dbt("compile", "-s", "customers", "--vars", json.dumps(settings),
                      env={"DBT_DEFER": "1"}, expect=False)
    message = str(result.exception)
    assert "contains Jinja, which dbt does not render inside vars: dbt_defer" in message
    assert "set DBT_DEFER_PROD_STATE instead" in message


def test_end_of_run_lines_come_before_dbts_closing_lines(proj):
    result = proj.dbt("build", "-s", "model_b", env=ENV)
    texts = [m["msg"] for m in result.messages]
    names = [m["name"] for m in result.messages]
    done = names.index("StatsLine")  # "Done. PASS=..."
    warning = next(i for i, t in enumerate(texts) if t.startswith("dbt-defer:") and "compares data across" in t)
    summary = next(i for i, t in enumerate(texts) if t.startswith("dbt-defer:") and " resolved" in t)
    assert warning < summary < done
    assert REL_TEST in texts[warning]
    assert not [t for t in texts[done:] if t.startswith("dbt-defer:")]


def test_commands_that_run_no_tests_do_not_warn_about_them(proj):
    result = proj.dbt("compile", "-s", "model_b", env=ENV)
    assert not [m for m in ours(result, "warn") if "compares data across" in m]
    # the audit still flags the test: it is the same resolution
    flagged = {r["node"] for r in proj.audit()["resolutions"] if r["cross_environment"]}
    assert flagged == {REL_TEST}


def run_against_own_manifest_as_prod(proj):
    """`dbt run -s customers` deferring to a copy of this target's own manifest given as prod: refused."""
    proj.dbt("compile")
    copied = proj.root / "dev-copy"
    copied.mkdir(exist_ok=True)
    shutil.copy(proj.target / "manifest.json", copied / "manifest.json")
    return proj.dbt("run", "-s", "customers", env={"DBT_DEFER": "1", "DBT_DEFER_PROD_STATE": "dev-copy"},
                    expect=False)


def test_a_build_against_a_dev_manifest_given_as_prod_says_why_it_is_refused(proj):
    result = run_against_own_manifest_as_prod(proj)
    [node_result] = result.node_results().values()
    assert str(node_result.status) == "error"
    assert "refusing to write model.dbt_defer_integration_tests.customers" in node_result.message
    assert "records this target's own relations" in node_result.message
    assert "Point your target at a development schema, or name" not in node_result.message
    # said once, by the refusal: not also as a warning at start
    assert not [m for m in ours(result, "warn") if "own relations" in m]


def test_an_error_inside_ref_names_the_package_macro_apart_from_the_shim(proj):
    bad = proj.write("models/bad_ref.sql", "select * from {{ ref('a', 'b', 'c') }}\n")
    try:
        result = proj.dbt("compile", "-s", "bad_ref", env=ENV, expect=False)
    finally:
        bad.unlink()
    message = str(result.exception)
    assert "called by macro ref (macros/dbt_defer/ref.sql)" in message  # the package's
    assert "called by macro ref (macros/ref.sql)" in message  # the root project's shim


def test_a_misspelled_state_variable_is_warned_by_runs_and_status(proj, capsys):
    from dbt_defer import cli
    from dbt_harness import _environment

    env = {**ENV, "DBT_DEFER_PRDO_STATE": "prod-artifacts/manifest.json", "DBT_DEFER_STAGING_STATE": ""}
    settings = json.dumps({"dbt_defer": {"environments": [
        {"name": "staging", "state": "staging-artifacts"}, {"name": "prod", "state": "prod-artifacts"}]}})
    result = proj.dbt("compile", "-s", "stg_customers", "--vars", settings, env=env, expect=None)
    warned = [m for m in ours(result, "warn") if "DBT_DEFER_PRDO_STATE" in m]
    assert len(warned) == 1 and "did you mean DBT_DEFER_PROD_STATE?" in warned[0]

    capsys.readouterr()
    with _environment(env):
        cli.main(["status", "--project-dir", str(proj.root), "--target", "dev", "--vars", settings])
    out, err = capsys.readouterr()
    assert "did you mean DBT_DEFER_PROD_STATE?" in err
    assert "skipped: staging (DBT_DEFER_STAGING_STATE is empty, so that environment is not in the chain)" in out


# --- silent typos (issue 24): one did-you-mean line, one rule for every value -----------------


def test_a_hyphenated_vars_key_gets_a_did_you_mean_before_dbts_own_error(proj):
    settings = json.dumps({"dbt-defer": {"environments": [{"name": "prod", "state": "prod-artifacts"}]}})
    result = proj.dbt("compile", "-s", "customers", "--vars", settings, env={"DBT_DEFER": "1"}, expect=False)
    [line] = [m for m in ours(result, "warn") if "did you mean" in m]
    assert line == ("dbt-defer: vars: dbt-defer (--vars) is not read by dbt-defer; did you mean vars: dbt_defer "
                    "(with an underscore)? Rename the key")
    assert "--state or --defer-state are required" in str(result.exception)  # dbt's own error, as before


def test_a_misspelled_state_variable_gets_a_did_you_mean(proj):
    result = proj.dbt("compile", "-s", "customers", env={"DBT_DEFER": "1", "DBT_DEFER_PROD_STAT": "prod-artifacts"},
                      expect=False)
    [line] = [m for m in ours(result, "warn") if "did you mean" in m]
    assert line == ("dbt-defer: environment variable DBT_DEFER_PROD_STAT is not read by dbt-defer; did you mean "
                    "DBT_DEFER_PROD_STATE? Rename it")
    # and beside a working chain, once
    result = proj.dbt("compile", "-s", "customers", env={**ENV, "DBT_DEFER_PROD_STAT": "x"})
    assert len([m for m in ours(result, "warn") if "DBT_DEFER_PROD_STAT " in m]) == 1


@pytest.mark.parametrize("settings, needle", [
    ({"never_defer": "tag:pii"}, 'never_defer (dbt_project.yml or --vars) is the string "tag:pii"; it must be a '
                                 'list of dbt selectors: never_defer: ["tag:pii"]'),
    ({"audit_table": "yes"}, "audit_table (dbt_project.yml or --vars) is the string 'yes'; write true without quotes"),
])
def test_values_of_the_wrong_type_are_refused_like_a_quoted_limit(proj, settings, needle):
    result = proj.dbt("compile", "-s", "customers", "--vars", json.dumps({"dbt_defer": settings}), env=ENV,
                      expect=False)
    assert needle in str(result.exception)


def test_a_bad_meta_limit_is_reported_at_start_even_when_no_ref_reads_that_node(proj):
    with proj.edited("models/docs_example/_limit_typo.yml",
                     "models:\n  - name: model_a\n    config:\n      meta: {dbt_defer: {limit: \"1000\"}}\n"):
        result = proj.dbt("compile", "-s", "stg_customers", env=ENV, expect=False)
    assert ("dbt-defer: meta dbt_defer.limit of model.dbt_defer_integration_tests.model_a is '1000' "
            "(models/docs_example/_limit_typo.yml); use a whole number") in str(result.exception)
    assert not result.node_results()  # nothing ran


# --- honest summaries (issue 24) ------------------------------------------------------------------


def summary_of(result):
    [line] = [m for m in ours(result, "info") if " resolved" in m]
    return line


def test_commands_that_build_nothing_claim_no_savings(proj):
    built = proj.dbt("run", "-s", "model_b", env=ENV)
    assert "upstream nodes not rebuilt" in summary_of(built)
    for command in ("test", "compile"):
        result = proj.dbt(command, "-s", "model_b", env=ENV)
        assert "not rebuilt" not in summary_of(result), command
        assert proj.audit()["summary"]["not_built"] == 0 and proj.audit()["summary"]["saved_seconds"] is None


def test_a_run_whose_every_node_was_refused_claims_no_savings(proj):
    result = run_against_own_manifest_as_prod(proj)
    assert "refusing to write" in next(iter(result.node_results().values())).message
    assert "not rebuilt" not in summary_of(result)


SILENCED = """version: 2
models:
  - name: model_b
    columns:
      - name: id
        data_tests:
          - relationships:
              to: ref('model_a')
              field: id
              config:
                meta: {dbt_defer: {cross_environment: ok}}
"""


def test_the_cross_environment_warning_says_how_to_silence_it_and_meta_does(proj):
    result = proj.dbt("build", "-s", "model_b", env=ENV)
    [line] = [m for m in ours(result, "warn") if "compares data across" in m]
    assert line.endswith("silence this warning with config: {meta: {dbt_defer: {cross_environment: ok}}} on the test")
    with proj.edited("models/docs_example/_docs_example.yml", SILENCED):
        result = proj.dbt("build", "-s", "model_b", env=ENV)
    assert not [m for m in ours(result, "warn") if "compares data across" in m]
    flagged = {r["node"] for r in proj.audit()["resolutions"] if r["cross_environment"]}
    assert flagged == {REL_TEST}  # the audit still says what it is


def test_the_summary_names_the_tests_that_read_limited_parents(proj):
    result = proj.dbt("build", "-s", "model_b", "--vars", "{dbt_defer: {limits: {dev: 1}}}", env=ENV, expect=None)
    assert summary_of(result).endswith(f"; 1 data test read row-limited parents ({REL_TEST})")
    result = proj.dbt("build", "-s", "model_b", env=ENV)
    assert "row-limited" not in summary_of(result)


def test_a_run_with_deferral_off_removes_the_previous_deferred_runs_audit(proj):
    proj.dbt("compile", "-s", "customers", env=ENV)
    audit = proj.target / "dbt_defer_audit.json"
    assert audit.is_file()
    plain = proj.dbt("compile", "-s", "customers", env={k: v for k, v in ENV.items() if k != "DBT_DEFER"})
    assert not audit.exists()  # it would look like this run's
    assert not ours(plain)  # otherwise inert: not a line
    sql = proj.compiled("models/marts/customers.sql")
    again = proj.dbt("compile", "-s", "customers")  # no audit to remove: the same run
    assert again.success and proj.compiled("models/marts/customers.sql") == sql and not audit.exists()
