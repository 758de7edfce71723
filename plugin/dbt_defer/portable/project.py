"""The running project, read without dbt-core 1.x (SPEC §11): dbt_project.yml, the profile's
target, the settings (``settings.load_config``, as a deferred dbt run reads them) and the
project's own ``manifest.json`` as the engine parsed it for the running target.

Owns ``PortableContext`` and ``ProjectManifest`` (the nodes the rules and the write guard look
at: names, relation, config, meta, checksum, parents). Imports ``config``, ``settings`` and
``untrusted``; PyYAML for the YAML files. Knows nothing of chains or the engine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Tuple

import msgspec

from dbt_defer.config import DeferConfig, DeferConfigError, truthy
from dbt_defer.settings import load_config, overlay_settings


PARTIAL_PARSE_VAR = "DBT_DEFER_PARTIAL_PARSE"


class ProjectError(RuntimeError):
    """The project cannot be read; the message is the one line (exit 2)."""


def _yaml(text: str, what: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ProjectError(f"dbt-defer: {what} is not valid YAML ({str(exc).splitlines()[0]})") from None


def find_project_root(project_dir: Optional[str]) -> str:
    """--project-dir, DBT_PROJECT_DIR, else the nearest folder up holding dbt_project.yml (as dbt)."""
    given = project_dir or os.environ.get("DBT_PROJECT_DIR")
    if given:
        root = os.path.abspath(os.path.expanduser(given))
    else:
        root = here = os.getcwd()
        while not os.path.isfile(os.path.join(here, "dbt_project.yml")):
            parent = os.path.dirname(here)
            if parent == here:
                break
            here = parent
        else:
            root = here
    if not os.path.isfile(os.path.join(root, "dbt_project.yml")):
        raise ProjectError(f"dbt-defer: no dbt_project.yml in {root}; run from your dbt project or pass --project-dir")
    return root


class PortableContext:
    """The project as the engine will see it: root, name, profile target, target path, settings."""

    def __init__(self, *, project_dir: Optional[str] = None, profiles_dir: Optional[str] = None,
                 target: Optional[str] = None, vars: Optional[str] = None, target_path: Optional[str] = None,
                 favor_state: bool = False, partial_parse: bool = False,
                 environ: Optional[Mapping[str, str]] = None) -> None:
        environ = os.environ if environ is None else environ
        self.root = find_project_root(project_dir)
        path = os.path.join(self.root, "dbt_project.yml")
        with open(path, encoding="utf-8") as fh:
            self.project = _yaml(fh.read(), path)
        if not isinstance(self.project, dict):
            raise ProjectError(f"dbt-defer: {path} is not a dbt project file (expected a mapping)")
        self.name = str(self.project.get("name") or "")
        self.vars_text = vars
        self.cli_vars = _yaml(vars, "--vars") if vars else {}
        if not isinstance(self.cli_vars, dict):
            raise ProjectError("dbt-defer: --vars must be a YAML mapping, e.g. '{dbt_defer: {max_age_hours: 24}}'")
        self.profiles_dir = profiles_dir or environ.get("DBT_PROFILES_DIR")
        raw_tp = target_path or environ.get("DBT_TARGET_PATH") or self.project.get("target-path") or "target"
        raw_tp = str(raw_tp)
        self.target_path = os.path.normpath(raw_tp if os.path.isabs(raw_tp) else os.path.join(self.root, raw_tp))
        self.target_given = target or environ.get("DBT_TARGET")
        self.target_name = self.target_given or self._default_target()
        self.favor_state = favor_state or truthy(environ.get("DBT_FAVOR_STATE"))
        # opt-in: the engine's own partial parse (dbt Core v2), one cache per rendered target
        self.partial_parse = partial_parse or truthy(environ.get(PARTIAL_PARSE_VAR))
        try:
            self.cfg: DeferConfig = load_config(
                overlay_settings(self.project.get("vars"), self.cli_vars), environ, self.root,
                defer_state=environ.get("DBT_DEFER_STATE") or None, state=environ.get("DBT_STATE") or None,
                favor_state=self.favor_state,
            )
        except DeferConfigError as exc:
            raise ProjectError(str(exc)) from None

    def packages_folder(self) -> str:
        raw = os.environ.get("DBT_PACKAGES_INSTALL_PATH") or self.project.get("packages-install-path") or "dbt_packages"
        raw = str(raw)
        return os.path.normpath(raw if os.path.isabs(raw) else os.path.join(self.root, raw))

    def listing_project(self, folder: str) -> Optional[Tuple[str, Optional[str]]]:
        """A one-macro dbt project in ``folder`` for the existence listing: this project's profile
        and quoting, and the installed dbt_defer package's ``portable.sql`` (the same macro the
        project would run). The engine parses it in a tenth of a second where the whole project
        takes seconds. Returns (its folder, the profiles folder to pass), or None when the
        package's macro cannot be found (then the project itself runs the listing)."""
        if self.name == "dbt_defer":
            return None
        macro = os.path.join(self.packages_folder(), "dbt_defer", "macros", "dbt_defer", "portable.sql")
        profile = self.project.get("profile")
        if not os.path.isfile(macro) or not isinstance(profile, str) or not profile:
            return None
        os.makedirs(os.path.join(folder, "macros"), exist_ok=True)
        import shutil
        import yaml

        shutil.copyfile(macro, os.path.join(folder, "macros", "portable.sql"))
        spec: Dict[str, Any] = {"name": "dbt_defer", "version": "1.0", "config-version": 2, "profile": profile,
                                "macro-paths": ["macros"]}
        if isinstance(self.project.get("quoting"), dict):
            spec["quoting"] = self.project["quoting"]
        with open(os.path.join(folder, "dbt_project.yml"), "w", encoding="utf-8") as fh:
            yaml.safe_dump(spec, fh, sort_keys=False)
        found = self.profiles_file()
        return folder, (self.profiles_dir or (os.path.dirname(found) if found else None))

    def profiles_file(self) -> Optional[str]:
        for folder in (self.profiles_dir, self.root, os.path.expanduser("~/.dbt")):
            if folder and os.path.isfile(os.path.join(folder, "profiles.yml")):
                return os.path.join(folder, "profiles.yml")
        return None

    def _default_target(self) -> Optional[str]:
        """The profile's default target when it is a plain name (no Jinja); else None: the
        engine's listing call reports the target it ran (``Listing.target``)."""
        path = self.profiles_file()
        if not path:
            return None
        try:
            with open(path, encoding="utf-8") as fh:
                profiles = _yaml(fh.read(), path)
        except (OSError, ProjectError):
            return None
        profile = (profiles or {}).get(self.project.get("profile")) if isinstance(profiles, dict) else None
        target = profile.get("target") if isinstance(profile, dict) else None
        return target if isinstance(target, str) and "{{" not in target else None


# --- the project's own manifest.json (written by the engine for the running target) ---------


class _Config(msgspec.Struct):
    materialized: Optional[str] = None
    enabled: bool = True
    store_failures: Optional[bool] = None
    store_failures_as: Optional[str] = None
    target_schema: Optional[str] = None
    meta: Optional[Dict[str, Any]] = None


class _Checksum(msgspec.Struct):
    checksum: str = ""


class _DependsOn(msgspec.Struct):
    nodes: List[str] = msgspec.field(default_factory=list)


class PNode(msgspec.Struct):
    unique_id: str = ""
    resource_type: str = ""
    name: str = ""
    package_name: str = ""
    database: Optional[str] = None
    schema: Optional[str] = None
    alias: Optional[str] = None
    relation_name: Optional[str] = None
    version: Optional[Any] = None
    latest_version: Optional[Any] = None
    language: Optional[str] = "sql"
    config: _Config = msgspec.field(default_factory=_Config)
    meta: Optional[Dict[str, Any]] = None
    tags: List[str] = msgspec.field(default_factory=list)
    checksum: _Checksum = msgspec.field(default_factory=_Checksum)
    unrendered_config: Dict[str, Any] = msgspec.field(default_factory=dict)
    depends_on: _DependsOn = msgspec.field(default_factory=_DependsOn)

    @property
    def is_ephemeral_model(self) -> bool:
        return self.resource_type == "model" and self.config.materialized == "ephemeral"

    @property
    def identifier(self) -> str:
        return self.alias or self.name

    @property
    def location(self) -> Tuple[Optional[str], Optional[str], str]:
        return (self.database, self.schema, self.identifier)


class _Metadata(msgspec.Struct):
    dbt_schema_version: str = ""
    dbt_version: str = ""
    project_name: Optional[str] = None
    adapter_type: Optional[str] = None


class _Manifest(msgspec.Struct):
    metadata: _Metadata = msgspec.field(default_factory=_Metadata)
    nodes: Dict[str, PNode] = msgspec.field(default_factory=dict)


REFABLE = frozenset({"model", "seed", "snapshot"})


@dataclass
class ProjectManifest:
    path: str
    metadata: _Metadata
    nodes: Dict[str, PNode]

    @classmethod
    def load(cls, path: str) -> "ProjectManifest":
        try:
            with open(path, "rb") as fh:
                parsed = msgspec.json.decode(fh.read(), type=_Manifest)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ProjectError(f"dbt-defer: cannot read the project's manifest {path} ({exc})") from None
        for uid, node in parsed.nodes.items():
            node.unique_id = node.unique_id or uid
        return cls(path, parsed.metadata, parsed.nodes)

    def refable(self) -> Dict[str, PNode]:
        return {uid: n for uid, n in self.nodes.items() if n.resource_type in REFABLE and n.config.enabled}

    def default_database(self) -> Optional[str]:
        found = {n.database for n in self.nodes.values() if n.resource_type in REFABLE and n.database}
        return next(iter(found)) if len(found) == 1 else None

    def meta_restricted(self) -> FrozenSet[str]:
        """``meta: dbt_defer: defer: false`` (node meta, then config meta)."""
        out = set()
        for uid, node in self.refable().items():
            meta: Dict[str, Any] = {}
            for source in (node.meta, node.config.meta):
                if isinstance(source, dict):
                    meta.update(source)
            value = meta.get("dbt_defer")
            if isinstance(value, dict) and value.get("defer") is False:
                out.add(uid)
        return frozenset(out)

    def ref_index(self) -> Dict[Tuple[Optional[str], str, Optional[str]], str]:
        """(package or None, name, version or None) -> unique_id, as ``ref()`` looks nodes up:
        no version means the latest (or the only) version; no package means the root project's
        node first, else the one package's that has it."""
        index: Dict[Tuple[Optional[str], str, Optional[str]], str] = {}
        by_name: Dict[Tuple[str, Optional[str]], List[PNode]] = {}
        for uid, node in self.refable().items():
            version = None if node.version is None else str(node.version)
            latest = node.latest_version is None or str(node.latest_version) == version
            keys = [(node.package_name, node.name, version)]
            if latest:
                keys.append((node.package_name, node.name, None))
            for key in keys:
                index[key] = uid
                by_name.setdefault((key[1], key[2]), []).append(node)
        project = self.metadata.project_name
        for (name, version), nodes in by_name.items():
            mine = [n for n in nodes if n.package_name == project]
            pick = mine or (nodes if len({n.package_name for n in nodes}) == 1 else [])
            if pick:
                index[(None, name, version)] = pick[0].unique_id
        return index
