"""The resolution rules of SPEC §4, as plain logic: where one ref reads from.

Knows nothing of dbt's classes, the warehouse or the CLI: the caller hands in what it knows
about the referenced node (the chain's ``Candidate`` list) and two callables (does a relation
exist? did the developer change the node?). Imports ``config`` and ``chain`` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from dbt_defer.chain import Candidate, Location, first_existing, render
from dbt_defer.config import DEV

__all__ = ["Candidate", "Location", "render", "resolve", "Resolution", "Unresolved", "RestrictedMissing"]

EPHEMERAL = "ephemeral"
# reasons (SPEC §5): short machine-readable words
SELECTED = "selected"
RESTRICTED = "restricted"
DEV_EXISTS = "dev_exists"
DEV_MODIFIED = "dev_modified"
DEV_FALLBACK = "dev_fallback"
DEFERRED = "deferred"
MISSING = "missing"  # env and reason of a ref found nowhere (SPEC §4.6)


@dataclass(frozen=True)
class Resolution:
    env: str  # "dev", "ephemeral" or an environment name
    reason: str
    location: Optional[Location]  # None for ephemeral


class Unresolved(Exception):
    """No place holds the referenced node. ``places`` lists every place looked at."""

    def __init__(self, places: Sequence[str]):
        super().__init__("; ".join(places))
        self.places = list(places)


class RestrictedMissing(Exception):
    def __init__(self, location: Location):
        super().__init__(render(location))
        self.location = location


def resolve(
    *,
    ephemeral: bool,
    selected: bool,
    restricted: bool,
    dev_location: Location,
    policy: str,
    candidates: Sequence[Candidate],
    exists: Callable[[Location], bool],
    modified_against: Callable[[str], bool],
    builds_selection: bool = True,
) -> Resolution:
    """Apply SPEC §4 in order; raise Unresolved/RestrictedMissing when nothing serves the ref.

    ``modified_against(env)`` tells whether the node's code or config differs from what ``env``
    holds; it is only called under the ``modified`` policy. ``builds_selection`` is False for
    commands that build nothing (compile, show, docs, test): there a selected node that is not
    in dev yet is read from where it exists, like dbt's --defer, else from dev.
    """
    if ephemeral:
        return Resolution(EPHEMERAL, EPHEMERAL, None)
    if selected:
        if builds_selection or exists(dev_location):
            return Resolution(DEV, SELECTED, dev_location)
        try:
            return resolve(
                ephemeral=False, selected=False, restricted=restricted, dev_location=dev_location,
                policy=policy, candidates=candidates, exists=exists, modified_against=modified_against,
            )
        except (Unresolved, RestrictedMissing):
            return Resolution(DEV, SELECTED, dev_location)
    if restricted:
        if not exists(dev_location):
            raise RestrictedMissing(dev_location)
        return Resolution(DEV, RESTRICTED, dev_location)

    dev_exists = policy != "never" and exists(dev_location)
    if dev_exists and policy == "always":
        return Resolution(DEV, DEV_EXISTS, dev_location)

    chosen, places = first_existing(candidates, exists)

    if policy == "modified" and dev_exists:
        if chosen is None or modified_against(chosen.env):
            return Resolution(DEV, DEV_MODIFIED, dev_location)
    if chosen is not None:
        return Resolution(chosen.env, DEFERRED, chosen.location)

    if policy == "never" and exists(dev_location):
        # --favor-state prefers the chain, but like dbt falls back to the current target
        return Resolution(DEV, DEV_FALLBACK, dev_location)
    places.insert(0, f"{DEV}: {render(dev_location)} does not exist")
    raise Unresolved(places)
