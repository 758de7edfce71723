"""``dbt-defer state`` (SPEC §11): the chain's choice for every node, computed before the engine
starts, written as one merged deferral manifest plus a sidecar.

Steps: the project as the engine parses it for the running target (``engine.ls``/``parse`` into
a scratch folder), the selection and the restricted nodes (``never_defer`` through the engine's
own selector), the chain (``chain.load_chain``: every check of §7), the write guard
(``guard.write_clashes``), one existence listing of every schema involved (through the engine:
``run-operation dbt_defer.portable_relations``), the rules of §4 for every node
(``resolution.resolve``), then ``DIR/manifest.json`` (a manifest v12: the project's own, whose
refable nodes are the chosen environment's records; nodes found nowhere, restricted, ephemeral
or selected-and-built are left out, so the engine renders them as dev) and
``DIR/dbt_defer_state.json`` (per node: environment, reason, relation; the chain; the guard).

Imports ``config``, ``manifests``, ``chain``, ``resolution``, ``guard``, ``audit``, ``localfiles``,
``untrusted`` and the portable ``engine``/``project``. Nothing of dbt-core 1.x.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple

import msgspec

from dbt_defer import audit, chain, guard, limits
from dbt_defer.config import DEV, gc_paused
from dbt_defer.localfiles import replace_atomically
from dbt_defer.manifests import ManifestError
from dbt_defer.portable.engine import Engine, Listing
from dbt_defer.portable.project import PNode, PortableContext, ProjectError, ProjectManifest
from dbt_defer.resolution import (
    DEFERRED,
    EPHEMERAL,
    MISSING,
    RESTRICTED,
    RestrictedMissing,
    Unresolved,
    resolve,
)
from dbt_defer.version import __version__

SIDECAR = "dbt_defer_state.json"
STATE_FOLDER = "dbt_defer_portable"  # under the target path, by default
BUILDING = frozenset({"run", "build", "seed", "snapshot", "clone"})

Warn = Callable[[str], None]


class StateError(RuntimeError):
    """The state cannot be computed; the message is the line(s). ``code``: the exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class GuardRefusal(StateError):
    pass


def compatible(schema_version: str) -> bool:
    """The merged manifest is a v12 manifest: every environment's must be one too."""
    return str(schema_version).rstrip("/").endswith("/manifest/v12.json")


@dataclass
class NodeChoice:
    env: str  # the running target's name for dev, an environment's name, "ephemeral" or "missing"
    reason: str
    relation: Optional[str]  # as the engine renders it (the environment's relation_name), when known
    location: Optional[Tuple[Optional[str], Optional[str], str]] = None
    in_state: bool = False  # written into the merged manifest
    places: List[str] = field(default_factory=list)
    limit: Optional[int] = None  # rows, when the merged state points at a limited view of it
    view: Optional[str] = None  # that view, as the engine renders it
    view_location: Optional[Tuple[Optional[str], Optional[str], str]] = None

    def as_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"env": self.env, "reason": self.reason, "relation": self.relation,
                               "in_state": self.in_state, "limit": self.limit}
        if self.view:
            out["view"] = self.view
        if self.places:
            out["places"] = self.places
        return out


@dataclass
class StateResult:
    folder: str
    target: str
    choices: Dict[str, NodeChoice]
    selected: FrozenSet[str]
    environments: List[chain.Environment]
    project: ProjectManifest
    plain: bool = False  # the running target builds the last environment: nothing to defer to
    engine_calls: int = 0

    def describe(self) -> List[Dict[str, Any]]:
        return [e.describe() for e in self.environments]


def _relation_name(raw_node: Dict[str, Any], location: Tuple[Optional[str], Optional[str], str]) -> str:
    name = raw_node.get("relation_name") if isinstance(raw_node, dict) else None
    if isinstance(name, str) and name:
        return name
    return ".".join(f'"{p}"' for p in location if p)


def _normalized(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def compute(ctx: PortableContext, engine: Engine, *, select: Sequence[str] = (), exclude: Sequence[str] = (),
            selector: Optional[str] = None, builds: bool = True, store_failures: bool = False,
            out: Optional[str] = None, warn: Warn) -> StateResult:
    """Everything ``dbt-defer state`` does; raises StateError (GuardRefusal: nothing written)."""
    cfg = ctx.cfg
    for notice in cfg.notices:
        warn(notice)
    scratch = tempfile.mkdtemp(prefix="dbt-defer-parse-")
    try:
        return _compute(ctx, engine, scratch, select, exclude, selector, builds, store_failures, out, warn)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _compute(ctx, engine, scratch, select, exclude, selector, builds, store_failures, out, warn) -> StateResult:
    cfg = ctx.cfg
    if not cfg.configured:
        raise StateError(
            "dbt-defer: no environment is configured (vars: dbt_defer: environments, "
            "DBT_DEFER_<NAME>_STATE, or DBT_DEFER_STATE/DBT_STATE); nothing to defer to", 2)
    # 1. the engine's read-only calls, at once: the project + selection (a parse of the whole
    # project), the never_defer selection (another), and the existence listing of the
    # environments' schemas — in a one-macro project of its own (``listing_project``: a tenth
    # of a second on dbt Core v2) when the installed package is found, else in the project.
    target = ctx.target_name
    own, specs = cfg.chain_for_target(target) if target else (None, cfg.environments)
    dirs = [os.path.join(scratch, name) for name in ("project", "never_defer", "listing")]
    folder = os.path.abspath(out or os.path.join(ctx.target_path, STATE_FOLDER))
    last = _last_state(folder)
    # dbt 1.x (as the previous state here found it) has no listing in Jinja: no listing project
    known_1x = last.engine == " ".join(engine.command) and str(last.engine_dbt_version or "").startswith("1.")
    aux = None if known_1x else ctx.listing_project(os.path.join(scratch, "listing-project"))
    lister = engine.elsewhere(*aux) if aux else None

    # --partial-parse (opt-in, dbt Core v2): the listing first (a tenth of a second), for the
    # rendered target that keys the engine's parse cache; then the engine's partial parse
    envs: List[chain.Environment] = []
    listing: Optional[Listing] = None
    parse_dir, flags, never_dir = dirs[0], (), dirs[1]
    if ctx.partial_parse and lister is not None and target:
        envs = _load_chain(ctx, specs, warn)
        listing = lister.list_relations(_env_schemas(envs, None) | set(_last_dev_schemas(last, target)), dirs[2])
        if (listing.engine_major or 0) >= 2 and str(listing.target.get("name") or "") == target:
            parse_dir = _parse_cache(ctx, engine, listing.target)
            never_dir, flags = parse_dir + "-never_defer", ("--partial-parse",)
        else:
            listing, envs = None, []

    def project_call() -> FrozenSet[str]:
        if select or exclude or selector:
            return frozenset(engine.ls(parse_dir, select, exclude, selector, flags=flags))
        engine.parse(parse_dir, flags=flags)
        return frozenset()

    def listing_call(envs, project, dev=()) -> Listing:
        if lister is not None:
            found = lister.list_relations(_env_schemas(envs, project) | set(dev), dirs[2])
            if (found.engine_major or 0) >= 2:
                return found
            # dbt 1.x has no listing in Jinja: it probes the project's own names (below)
        return engine.list_relations(_env_schemas(envs, project), dirs[2], _extra(envs, project), dev_schemas=True)

    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        selected_f = pool.submit(project_call)
        never_f = pool.submit(engine.ls, never_dir, list(cfg.never_defer), flags=flags) if cfg.never_defer else None
        listing_f = None
        if listing is None and target:
            # while the engine parses: the chain, then its schemas' listing (with the dev schemas
            # the previous state of this target recorded, so that usually no second call is needed)
            envs = _load_chain(ctx, specs, warn)
            listing_f = pool.submit(listing_call, envs, None, _last_dev_schemas(last, target))
        selected = selected_f.result()
        matched = never_f.result() if never_f is not None else []
        if listing_f is not None:
            listing = listing_f.result()
    project = ProjectManifest.load(os.path.join(parse_dir, "manifest.json"))
    if ctx.name and project.metadata.project_name and project.metadata.project_name != ctx.name:
        raise StateError(f"dbt-defer: the engine parsed project {project.metadata.project_name!r}, not {ctx.name!r}")
    restricted = set(project.meta_restricted())
    if cfg.never_defer:
        if not matched:
            warn(f"dbt-defer: vars: dbt_defer: never_defer {list(cfg.never_defer)} matches no node; nothing is "
                 "restricted by it — check it for a typo")
        restricted |= set(matched)
    default_db = project.default_database()

    # 2. the target the engine ran (its name may be Jinja in profiles.yml): the chain for it
    if listing is None or str(listing.target.get("name") or "") != target:
        if listing is None:
            listing = (lister or engine).list_relations([], dirs[2])
        target = str(listing.target.get("name") or "")
        own, specs = cfg.chain_for_target(target)
        envs = _load_chain(ctx, specs, warn)
        listing = listing_call(envs, project)
    if lister is not None and (listing.engine_major or 0) >= 2:
        # the dev relations (the project's own schemas, as the engine rendered them)
        more = {pair for pair in _dev_schemas(project) if (pair[0].lower(), pair[1].lower()) not in listing.listed}
        if more:
            listing.add(lister.list_relations(more, dirs[2]))
    if own is not None:
        if not specs:
            warn(f"dbt-defer: target '{target}' builds environment '{own.name}', the last of the chain: "
                 "nothing to defer to, so this run is plain dbt (no deferral)")
        else:
            warn(f"dbt-defer: target '{target}' builds environment '{own.name}': deferring to "
                 + ", ".join(e.name for e in envs))
    default_db = default_db or listing.target.get("database")
    if (listing.engine_major or 0) >= 2:
        # dbt Core v2 never defers a selected node (compile and show included): resolve as a build
        builds = True

    # 3. the write guard, before any write: nothing is written when it refuses (SPEC §7)
    if envs:
        _guard(project, envs, selected, builds, store_failures, default_db, listing, target, warn)

    # 4. the rules of §4 for every node
    exists = lambda loc: listing.exists(loc, default_db)  # noqa: E731
    choices = _choose(project, envs, selected, frozenset(restricted), cfg.dev_relations, exists, builds, target)

    # 5. row limits (SPEC §6): views in the running target's scratch schemas
    _check_folder(ctx, folder, envs)
    _limit(ctx, lister if lister is not None and (listing.engine_major or 0) >= 2 else engine, scratch, project,
           envs, choices, target, listing)
    if lister is not None:
        engine.absorb(lister)

    # 6. the merged manifest and the sidecar
    _write(folder, project.path, envs, choices, project, target, selected, ctx, engine, listing)
    return StateResult(folder, target, choices, selected, envs, project, plain=own is not None and not envs,
                       engine_calls=len(engine.calls))


class _Consumer:
    resource_type = "model"  # a view serves every consumer; data tests are swapped back in dbt_defer.ref


def view_schema(target_schema: str, env: str, schema: Optional[str]) -> str:
    return f"{target_schema}_dd_{env}_{schema or ''}".lower()


def _limit(ctx, engine, scratch, project, envs, choices, target, listing) -> None:
    cfg = ctx.cfg
    applies, _ = cfg.limit_for_target(target)
    if not applies or not envs:
        return
    database, schema = listing.target.get("database"), str(listing.target.get("schema") or "")
    views = []
    for uid, choice in choices.items():
        if not choice.in_state or choice.env in (target, EPHEMERAL, MISSING) or choice.location is None:
            continue
        try:
            limit = limits.limit_for(cfg, target, _Consumer(), project.nodes[uid])
        except limits.LimitError as exc:
            raise StateError(str(exc), 2) from None
        if limit is None:
            continue
        src = list(choice.location)
        dst = [database, view_schema(schema, choice.env, src[1]), src[2]]
        views.append({"uid": uid, "src": src, "dst": dst, "limit": limit})
    if not views:
        return
    made = engine.create_limited_views(views, os.path.join(scratch, "views"))
    for view in views:
        choice = choices[view["uid"]]
        choice.limit, choice.view, choice.view_location = view["limit"], made[view["uid"]], tuple(view["dst"])


def views_of(choices: Dict[str, NodeChoice]) -> Dict[str, List[Optional[str]]]:
    """'<database>.<view schema>' -> [database, schema] of the environment's relations: what
    dbt_defer.ref swaps a data test's limited ref back to (DBT_DEFER_PORTABLE)."""
    out: Dict[str, List[Optional[str]]] = {}
    for choice in choices.values():
        if choice.view_location and choice.location:
            key = f"{choice.view_location[0] or ''}.{choice.view_location[1] or ''}".lower()
            out[key] = [choice.location[0], choice.location[1]]
    return out


PARSE_CACHE = "dbt_defer_parse"  # under the target path: the engine's partial-parse caches


def _parse_cache(ctx: PortableContext, engine: Engine, target: Dict[str, Any]) -> str:
    """The target path of the engine's partial-parse calls: one per engine, rendered target
    (dbt Core v2 alpha.4's cache does not notice a --target switch or a changed env_var() in
    profiles.yml, so each rendered target gets a cache of its own), --vars and profiles folder."""
    key = json.dumps([engine.command, {k: target.get(k) for k in ("name", "type", "database", "schema")},
                      ctx.vars_text, os.path.abspath(engine.profiles_dir or ctx.root)], sort_keys=True)
    return os.path.join(ctx.target_path, PARSE_CACHE, hashlib.sha256(key.encode()).hexdigest()[:16])


def _dev_schemas(project: ProjectManifest) -> List[Tuple[str, str]]:
    return sorted({(n.database or "", n.schema or "") for n in project.refable().values()})


class _SidecarMeta(msgspec.Struct):
    target: Optional[str] = None
    engine: Optional[str] = None
    engine_dbt_version: Optional[str] = None
    dev_schemas: List[Tuple[str, str]] = msgspec.field(default_factory=list)


class _Sidecar(msgspec.Struct):
    metadata: _SidecarMeta = msgspec.field(default_factory=_SidecarMeta)


def _last_state(folder: str) -> _SidecarMeta:
    """What the previous state in ``folder`` recorded: its target's dev schemas (a guess, checked
    after the parse: schemas it misses are listed then) and the engine's dbt version."""
    try:
        with open(os.path.join(folder, SIDECAR), "rb") as fh:
            return msgspec.json.decode(fh.read(), type=_Sidecar).metadata
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return _SidecarMeta()


def _last_dev_schemas(last: _SidecarMeta, target: Optional[str]) -> List[Tuple[str, str]]:
    return [tuple(p) for p in last.dev_schemas] if last.target == target else []


def _env_nodes(envs, project):
    """(environment, node) of every usable relation the environments record (for the project's
    nodes, when the project is known)."""
    for env in envs:
        for uid, node in env.manifest.nodes.items():
            if uid in env.manifest.unusable or node.materialized == "ephemeral":
                continue
            if project is None or uid in project.nodes:
                yield env, node


def _env_schemas(envs, project) -> set:
    return {(node.database, node.schema) for _, node in _env_nodes(envs, project)}


def _extra(envs, project) -> set:
    """Environment identifiers other than the node's own name (an alias; dbt 1.x has no listing
    in Jinja and probes the project's names plus these)."""
    return {(node.database, node.schema, node.identifier) for _, node in _env_nodes(envs, project)
            if node.identifier.lower() != node.unique_id.split(".")[2].lower()}


def _load_chain(ctx: PortableContext, specs, warn: Warn) -> List[chain.Environment]:
    try:
        return chain.load_chain(specs, ctx.target_path, ctx.name, native=False,
                                max_age_hours=ctx.cfg.max_age_hours, warn=warn, is_compatible=compatible)
    except (chain.ChainError, ManifestError) as exc:
        raise StateError(str(exc)) from None


def _guard(project, envs, selected, builds, store_failures, default_db, listing, target, warn) -> None:
    checked = selected if builds else frozenset(
        uid for uid in selected if project.nodes.get(uid) is not None and project.nodes[uid].resource_type == "test")
    suspects = {}
    for env in envs:
        why = guard.this_target_warning(env, project, default_db, target)
        if why:
            suspects[env.name] = why
    refused, shared = guard.write_clashes(
        checked, project, envs, default_database=default_db,
        target_schema=listing.target.get("schema"), store_failures=store_failures, suspects=suspects,
    )
    for line in shared.values():
        warn(line)
    if refused:
        raise GuardRefusal(
            "\n".join(refused[uid] for uid in sorted(refused))
            + f"\ndbt-defer: {len(refused)} selected node(s) would write relations a chain environment records; "
            "no dbt was started and nothing was written")
    for env in envs:
        if env.name in suspects:
            warn(f"dbt-defer: environment '{env.name}' ({chain.source_of(env.spec)}) {suspects[env.name]}")


def _choose(project: ProjectManifest, envs, selected, restricted, policy, exists, builds, target) -> Dict[str, NodeChoice]:
    choices: Dict[str, NodeChoice] = {}
    by_name = {e.name: e for e in envs}

    def modified_against(node: PNode, env_name: str) -> bool:
        other = by_name[env_name].manifest.nodes.get(node.unique_id)
        return (other is None or other.checksum != node.checksum.checksum
                or _normalized(other.unrendered_config) != _normalized(node.unrendered_config))

    for uid, node in sorted(project.refable().items()):
        if node.is_ephemeral_model:
            choices[uid] = NodeChoice(EPHEMERAL, EPHEMERAL, None)
            continue
        dev_location = node.location
        dev_relation = node.relation_name or _relation_name({}, dev_location)
        try:
            result = resolve(
                ephemeral=False, selected=uid in selected, restricted=uid in restricted,
                dev_location=dev_location, policy=policy, candidates=[e.candidate(uid) for e in envs],
                exists=exists, modified_against=lambda env, node=node: modified_against(node, env),
                builds_selection=builds,
            )
        except RestrictedMissing:
            choices[uid] = NodeChoice(target, RESTRICTED, dev_relation, dev_location,
                                      places=[f"{DEV}: {chain.render(dev_location)} does not exist"])
            continue
        except Unresolved as exc:
            choices[uid] = NodeChoice(MISSING, MISSING, dev_relation, dev_location, places=list(exc.places))
            continue
        if result.env == DEV:
            # selected and restricted nodes: the engine renders them as dev by itself (left out);
            # a dev relation the policy picks goes into the state (--favor-state makes it count)
            in_state = result.reason not in ("selected", RESTRICTED)
            choices[uid] = NodeChoice(target, result.reason, dev_relation, dev_location, in_state=in_state)
        else:
            choices[uid] = NodeChoice(result.env, result.reason, None, result.location, in_state=True)
    return choices


def _check_folder(ctx: PortableContext, folder: str, envs) -> None:
    real = os.path.realpath(folder)
    if real == os.path.realpath(ctx.target_path):
        raise StateError(f"dbt-defer: --out {folder} is the target path, where dbt writes its own manifest.json; "
                         "use a folder of its own (default: <target-path>/dbt_defer_portable)", 2)
    for env in envs:
        if env.spec.is_uri:
            continue
        state = os.path.realpath(env.spec.state)
        state = state if os.path.isdir(state) else os.path.dirname(state)
        if real == state or real.startswith(state.rstrip(os.sep) + os.sep):
            raise StateError(f"dbt-defer: --out {folder} is inside environment '{env.name}''s state folder; "
                             "writing there would replace that environment's manifest", 2)


class _Top(msgspec.Struct):
    nodes: Dict[str, msgspec.Raw] = msgspec.field(default_factory=dict)


def _raw_nodes(path: str) -> Dict[str, msgspec.Raw]:
    with open(path, "rb") as fh:
        return msgspec.json.decode(fh.read(), type=_Top).nodes


def _write(folder, project_path, envs, choices, project, target, selected, ctx, engine, listing) -> None:
    with gc_paused():
        with open(project_path, "rb") as fh:
            top = msgspec.json.decode(fh.read(), type=Dict[str, msgspec.Raw])
        own_nodes = msgspec.json.decode(top["nodes"], type=Dict[str, msgspec.Raw]) if "nodes" in top else {}
        env_nodes: Dict[str, Dict[str, msgspec.Raw]] = {}
        nodes: Dict[str, msgspec.Raw] = {}
        for uid, choice in choices.items():
            if not choice.in_state:
                continue
            if choice.env == target and choice.location == project.nodes[uid].location:
                nodes[uid] = own_nodes[uid]
                continue
            env = next(e for e in envs if e.name == choice.env)
            if env.name not in env_nodes:
                env_nodes[env.name] = _raw_nodes(env.manifest.path)
            raw = env_nodes[env.name][uid]
            record = msgspec.json.decode(raw)
            choice.relation = _relation_name(record, choice.location)
            if choice.view_location is not None:  # the limited view stands in for the relation
                record["database"], record["schema"] = choice.view_location[0], choice.view_location[1]
                record["relation_name"] = choice.view
                raw = msgspec.Raw(msgspec.json.encode(record))
            nodes[uid] = raw
        merged = dict(top)
        merged["nodes"] = msgspec.Raw(msgspec.json.encode(nodes))
        # functions are not relations a listing can confirm: the engine reads them from dev
        data = msgspec.json.encode(merged)
    os.makedirs(folder, exist_ok=True)
    name = lambda: f".dbt_defer_state.{os.getpid()}.{secrets.token_hex(6)}.json"  # noqa: E731
    sidecar = {
        "metadata": {
            "dbt_defer_version": __version__, "generated_at": audit.now_iso(), "target": target,
            "project": ctx.name, "engine": " ".join(engine.command), "dev_relations": ctx.cfg.dev_relations,
            "engine_calls": len(engine.calls), "engine_seconds": round(engine.seconds, 3),
            "engine_dbt_version": listing.target.get("dbt_version"), "dev_schemas": _dev_schemas(project),
        },
        "environments": [e.describe() for e in envs],
        "selected": sorted(selected),
        "nodes": {uid: c.as_dict() for uid, c in sorted(choices.items())},
    }
    replace_atomically(os.path.join(folder, "manifest.json"), data, name)
    replace_atomically(os.path.join(folder, SIDECAR), msgspec.json.format(msgspec.json.encode(sidecar), indent=2) + b"\n",
                       name)


def read_sidecar(folder: str) -> Dict[str, Any]:
    with open(os.path.join(folder, SIDECAR), encoding="utf-8") as fh:
        return json.load(fh)
