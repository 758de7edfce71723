"""The dbt-defer adapter conformance suite, in dbt-tests-adapter's style.

An adapter maintainer runs it against their own warehouse by subclassing the ``Base*`` classes
and providing a ``dbt_profile_target`` fixture (the same fixture dbt-tests-adapter uses)::

    # tests/functional/test_dbt_defer.py
    import pytest
    from dbt_defer.testing import *  # noqa: F403  (the Base* classes)

    @pytest.fixture(scope="class")
    def dbt_profile_target():
        return {"type": "postgres", "host": "localhost", "port": 5432, "user": "postgres",
                "password": "", "dbname": "test", "threads": 4}

    class TestChainPerNode(BaseChainPerNode): pass
    class TestDevRelations(BaseDevRelations): pass
    ...

Optional fixtures: ``project_config_update`` (a dict merged into dbt_project.yml, e.g. a
``+file_format``) and ``dbt_defer_package`` (the packages.yml entry of the dbt_defer macro
package; default: the checkout this module is installed from, or ``DBT_DEFER_PACKAGE_DIR``).

How it works: one small jaffle-shop-like project is built once per profile and session into two
schemas, ``<prefix>_prod`` (in full) and ``<prefix>_staging`` (staging layer + orders only), and
their artifacts are kept. Each test class gets its own copy of the project, with its own dev
schema and its own copy of the artifacts, so classes never see each other's dev relations or
file edits. dbt runs in-process (``dbtRunner``): on engines with a slow start (Spark's JVM)
one process runs every class. Every warehouse check goes through dbt itself (a run-operation
of the project's ``dbt_defer_testing_probe`` macro), so nothing here is adapter-specific; the
relations expected in the audit are the ``relation_name`` dbt itself wrote into each
environment's manifest. All schemas are dropped when the pytest session finishes (keep session
fixtures your profile needs, e.g. a SparkSession, alive until then).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import re
import shutil
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest

__all__ = [
    "BaseChainPerNode",
    "BaseDevRelations",
    "BaseEphemeral",
    "BaseVersionsAndPackages",
    "BaseSchemasAndIdentifiers",
    "BaseLimits",
    "BaseNeverDefer",
    "BaseWriteGuard",
    "BaseAuditExactness",
    "BaseMetadataQueries",
    "BaseUnitTests",
    "BaseExplain",
    "DeferProject",
    "DbtResult",
]

PROJECT = "dbt_defer_conformance"
PACKAGE = "calendar"  # a second package, for two-argument refs into another package
ENVIRONMENTS = ("staging", "prod")  # the chain, highest priority first
STAGING_SELECTION = ("raw_customers", "raw_orders", "stg_customers", "stg_orders", "orders")
CUSTOMERS, ORDERS = 5, 8  # rows in the seeds

# --- the project ------------------------------------------------------------------------------

FILES: Dict[str, str] = {
    "macros/ref.sql": "{% macro ref() %}{{ return(dbt_defer.ref(*varargs, **kwargs)) }}{% endmacro %}\n",
    "macros/dbt_defer_testing.sql": """
{#- The suite's only way into the warehouse: dbt run-operation dbt_defer_testing_probe. -#}
{% macro dbt_defer_testing_probe(exists=[], schemas=[], counts=[], scalars=[], drop=[]) %}
  {%- set out = {"exists": [], "schemas": [], "counts": [], "scalars": []} -%}
  {%- set database = target.database if target.database is defined and target.database else none -%}
  {%- for item in exists -%}
    {%- set found = adapter.get_relation(database=database, schema=item[0], identifier=item[1]) -%}
    {%- do out["exists"].append(found is not none) -%}
  {%- endfor -%}
  {%- for schema in schemas -%}
    {%- do out["schemas"].append(adapter.check_schema_exists(database, schema)) -%}
  {%- endfor -%}
  {%- for item in counts -%}
    {%- set relation = api.Relation.create(database=database, schema=item[0], identifier=item[1]) -%}
    {%- set result = run_query("select count(*) from " ~ relation) -%}
    {%- do out["counts"].append(result.columns[0].values()[0] | int) -%}
  {%- endfor -%}
  {%- for sql in scalars -%}
    {%- set result = run_query(sql) -%}
    {%- do out["scalars"].append(result.columns[0].values()[0] | string) -%}
  {%- endfor -%}
  {%- for schema in drop -%}
    {%- do adapter.drop_schema(api.Relation.create(database=database, schema=schema)) -%}
  {%- endfor -%}
  {%- do log("dbt-defer-testing: " ~ tojson(out), info=True) -%}
{% endmacro %}
""",
    "seeds/raw_customers.csv": """id,first_name,last_name,email
1,Ada,Lovelace,ada@example.com
2,Alan,Turing,alan@example.com
3,Grace,Hopper,grace@example.com
4,Edsger,Dijkstra,edsger@example.com
5,Barbara,Liskov,barbara@example.com
""",
    "seeds/raw_orders.csv": """id,customer_id,order_date,amount
1,1,2024-01-02,10
2,1,2024-01-05,25
3,2,2024-01-07,7
4,3,2024-02-01,40
5,3,2024-02-03,12
6,4,2024-02-09,3
7,5,2024-03-01,18
8,5,2024-03-04,22
""",
    "models/staging/stg_customers.sql": (
        "select id as customer_id, first_name, last_name, email\nfrom {{ ref('raw_customers') }}\n"
    ),
    "models/staging/stg_orders.sql": (
        "select id as order_id, customer_id, cast(order_date as date) as order_date, amount\n"
        "from {{ ref('raw_orders') }}\n"
    ),
    "models/marts/int_order_totals.sql": """{{ config(materialized='ephemeral') }}
select customer_id, count(*) as order_count, sum(amount) as total_amount
from {{ ref('stg_orders') }}
group by customer_id
""",
    "models/marts/customers.sql": """select c.customer_id, c.first_name, coalesce(t.order_count, 0) as order_count,
       coalesce(t.total_amount, 0) as total_amount
from {{ ref('stg_customers') }} c
left join {{ ref('int_order_totals') }} t on t.customer_id = c.customer_id
""",
    "models/marts/orders.sql": (
        "select o.order_id, o.customer_id, o.order_date, o.amount\n"
        f"from {{{{ ref('{PROJECT}', 'stg_orders') }}}} o\n"
    ),
    "models/marts/dim_customers_v1.sql": "select customer_id, first_name from {{ ref('stg_customers') }}\n",
    "models/marts/dim_customers_v2.sql": "select customer_id, first_name, email from {{ ref('stg_customers') }}\n",
    "models/marts/customer_report.sql": f"""select d.customer_id, d.first_name, c.total_amount, cal.calendar_year
from {{{{ ref('dim_customers', v=1) }}}} d
join {{{{ ref('customers') }}}} c on c.customer_id = d.customer_id
cross join {{{{ ref('{PACKAGE}', 'calendar_years') }}}} cal
""",
    "models/marts/_marts.yml": """version: 2
models:
  - name: customers
    columns:
      - name: customer_id
        data_tests: [unique, not_null]
  - name: orders
    columns:
      - name: customer_id
        data_tests:
          - relationships:
              to: ref('customers')
              field: customer_id
  - name: dim_customers
    latest_version: 2
    versions:
      - v: 1
      - v: 2
""",
    # a custom schema (<target schema>_extra) and a mixed-case alias
    "models/marts/customer_totals.sql": (
        "{{ config(schema='extra', alias='CustomerTotals') }}\n"
        "select customer_id, total_amount from {{ ref('customers') }}\n"
    ),
    "models/restricted/pii_emails.sql": "{{ config(tags=['pii']) }}\nselect customer_id, email from {{ ref('stg_customers') }}\n",
    "models/restricted/pii_report.sql": "select count(*) as n from {{ ref('pii_emails') }}\n",
    "tests/assert_totals_not_negative.sql": "select * from {{ ref('customers') }} where total_amount < 0\n",
    f"packages/{PACKAGE}/dbt_project.yml": f"name: {PACKAGE}\nversion: '1.0'\nconfig-version: 2\n",
    f"packages/{PACKAGE}/models/calendar_years.sql": "select 2024 as calendar_year\n",
}


def project_yml(update: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    base: Dict[str, Any] = {
        "name": PROJECT,
        "version": "1.0",
        "config-version": 2,
        "profile": PROJECT,
        "models": {PROJECT: {"staging": {"+materialized": "view"}, "marts": {"+materialized": "table"}}},
        "vars": {"dbt_defer": {"never_defer": ["tag:pii"]}},
    }
    return _merge(base, update or {})


def _merge(base: Dict[str, Any], update: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def save_artifacts(target: Path, dest: Path) -> Path:
    """What an environment's job publishes: manifest.json + run_results.json of ``target``,
    copied into a fresh ``dest`` folder."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in ("manifest.json", "run_results.json"):
        if (target / name).exists():
            shutil.copy(target / name, dest / name)
    return dest


def default_package_entry() -> Dict[str, str]:
    """packages.yml entry of the dbt_defer macro package: DBT_DEFER_PACKAGE_DIR, else the
    checkout this module was installed from (an editable install or a source tree)."""
    folder = os.environ.get("DBT_DEFER_PACKAGE_DIR")
    if not folder:
        here = Path(__file__).resolve().parents[2]  # plugin/dbt_defer/testing.py -> the checkout
        if (here / "dbt_project.yml").is_file() and (here / "macros" / "dbt_defer" / "ref.sql").is_file():
            folder = str(here)
    if not folder:
        raise pytest.UsageError(
            "dbt-defer testing: cannot find the dbt_defer macro package; set DBT_DEFER_PACKAGE_DIR to a "
            "checkout of dbt-defer, or define a dbt_defer_package fixture returning its packages.yml entry "
            "(e.g. {'git': 'https://github.com/<org>/dbt-defer.git', 'revision': 'v0.1.0'})"
        )
    return {"local": folder}


# --- running dbt in-process ---------------------------------------------------------------------

_KEEP_ENV = ("DBT_DEFER_TEST_", "DBT_DEFER_PACKAGE_DIR")
_CLEAN_ENV = ("DBT_DEFER", "DBT_STATE", "DBT_FAVOR_STATE", "DBT_TARGET", "DBT_PROFILES_DIR", "DBT_PROJECT_DIR")
_ENV_LOCK = threading.Lock()


@contextlib.contextmanager
def _environment(extra: Dict[str, str]) -> Iterator[None]:
    """dbt reads flags from the environment: run with ours only (dbt-defer's and dbt's deferral
    variables of the calling shell removed), restore everything afterwards."""
    with _ENV_LOCK:
        saved = dict(os.environ)
        for key in list(os.environ):
            if key.startswith(_CLEAN_ENV) and not key.startswith(_KEEP_ENV):
                del os.environ[key]
        os.environ["DBT_SEND_ANONYMOUS_USAGE_STATS"] = "false"
        os.environ.update({k: v for k, v in extra.items() if v is not None})
        try:
            yield
        finally:
            os.environ.clear()
            os.environ.update(saved)


@dataclass
class DbtResult:
    success: bool
    exception: Optional[BaseException]
    messages: List[Dict[str, str]]
    raw: Any

    def text(self) -> str:
        parts = [m["msg"] for m in self.messages]
        if self.exception is not None:
            parts.append(str(self.exception))
        return "\n".join(parts)

    def lines(self, prefix: str = "dbt-defer:", level: Optional[str] = None) -> List[str]:
        return [
            m["msg"] for m in self.messages
            if m["msg"].startswith(prefix) and (level is None or m["level"] == level)
        ]

    def statuses(self) -> Dict[str, str]:
        results = getattr(self.raw, "results", None) or []
        return {r.node.unique_id: str(r.status) for r in results if getattr(r, "node", None) is not None}


def run_dbt(args: Sequence[str], project_dir: Path, env: Optional[Dict[str, str]] = None,
            expect: Optional[bool] = True) -> DbtResult:
    """One dbt invocation in this process; ``expect`` True/False asserts success/failure."""
    from dbt.cli.main import dbtRunner

    messages: List[Dict[str, str]] = []

    def collect(event: Any) -> None:
        info = event.info
        messages.append({"name": info.name, "level": str(info.level), "msg": info.msg or ""})

    argv = [*args, "--project-dir", str(project_dir), "--profiles-dir", str(project_dir)]
    with _environment(env or {}):
        res = dbtRunner(callbacks=[collect]).invoke(argv)
    result = DbtResult(bool(res.success), res.exception, messages, res.result)
    if expect is not None and result.success != expect:
        tail = "\n".join(m["msg"] for m in messages[-40:] if m["msg"].strip())
        raise AssertionError(
            f"dbt {' '.join(args)} {'failed' if expect else 'succeeded unexpectedly'}"
            f" (exception: {res.exception})\n{tail}"
        )
    return result


def _write_yaml(path: Path, value: Any) -> None:
    import yaml  # a dbt dependency

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(value, sort_keys=False))


# --- a test class's project ----------------------------------------------------------------------


@dataclass
class DeferProject:
    """A copy of the suite's project for one test class: its own dev schema and artifacts."""

    root: Path
    schemas: Dict[str, str]  # "prod", "staging", "dev" -> schema name
    profile_target: Dict[str, Any]

    # --- files --------------------------------------------------------------------------------
    @property
    def target(self) -> Path:
        return self.root / "target"

    def write(self, rel: str, text: str) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def read(self, rel: str) -> str:
        return (self.root / rel).read_text()

    @contextlib.contextmanager
    def edited(self, rel: str, text: str) -> Iterator[None]:
        """The file holds ``text`` inside the block and its old content afterwards."""
        path = self.root / rel
        old = path.read_text() if path.exists() else None
        self.write(rel, text)
        try:
            yield
        finally:
            if old is None:
                path.unlink()
            else:
                path.write_text(old)

    def save_artifacts(self, folder: str) -> Path:
        return save_artifacts(self.target, self.root / folder)

    # --- dbt ----------------------------------------------------------------------------------
    def chain_env(self, **extra: str) -> Dict[str, str]:
        env = {"DBT_DEFER": "1"}
        for name in ENVIRONMENTS:
            env[f"DBT_DEFER_{name.upper()}_STATE"] = f"{name}-artifacts"
        env.update(extra)
        return env

    def dbt(self, *args: str, env: Optional[Dict[str, str]] = None, expect: Optional[bool] = True) -> DbtResult:
        """dbt with deferral off (plain dbt), unless ``env`` turns it on."""
        return run_dbt(args, self.root, env, expect)

    def deferred(self, *args: str, expect: Optional[bool] = True, **extra_env: str) -> DbtResult:
        """dbt with the chain (staging then prod) on; a stale audit never survives."""
        audit = self.target / "dbt_defer_audit.json"
        if audit.exists():
            audit.unlink()
        return run_dbt(args, self.root, self.chain_env(**extra_env), expect)

    def explain(self, *args: str, env: Optional[Dict[str, str]] = None) -> Tuple[int, str, str]:
        """``dbt-defer explain`` in-process: (exit code, stdout, stderr)."""
        from dbt_defer import cli

        out, err = io.StringIO(), io.StringIO()
        argv = ["explain", *args, "--project-dir", str(self.root), "--profiles-dir", str(self.root)]
        chain = {k: v for k, v in self.chain_env().items() if k != "DBT_DEFER"}
        with _environment(chain if env is None else env), contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            code = cli.main(argv)
        return code, out.getvalue(), err.getvalue()

    # --- what dbt wrote -------------------------------------------------------------------------
    def audit(self) -> Dict[str, Any]:
        return json.loads((self.target / "dbt_defer_audit.json").read_text())

    def resolutions(self) -> Dict[Tuple[str, str], Dict[str, Any]]:
        return {(r["node"], r["ref"]): r for r in self.audit()["resolutions"]}

    def manifest(self, env: str = "dev") -> Dict[str, Any]:
        path = self.target / "manifest.json" if env == "dev" else self.root / f"{env}-artifacts" / "manifest.json"
        return json.loads(path.read_text())

    def relation(self, env: str, unique_id: str) -> str:
        """The relation as dbt renders it for ``env``: its relation_name in that manifest
        (dev: the last invocation's target/manifest.json)."""
        name = self.manifest(env)["nodes"][unique_id]["relation_name"]
        assert name, f"{unique_id} has no relation in the {env} manifest"
        return name

    def compiled(self, unique_id: str) -> str:
        node = self.manifest("dev")["nodes"][unique_id]
        return (self.target / "compiled" / node["package_name"] / node["original_file_path"]).read_text()

    def test_ids(self, prefix: str) -> List[str]:
        """unique_ids of the data tests whose id starts with test.<project>.<prefix>."""
        return sorted(u for u in self.manifest("dev")["nodes"] if u.startswith(f"test.{PROJECT}.{prefix}"))

    # --- the warehouse (through dbt run-operation) ----------------------------------------------
    def probe(self, exists: Sequence[Tuple[str, str]] = (), schemas: Sequence[str] = (),
              counts: Sequence[Tuple[str, str]] = (), scalars: Sequence[str] = (),
              drop: Sequence[str] = ()) -> Dict[str, List[Any]]:
        """exists, counts: (env, identifier) pairs; schemas: env names; scalars: SQL whose first
        cell is returned as a string; drop: schema names. One dbt invocation."""
        args = {
            "exists": [[self.schemas[env], name] for env, name in exists],
            "schemas": [self.schemas[env] for env in schemas],
            "counts": [[self.schemas[env], name] for env, name in counts],
            "scalars": list(scalars),
            "drop": list(drop),
        }
        res = self.dbt("run-operation", "dbt_defer_testing_probe", "--args", json.dumps(args), "--log-level", "none")
        line = next(m for m in reversed(res.lines("dbt-defer-testing: ")))
        return json.loads(line[len("dbt-defer-testing: "):])

    def exists(self, env: str, *names: str) -> List[bool]:
        return self.probe(exists=[(env, n) for n in names])["exists"]

    def counts(self, *relations: str) -> List[int]:
        return [int(v) for v in self.probe(scalars=[f"select count(*) from {r}" for r in relations])["scalars"]]


def uid(name: str, kind: str = "model", package: str = PROJECT) -> str:
    return f"{kind}.{package}.{name}"


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
        _write_yaml(root / "dbt_project.yml", project_yml(self.update))
        _write_yaml(root / "packages.yml", {"packages": [self.package, {"local": f"packages/{PACKAGE}"}]})
        outputs = {}
        # ci: the dev schema under another target name; oops: a dev target pointed at prod's schema
        for name, schema in (("prod", "prod"), ("staging", "staging"), ("dev", "dev"), ("ci", "dev"), ("oops", "prod")):
            outputs[name] = {"threads": 4, **self.target, "schema": schemas[schema]}
        _write_yaml(root / "profiles.yml", {PROJECT: {"target": "dev", "outputs": outputs}})
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


class _DeferBase:
    """Fixtures shared by every base class. ``files``: extra project files of the class."""

    files: Dict[str, str] = {}

    @pytest.fixture(scope="class")
    @classmethod
    def project(cls, request: Any, dbt_profile_target: Dict[str, Any], tmp_path_factory: Any) -> DeferProject:
        envs = _environments_for(request, tmp_path_factory, dict(dbt_profile_target))
        return envs.project_for(cls.__name__, cls.files)


def _record(project: DeferProject, node: str, ref: str) -> Dict[str, Any]:
    got = project.resolutions()
    assert (node, ref) in got, f"no audit record for {(node, ref)}; have {sorted(got)}"
    return got[(node, ref)]


def assert_resolved(project: DeferProject, node: str, ref: str, env: str, reason: str,
                    limit: Optional[int] = None) -> Dict[str, Any]:
    """The audit record of (node, ref): env, reason, limit, and the relation dbt renders for env."""
    r = _record(project, node, ref)
    assert (r["env"], r["reason"], r["limit"]) == (env, reason, limit), r
    if env not in ("ephemeral", "missing"):
        assert r["relation"] == project.relation(env, ref), r
    return r


class BaseChainPerNode(_DeferBase):
    """SPEC §4.2, §4.5: each ref takes the first environment that has it, per node."""

    def test_each_ref_takes_the_first_environment_holding_it(self, project: DeferProject) -> None:
        res = project.deferred("run", "-s", "stg_customers", "customers", "customer_report", "orders")
        assert res.statuses() and set(res.statuses().values()) == {"success"}
        # staging built the staging layer: served from there; the marts only from prod
        assert_resolved(project, uid("stg_customers"), uid("raw_customers", "seed"), "staging", "deferred")
        assert_resolved(project, uid("int_order_totals"), uid("stg_orders"), "staging", "deferred")
        assert_resolved(project, uid("orders"), uid("stg_orders"), "staging", "deferred")
        assert_resolved(project, uid("customer_report"), uid("dim_customers.v1"), "prod", "deferred")
        assert_resolved(project, uid("customer_report"), uid("calendar_years", package=PACKAGE), "prod", "deferred")
        # selected parents are read from dev
        assert_resolved(project, uid("customers"), uid("stg_customers"), "dev", "selected")
        assert_resolved(project, uid("customer_report"), uid("customers"), "dev", "selected")
        assert project.relation("staging", uid("stg_orders")) in project.compiled(uid("orders"))
        dev_report, prod_report = project.relation("dev", uid("customer_report")), project.relation("prod", uid("customer_report"))
        assert project.counts(dev_report, prod_report) == [CUSTOMERS, CUSTOMERS]

    def test_an_environment_without_the_relation_or_with_a_failed_node_is_skipped(self, project: DeferProject) -> None:
        """staging's manifest lists stg_customers at a relation that does not exist, and its
        run_results record stg_orders as failed: both are read from prod."""
        edited = project.root / "staging-edited"
        shutil.copytree(project.root / "staging-artifacts", edited)
        manifest = json.loads((edited / "manifest.json").read_text())
        manifest["nodes"][uid("stg_customers")]["alias"] = "stg_customers_never_built"
        (edited / "manifest.json").write_text(json.dumps(manifest))
        results = json.loads((edited / "run_results.json").read_text())
        for result in results["results"]:
            if result["unique_id"] == uid("stg_orders"):
                result["status"] = "error"
        (edited / "run_results.json").write_text(json.dumps(results))

        # dev_relations: never, as the first test left stg_customers in dev
        project.deferred(
            "compile", "-s", "customers", DBT_DEFER_STAGING_STATE="staging-edited", DBT_DEFER_DEV_RELATIONS="never"
        )
        assert_resolved(project, uid("customers"), uid("stg_customers"), "prod", "deferred")
        assert_resolved(project, uid("int_order_totals"), uid("stg_orders"), "prod", "deferred")
        assert project.relation("prod", uid("stg_customers")) in project.compiled(uid("customers"))


class BaseDevRelations(_DeferBase):
    """SPEC §4.4: the dev policies always / modified / never, on a leftover dev relation."""

    @pytest.fixture(scope="class")
    @classmethod
    def leftover(cls, project: DeferProject) -> DeferProject:
        project.deferred("run", "-s", "stg_customers")
        assert project.exists("dev", "stg_customers", "customers") == [True, False]
        return project

    @pytest.mark.parametrize(
        "policy, env, reason",
        [("always", "dev", "dev_exists"), ("modified", "staging", "deferred"), ("never", "staging", "deferred")],
    )
    def test_policy_on_an_unchanged_leftover(self, leftover: DeferProject, policy: str, env: str, reason: str) -> None:
        leftover.deferred("compile", "-s", "customers", DBT_DEFER_DEV_RELATIONS=policy)
        assert_resolved(leftover, uid("customers"), uid("stg_customers"), env, reason)
        assert leftover.relation(env, uid("stg_customers")) in leftover.compiled(uid("customers"))

    def test_modified_uses_the_dev_relation_of_a_changed_node(self, leftover: DeferProject) -> None:
        rel = "models/staging/stg_customers.sql"
        with leftover.edited(rel, leftover.read(rel) + "-- changed on this branch\n"):
            leftover.deferred("compile", "-s", "customers", DBT_DEFER_DEV_RELATIONS="modified")
        assert_resolved(leftover, uid("customers"), uid("stg_customers"), "dev", "dev_modified")
        # a node without a dev relation still comes from the chain
        assert_resolved(leftover, uid("int_order_totals"), uid("stg_orders"), "staging", "deferred")


class BaseEphemeral(_DeferBase):
    """SPEC §4.1: an ephemeral ref is never deferred; its own refs are."""

    def test_ephemeral_is_inlined_and_its_refs_defer(self, project: DeferProject) -> None:
        project.deferred("run", "-s", "customers")
        r = _record(project, uid("customers"), uid("int_order_totals"))
        assert (r["env"], r["reason"], r["limit"]) == ("ephemeral", "ephemeral", None), r
        assert "__dbt__cte__int_order_totals" in r["relation"]
        sql = project.compiled(uid("customers"))
        assert "__dbt__cte__int_order_totals" in sql
        assert "int_order_totals" not in sql.replace("__dbt__cte__int_order_totals", "")  # never a relation
        assert_resolved(project, uid("int_order_totals"), uid("stg_orders"), "staging", "deferred")
        assert project.relation("staging", uid("stg_orders")) in sql
        total = project.probe(
            scalars=[f"select sum(order_count) from {project.relation('dev', uid('customers'))}"]
        )["scalars"]
        assert [int(float(v)) for v in total] == [ORDERS]


class BaseVersionsAndPackages(_DeferBase):
    """Versioned refs (v=, latest), two-argument refs into this project and into a package."""

    files = {"models/marts/customer_emails.sql": "select customer_id, email from {{ ref('dim_customers') }}\n"}

    def test_versions_and_two_argument_refs(self, project: DeferProject) -> None:
        project.deferred("run", "-s", "customer_report", "customer_emails", "orders")
        assert_resolved(project, uid("customer_report"), uid("dim_customers.v1"), "prod", "deferred")
        assert project.relation("prod", uid("dim_customers.v1")).replace('"', "").replace("`", "").endswith("dim_customers_v1")
        assert_resolved(project, uid("customer_emails"), uid("dim_customers.v2"), "prod", "deferred")  # latest
        assert_resolved(project, uid("customer_report"), uid("calendar_years", package=PACKAGE), "prod", "deferred")
        assert_resolved(project, uid("orders"), uid("stg_orders"), "staging", "deferred")  # ref('<project>', 'stg_orders')
        assert_resolved(project, uid("customer_report"), uid("customers"), "prod", "deferred")
        counts = project.counts(
            project.relation("dev", uid("customer_report")), project.relation("dev", uid("customer_emails")),
            project.relation("dev", uid("orders")),
        )
        assert counts == [CUSTOMERS, CUSTOMERS, ORDERS]


class BaseSchemasAndIdentifiers(_DeferBase):
    """A parent in a custom schema of each environment, under a mixed-case alias: found where
    dbt put it, rendered as dbt renders it (quoting and case are the adapter's)."""

    files = {"models/marts/top_customers.sql": "select * from {{ ref('customer_totals') }} where total_amount > 20\n"}

    def test_custom_schema_and_mixed_case_alias(self, project: DeferProject) -> None:
        project.deferred("run", "-s", "top_customers")
        prod = project.manifest("prod")["nodes"][uid("customer_totals")]
        assert prod["schema"] == project.schemas["prod"] + "_extra" and prod["alias"] == "CustomerTotals"
        assert_resolved(project, uid("top_customers"), uid("customer_totals"), "prod", "deferred")
        assert project.relation("prod", uid("customer_totals")) in project.compiled(uid("top_customers"))
        assert project.counts(project.relation("dev", uid("top_customers"))) == [3]


LIMIT_VARS = json.dumps({"dbt_defer": {"limits": {"dev": 2}, "never_defer": ["tag:pii"]}})


class BaseLimits(_DeferBase):
    """SPEC §6: limits by running target, per model (meta), not in data tests; aliased refs."""

    files = {
        "seeds/_seeds.yml": """version: 2
seeds:
  - name: raw_customers
    config:
      meta: {dbt_defer: {limit: null}}
""",
        "models/limits/lim_plain.sql": "select * from {{ ref('stg_customers') }}\n",
        "models/limits/lim_unlimited.sql": "select * from {{ ref('raw_customers') }}\n",
        "models/limits/_limits.yml": """version: 2
models:
  - name: lim_plain
    columns:
      - name: customer_id
        data_tests:
          - relationships:
              to: ref('stg_customers')
              field: customer_id
""",
        # aliased, qualified and subquery refs around a limited ref (SPEC §6)
        "models/aliased/lim_alias.sql": "select c.customer_id from {{ ref('stg_customers') }} c\n",
        "models/aliased/lim_as_alias.sql": "select c.customer_id from {{ ref('stg_customers') }} as c\n",
        "models/aliased/lim_qualified.sql": "select stg_customers.customer_id from {{ ref('stg_customers') }}\n",
        "models/aliased/lim_in_subquery.sql": (
            "select order_id from {{ ref('stg_orders') }}\n"
            "where customer_id in (select customer_id from {{ ref('stg_customers') }})\n"
        ),
    }

    def test_limited_dev_build(self, project: DeferProject) -> None:
        res = project.deferred("build", "-s", "path:models/limits", "--vars", LIMIT_VARS)
        plain, unlimited = uid("lim_plain"), uid("lim_unlimited")
        assert_resolved(project, plain, uid("stg_customers"), "staging", "deferred", limit=2)
        assert_resolved(project, unlimited, uid("raw_customers", "seed"), "staging", "deferred")  # meta limit: null
        [test] = project.test_ids("relationships_lim_plain")
        assert res.statuses()[test] == "pass"
        assert_resolved(project, test, uid("stg_customers"), "staging", "deferred")  # no limit in data tests
        assert_resolved(project, test, plain, "dev", "selected")
        assert project.audit()["summary"]["limited"] == 1
        sql = project.compiled(plain)
        assert project.relation("staging", uid("stg_customers")) in sql and re.search(r"\blimit\s+2\b", sql), sql
        counts = project.counts(project.relation("dev", plain), project.relation("dev", unlimited))
        assert counts == [2, CUSTOMERS]

    def test_limits_follow_the_running_target(self, project: DeferProject) -> None:
        project.deferred("compile", "-s", "lim_plain", "--target", "ci", "--vars", LIMIT_VARS)
        assert_resolved(project, uid("lim_plain"), uid("stg_customers"), "staging", "deferred", limit=None)

    def test_aliased_qualified_and_subquery_refs(self, project: DeferProject) -> None:
        res = project.deferred("run", "-s", "path:models/aliased", "--vars", LIMIT_VARS, expect=None)
        failed = {u: s for u, s in res.statuses().items() if s != "success"}
        assert not failed, f"limited refs broke the SQL: {failed}\n" + res.text()[-3000:]
        names = ("lim_alias", "lim_as_alias", "lim_qualified", "lim_in_subquery")
        for name in names:
            r = _record(project, uid(name), uid("stg_customers"))
            assert (r["env"], r["limit"]) == ("staging", 2), r
        counts = project.counts(*(project.relation("dev", uid(n)) for n in names))
        assert counts[:3] == [2, 2, 2]
        assert counts[3] <= 2  # two limited orders whose customers are among two limited customers


class BaseNeverDefer(_DeferBase):
    """SPEC §7 never_defer (tag selector var) and meta dbt_defer.defer: false."""

    files = {
        "models/staging/_staging.yml": """version: 2
models:
  - name: stg_orders
    config:
      meta: {dbt_defer: {defer: false}}
""",
    }

    def test_restricted_parents_missing_in_dev_stop_the_run(self, project: DeferProject) -> None:
        res = project.deferred("run", "-s", "pii_report", expect=False)
        text = res.text()
        assert uid("pii_emails") in text and "restricted" in text and project.schemas["dev"] in text
        res = project.deferred("compile", "-s", "orders", expect=False)
        assert uid("stg_orders") in res.text() and "restricted" in res.text()
        assert project.exists("dev", "pii_report", "orders") == [False, False]

    def test_restricted_parents_are_read_from_dev(self, project: DeferProject) -> None:
        project.deferred("run", "-s", "pii_emails", "stg_orders")
        project.deferred("run", "-s", "pii_report", "orders", "--favor-state")
        assert_resolved(project, uid("pii_report"), uid("pii_emails"), "dev", "restricted")
        assert_resolved(project, uid("orders"), uid("stg_orders"), "dev", "restricted")
        assert project.relation("dev", uid("pii_emails")) in project.compiled(uid("pii_report"))


class BaseWriteGuard(_DeferBase):
    """SPEC §7: a deferred run never writes into a relation that a chain environment records."""

    def test_a_run_with_the_prod_target_writes_nothing(self, project: DeferProject) -> None:
        rel = "models/marts/orders.sql"
        prod_orders = project.relation("prod", uid("orders"))
        with project.edited(rel, "select * from (" + project.read(rel) + ") x where 1 = 0\n"):
            res = project.deferred("run", "-s", "orders", "--target", "oops", expect=False)
        text = res.text()
        assert "refusing to write" in text and uid("orders") in text and "Nothing was written" in text
        assert project.counts(prod_orders) == [ORDERS]

    def test_read_only_commands_and_other_schemas_go_on(self, project: DeferProject) -> None:
        project.deferred("compile", "-s", "orders", "--target", "oops")
        project.deferred("run", "-s", "orders")
        assert project.exists("dev", "orders") == [True]


class BaseAuditExactness(_DeferBase):
    """SPEC §5: exactly one record per (node, ref), each with env, reason, relation, limit."""

    def test_every_resolution_of_a_build_exactly(self, project: DeferProject) -> None:
        res = project.deferred("build", "-s", "customers", "customer_report")
        doc = project.audit()
        tests = project.test_ids("")
        on_customers = [t for t in tests if re.search(r"\.(unique|not_null)_customers_customer_id\.", t)]
        on_customers += [t for t in tests if ".assert_totals_not_negative" in t]
        # eager indirect selection: orders' relationships test to customers runs too
        [crossing] = [t for t in tests if ".relationships_orders_customer_id" in t]
        assert len(on_customers) == 3, tests

        def row(node: str, ref: str, env: str, reason: str, cross: bool = False) -> Dict[str, Any]:
            relation = "__dbt__cte__int_order_totals" if env == "ephemeral" else project.relation(env, ref)
            return {"node": node, "ref": ref, "env": env, "relation": relation, "reason": reason,
                    "limit": None, "cross_environment": cross}

        expected = [
            row(uid("customer_report"), uid("calendar_years", package=PACKAGE), "prod", "deferred"),
            row(uid("customer_report"), uid("customers"), "dev", "selected"),
            row(uid("customer_report"), uid("dim_customers.v1"), "prod", "deferred"),
            row(uid("customers"), uid("int_order_totals"), "ephemeral", "ephemeral"),
            row(uid("customers"), uid("stg_customers"), "staging", "deferred"),
            row(uid("int_order_totals"), uid("stg_orders"), "staging", "deferred"),
            *(row(t, uid("customers"), "dev", "selected") for t in on_customers),
            row(crossing, uid("customers"), "dev", "selected", cross=True),
            row(crossing, uid("orders"), "staging", "deferred", cross=True),
        ]
        expected.sort(key=lambda r: (r["node"], r["ref"]))
        fields = ("node", "ref", "env", "relation", "reason", "limit", "cross_environment")
        assert [{k: r.get(k) for k in fields} for r in doc["resolutions"]] == expected
        summary = doc["summary"]
        assert {k: summary.get(k) for k in ("dev", "staging", "prod", "ephemeral", "limited")} == {
            "dev": 5, "staging": 3, "prod": 2, "ephemeral": 1, "limited": 0
        }
        assert doc["metadata"]["target"] == "dev" and doc["metadata"]["command"] == "build"
        assert [e["name"] for e in doc["environments"]] == list(ENVIRONMENTS)
        assert set(res.statuses().values()) <= {"success", "pass"}, res.statuses()
        # one debug line per deferred ref, one summary line, one cross-environment warning
        debug = res.lines("dbt-defer: ", level="debug")
        for r in expected:
            if r["env"] in ENVIRONMENTS:
                assert len([m for m in debug if m.startswith(f"dbt-defer: {r['node']} -> {r['ref']}:")]) == 1, debug
        assert len([m for m in res.lines("dbt-defer: ") if "refs resolved" in m]) == 1
        assert len([m for m in res.lines("dbt-defer: ", level="warn") if crossing in m]) == 1

    def test_the_warehouse_audit_table(self, project: DeferProject) -> None:
        """vars: dbt_defer: audit_table: true appends the records to <target schema>.dbt_defer_audit."""
        settings = json.dumps({"dbt_defer": {"audit_table": True, "never_defer": ["tag:pii"]}})
        res = project.deferred("compile", "-s", "customers", "--vars", settings)
        assert not res.lines("dbt-defer: could not append"), res.lines("dbt-defer: could not append")
        first = len(project.audit()["resolutions"])
        project.deferred("compile", "-s", "orders", "--vars", settings)
        second = len(project.audit()["resolutions"])
        assert project.probe(counts=[("dev", "dbt_defer_audit")])["counts"] == [first + second]


class BaseMetadataQueries(_DeferBase):
    """SPEC §4 cost: existence checks list each (database, schema) at most once per invocation,
    whatever the number of refs and threads (and share dbt's relation cache)."""

    def test_at_most_one_metadata_query_per_schema(self, project: DeferProject, monkeypatch: Any) -> None:
        from dbt.adapters.factory import FACTORY

        adapter_type = project.profile_target["type"]
        FACTORY.load_plugin(adapter_type)
        adapter_class = FACTORY.get_adapter_class_by_name(adapter_type)
        original = adapter_class.list_relations_without_caching
        calls: Dict[Tuple[str, str], int] = {}
        lock = threading.Lock()

        def counting(adapter: Any, schema_relation: Any) -> Any:
            key = ((schema_relation.database or "").lower(), (schema_relation.schema or "").lower())
            with lock:
                calls[key] = calls.get(key, 0) + 1
            return original(adapter, schema_relation)

        monkeypatch.setattr(adapter_class, "list_relations_without_caching", counting)
        res = project.deferred("build", "-s", "customers", "customer_report", "orders", "pii_emails", "--threads", "4")
        monkeypatch.undo()
        assert set(res.statuses().values()) <= {"success", "pass"}, res.statuses()
        summary = project.audit()["summary"]
        assert summary.get("staging", 0) >= 3 and summary.get("prod", 0) >= 2, summary
        schemas = {schema for (_, schema) in calls}
        assert {project.schemas["staging"], project.schemas["prod"]} <= schemas, calls
        assert max(calls.values()) == 1, calls


class BaseUnitTests(_DeferBase):
    """dbt unit tests of a model whose input is not in dev: its column types come from the chain."""

    files = {
        "models/marts/order_amounts.sql": (
            "select customer_id, sum(amount) as amount from {{ ref('stg_orders') }} group by customer_id\n"
        ),
        "models/marts/_unit.yml": """version: 2
unit_tests:
  - name: order_amounts_sums_per_customer
    model: order_amounts
    given:
      - input: ref('stg_orders')
        rows:
          - {order_id: 1, customer_id: 1, amount: 10}
          - {order_id: 2, customer_id: 1, amount: 25}
          - {order_id: 3, customer_id: 2, amount: 7}
    expect:
      rows:
        - {customer_id: 1, amount: 35}
        - {customer_id: 2, amount: 7}
""",
    }

    def test_unit_test_reads_input_types_through_the_chain(self, project: DeferProject) -> None:
        res = project.deferred("build", "-s", "order_amounts")
        unit = [u for u in res.statuses() if u.startswith("unit_test.")]
        assert unit and all(res.statuses()[u] == "pass" for u in unit), res.statuses()
        assert_resolved(project, uid("order_amounts"), uid("stg_orders"), "staging", "deferred")
        assert project.exists("dev", "stg_orders", "order_amounts") == [False, True]


class BaseExplain(_DeferBase):
    """SPEC §8 dbt-defer explain: the resolution table, computed without writing anything."""

    def test_explain_matches_a_compile_and_writes_nothing(self, project: DeferProject) -> None:
        code, out, err = project.explain("-s", "customers", "--target", "dev", "--output", "json")
        assert code == 0, err
        doc = json.loads(out)
        explained = {(r["node"], r["ref"]): (r["env"], r["reason"], r["relation"]) for r in doc["resolutions"]}
        assert explained[(uid("customers"), uid("stg_customers"))][:2] == ("staging", "deferred")
        assert explained[(uid("customers"), uid("int_order_totals"))][:2] == ("ephemeral", "ephemeral")
        assert project.probe(schemas=["dev"])["schemas"] == [False]  # nothing created, not even the schema
        assert not (project.target / "dbt_defer_audit.json").exists()

        # what the build of the same selection then does
        project.deferred("build", "-s", "customers", "--target", "dev")
        built = {k: (r["env"], r["reason"], r["relation"]) for k, r in project.resolutions().items()}
        assert explained == built
        assert explained[(uid("customers"), uid("stg_customers"))][2] == project.relation("staging", uid("stg_customers"))

    def test_explain_table_and_write_guard(self, project: DeferProject) -> None:
        code, out, err = project.explain("-s", "customer_report", "--target", "dev", "--vars", LIMIT_VARS)
        assert code == 0, err
        header = next(line for line in out.splitlines() if line.startswith("| node"))
        assert [c.strip() for c in header.strip("|").split("|")] == ["node", "ref", "env", "relation", "reason", "limit"]
        row = next(line for line in out.splitlines() if "dim_customers.v1" in line)
        assert "| prod" in row and "deferred" in row and "| 2" in row
        code, _, err = project.explain("-s", "customers", "--target", "oops")
        assert code == 1 and "refusing to write" in err and len(err.strip().splitlines()) == 1, err
