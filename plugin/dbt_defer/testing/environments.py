"""prod (in full) and staging (in part), built once per profile and pytest session, and the
fixture every base class shares; the environments' schemas are dropped when the session ends.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

from dbt_defer.testing.files import FILES, PACKAGE, PROJECT, STAGING_SELECTION, default_package_entry, project_yml
from dbt_defer.testing.project import DeferProject
from dbt_defer.testing.runner import write_yaml

# --- building the environments once per profile -------------------------------------------------


class _Environments:
    """prod (in full) and staging (in part), built once per (profile, project config) and session."""

    def __init__(self, root: Path, target: Dict[str, Any], update: Dict[str, Any], package: Dict[str, Any]):
        self.root = root
        self.target = target
        self.update = update
        self.package = package
        self.prefix = f"dd{uuid.uuid4().hex[:8]}"
        self.schemas = {"prod": f"{self.prefix}_prod", "staging": f"{self.prefix}_staging"}
        self.dev_schemas: List[str] = []
        self.base = self._write(root / "base", {**self.schemas, "dev": f"{self.prefix}_base"})
        self.error: Optional[str] = None
        self.built = False

    def _write(self, root: Path, schemas: Dict[str, str]) -> DeferProject:
        root.mkdir(parents=True, exist_ok=True)
        for rel, text in FILES.items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text.lstrip("\n"))
        write_yaml(root / "dbt_project.yml", project_yml(self.update))
        write_yaml(root / "packages.yml", {"packages": [self.package, {"local": f"packages/{PACKAGE}"}]})
        outputs = {}
        # ci: the dev schema under another target name; oops: a dev target pointed at prod's schema
        for name, schema in (("prod", "prod"), ("staging", "staging"), ("dev", "dev"), ("ci", "dev"), ("oops", "prod")):
            outputs[name] = {"threads": 4, **self.target, "schema": schemas[schema]}
        write_yaml(root / "profiles.yml", {PROJECT: {"target": "dev", "outputs": outputs}})
        return DeferProject(root=root, schemas=dict(schemas), profile_target=self.target)

    def build(self) -> None:
        if self.built:
            return
        if self.error:
            pytest.fail(self.error, pytrace=False)
        p = self.base
        try:
            p.dbt("deps")
            p.dbt("build", "--target", "prod")
            p.save_artifacts("prod-artifacts")
            p.dbt("build", "--target", "staging", "-s", *STAGING_SELECTION, "--indirect-selection", "cautious")
            p.save_artifacts("staging-artifacts")
        except AssertionError as exc:
            self.error = f"dbt-defer testing: building the prod/staging environments failed: {exc}"
            pytest.fail(self.error, pytrace=False)
        self.built = True

    def project_for(self, name: str, files: Dict[str, str]) -> DeferProject:
        """A class's own project: same environments, own dev schema, own copies of the artifacts."""
        self.build()
        dev = f"{self.prefix}_{len(self.dev_schemas) + 1}_dev"
        self.dev_schemas.append(dev)
        root = self.root / re.sub(r"[^A-Za-z0-9_]+", "_", name)[:40]
        p = self._write(root, {**self.schemas, "dev": dev})
        for folder in ("prod-artifacts", "staging-artifacts", "dbt_packages"):
            shutil.copytree(self.base.root / folder, root / folder, symlinks=True)
        for rel, text in files.items():
            p.write(rel, text.lstrip("\n"))
        return p

    def drop(self) -> None:
        schemas = [*self.schemas.values(), *self.dev_schemas]
        schemas += [f"{schema}_extra" for schema in schemas]  # custom schemas (customer_totals)
        try:
            self.base.probe(drop=schemas)
        except Exception as exc:  # cleanup must not hide the tests' own outcome
            print(f"dbt-defer testing: could not drop schemas {schemas}: {exc}")


_BUILT: Dict[str, _Environments] = {}
_BUILT_LOCK = threading.Lock()


class _DropAtSessionFinish:
    """Drops every environment's schemas when the session finishes: before pytest's own
    temp-folder cleanup (which may remove the projects once the session's lock is gone) and
    while session fixtures that outlive the tests (a SparkSession that is not stopped) still work."""

    NAME = "dbt_defer_testing_cleanup"

    def __init__(self) -> None:
        self.environments: List[_Environments] = []

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: Any, exitstatus: Any) -> None:
        for envs in self.environments:
            envs.drop()


def _optional_fixture(request: Any, name: str, default: Any) -> Any:
    try:
        return request.getfixturevalue(name)
    except pytest.FixtureLookupError:
        return default


def _environments_for(request: Any, tmp_path_factory: Any, target: Dict[str, Any]) -> _Environments:
    update = _optional_fixture(request, "project_config_update", {}) or {}
    package = _optional_fixture(request, "dbt_defer_package", None) or default_package_entry()
    key = json.dumps([target, update, package], sort_keys=True, default=str)
    with _BUILT_LOCK:
        envs = _BUILT.get(key)
        if envs is None:
            envs = _Environments(tmp_path_factory.mktemp("dbt_defer_conformance"), target, update, package)
            _BUILT[key] = envs
            cleanup = request.config.pluginmanager.get_plugin(_DropAtSessionFinish.NAME)
            if cleanup is None:
                cleanup = _DropAtSessionFinish()
                request.config.pluginmanager.register(cleanup, _DropAtSessionFinish.NAME)
            cleanup.environments.append(envs)
    return envs


# --- the base classes -------------------------------------------------------------------------


class DeferBase:
    """Fixtures shared by every base class. ``files``: extra project files of the class."""

    files: Dict[str, str] = {}

    @pytest.fixture(scope="class")
    @classmethod
    def project(cls, request: Any, dbt_profile_target: Dict[str, Any], tmp_path_factory: Any) -> DeferProject:
        envs = _environments_for(request, tmp_path_factory, dict(dbt_profile_target))
        return envs.project_for(cls.__name__, cls.files)


def record(project: DeferProject, node: str, ref: str) -> Dict[str, Any]:
    got = project.resolutions()
    assert (node, ref) in got, f"no audit record for {(node, ref)}; have {sorted(got)}"
    return got[(node, ref)]


def assert_resolved(project: DeferProject, node: str, ref: str, env: str, reason: str,
                    limit: Optional[int] = None) -> Dict[str, Any]:
    """The audit record of (node, ref): env, reason, limit, and the relation dbt renders for env."""
    r = record(project, node, ref)
    assert (r["env"], r["reason"], r["limit"]) == (env, reason, limit), r
    if env not in ("ephemeral", "missing"):
        assert r["relation"] == project.relation(env, ref), r
    return r
