"""Unit tests for dbt_defer.resolution.resolve: each branch of SPEC §4."""

from __future__ import annotations

import pytest

from dbt_defer.resolution import (
    Candidate,
    Resolution,
    RestrictedMissing,
    Unresolved,
    render,
    resolve,
)

DEV_LOC = ("db", "dev_me", "orders")
STG_LOC = ("db", "staging", "orders")
PROD_LOC = ("db", "prod", "orders")


class World:
    """Which relations exist, and a record of every existence/modified question asked."""

    def __init__(self, *existing, modified=()):
        self.existing = set(existing)
        self.modified = set(modified)
        self.asked = []
        self.modified_asked = []

    def exists(self, loc):
        self.asked.append(loc)
        return loc in self.existing

    def modified_against(self, env):
        self.modified_asked.append(env)
        return env in self.modified


def run(world, *, ephemeral=False, selected=False, restricted=False, policy="always", candidates=None):
    if candidates is None:
        candidates = [Candidate("staging", STG_LOC), Candidate("prod", PROD_LOC)]
    return resolve(
        ephemeral=ephemeral,
        selected=selected,
        restricted=restricted,
        dev_location=DEV_LOC,
        policy=policy,
        candidates=candidates,
        exists=world.exists,
        modified_against=world.modified_against,
    )


# 1. ephemeral ---------------------------------------------------------------------------------


def test_ephemeral_is_never_deferred_even_when_selected_or_restricted():
    world = World(DEV_LOC, STG_LOC, PROD_LOC)
    for selected in (False, True):
        for restricted in (False, True):
            assert run(world, ephemeral=True, selected=selected, restricted=restricted) == Resolution(
                "ephemeral", "ephemeral", None
            )
    assert world.asked == []


# 2. selected ----------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["always", "modified", "never"])
def test_selected_resolves_to_dev_without_looking(policy):
    world = World(STG_LOC, PROD_LOC)  # dev does not exist yet: it is being built
    assert run(world, selected=True, policy=policy) == Resolution("dev", "selected", DEV_LOC)
    assert world.asked == [] and world.modified_asked == []


# 3. restricted --------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["always", "modified", "never"])
def test_restricted_reads_dev_whatever_the_policy(policy):
    world = World(DEV_LOC, STG_LOC, PROD_LOC)
    assert run(world, restricted=True, policy=policy) == Resolution("dev", "restricted", DEV_LOC)
    assert STG_LOC not in world.asked and PROD_LOC not in world.asked


def test_restricted_missing_in_dev_fails_and_never_reads_the_chain():
    world = World(STG_LOC, PROD_LOC)
    with pytest.raises(RestrictedMissing) as info:
        run(world, restricted=True)
    assert info.value.location == DEV_LOC
    assert "dev_me.orders" in str(info.value)
    assert world.asked == [DEV_LOC]


def test_selected_wins_over_restricted():
    world = World()
    assert run(world, selected=True, restricted=True).reason == "selected"


# 4. dev ---------------------------------------------------------------------------------------


def test_always_uses_an_existing_dev_relation():
    world = World(DEV_LOC, STG_LOC, PROD_LOC)
    assert run(world, policy="always") == Resolution("dev", "dev_exists", DEV_LOC)
    assert world.asked == [DEV_LOC]


def test_always_without_dev_relation_defers():
    world = World(STG_LOC, PROD_LOC)
    assert run(world, policy="always") == Resolution("staging", "deferred", STG_LOC)


def test_modified_uses_dev_when_the_node_changed_against_the_env_it_would_defer_to():
    world = World(DEV_LOC, STG_LOC, PROD_LOC, modified={"staging"})
    assert run(world, policy="modified") == Resolution("dev", "dev_modified", DEV_LOC)
    assert world.modified_asked == ["staging"]


def test_modified_compares_with_the_env_actually_chosen():
    # staging cannot serve it, so the comparison is against prod
    world = World(DEV_LOC, PROD_LOC, modified={"staging"})
    assert run(world, policy="modified") == Resolution("prod", "deferred", PROD_LOC)
    assert world.modified_asked == ["prod"]


def test_modified_ignores_an_unchanged_leftover_dev_relation():
    world = World(DEV_LOC, STG_LOC, PROD_LOC)
    assert run(world, policy="modified") == Resolution("staging", "deferred", STG_LOC)


def test_modified_without_dev_relation_never_asks_about_modification():
    world = World(PROD_LOC, modified={"prod"})
    assert run(world, policy="modified") == Resolution("prod", "deferred", PROD_LOC)
    assert world.modified_asked == []


def test_modified_uses_dev_when_no_environment_can_serve_it():
    world = World(DEV_LOC)
    assert run(world, policy="modified") == Resolution("dev", "dev_modified", DEV_LOC)


def test_never_prefers_the_chain_over_an_existing_dev_relation():
    world = World(DEV_LOC, STG_LOC, PROD_LOC)
    assert run(world, policy="never") == Resolution("staging", "deferred", STG_LOC)
    assert DEV_LOC not in world.asked


def test_never_falls_back_to_dev_like_dbt_favor_state():
    world = World(DEV_LOC)
    assert run(world, policy="never") == Resolution("dev", "dev_fallback", DEV_LOC)


# 5. chain -------------------------------------------------------------------------------------


def test_first_environment_that_holds_it_wins():
    world = World(STG_LOC, PROD_LOC)
    assert run(world).env == "staging"


def test_environment_whose_relation_is_missing_is_skipped():
    world = World(PROD_LOC)
    assert run(world) == Resolution("prod", "deferred", PROD_LOC)
    assert world.asked == [DEV_LOC, STG_LOC, PROD_LOC]


def test_environment_that_cannot_serve_it_is_skipped_without_a_warehouse_query():
    world = World(STG_LOC, PROD_LOC)  # a stale staging relation exists...
    candidates = [Candidate("staging", None, "status 'error' in run_results"), Candidate("prod", PROD_LOC)]
    assert run(world, candidates=candidates) == Resolution("prod", "deferred", PROD_LOC)
    assert STG_LOC not in world.asked


def test_chain_stops_at_the_first_hit():
    world = World(STG_LOC, PROD_LOC)
    run(world)
    assert PROD_LOC not in world.asked


def test_three_environment_chain():
    qa = ("db", "qa", "orders")
    world = World(qa, PROD_LOC)
    candidates = [Candidate("staging", STG_LOC), Candidate("qa", qa), Candidate("prod", PROD_LOC)]
    assert run(world, candidates=candidates) == Resolution("qa", "deferred", qa)


# 6. nothing found -----------------------------------------------------------------------------


def test_nothing_found_lists_every_place_looked_at_in_order():
    world = World()
    candidates = [
        Candidate("staging", None, "no enabled model in /s/manifest.json"),
        Candidate("prod", PROD_LOC),
    ]
    with pytest.raises(Unresolved) as info:
        run(world, candidates=candidates)
    places = info.value.places
    assert len(places) == 3
    assert places[0].startswith("dev:") and "dev_me.orders" in places[0]
    assert places[1].startswith("staging:") and "/s/manifest.json" in places[1]
    assert places[2].startswith("prod:") and "prod.orders" in places[2] and "does not exist" in places[2]


def test_nothing_found_with_an_empty_chain():
    with pytest.raises(Unresolved) as info:
        run(World(), candidates=[])
    assert len(info.value.places) == 1 and "dev_me.orders" in info.value.places[0]


@pytest.mark.parametrize("policy", ["always", "modified"])
def test_nothing_found_under_each_policy(policy):
    with pytest.raises(Unresolved):
        run(World(), policy=policy)


def test_render_skips_empty_parts():
    assert render((None, "s", "t")) == "s.t"
    assert render(("d", "s", "t")) == "d.s.t"


def test_selected_in_a_command_that_builds_nothing_reads_from_the_chain_when_dev_lacks_it():
    seen = []

    def exists(loc):
        seen.append(loc)
        return loc == PROD_LOC

    result = resolve(
        ephemeral=False, selected=True, restricted=False, dev_location=DEV_LOC, policy="always",
        candidates=[Candidate("prod", PROD_LOC)], exists=exists, modified_against=lambda env: False,
        builds_selection=False,
    )
    assert (result.env, result.reason, result.location) == ("prod", "deferred", PROD_LOC)
    assert DEV_LOC in seen


def test_selected_in_a_command_that_builds_nothing_falls_back_to_dev_when_nothing_has_it():
    result = resolve(
        ephemeral=False, selected=True, restricted=False, dev_location=DEV_LOC, policy="always",
        candidates=[Candidate("prod", None, "not in manifest")], exists=lambda loc: False,
        modified_against=lambda env: False, builds_selection=False,
    )
    assert (result.env, result.reason, result.location) == ("dev", "selected", DEV_LOC)
