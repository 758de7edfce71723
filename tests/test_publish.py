"""dbt-defer publish (SPEC §8) on real stores on 127.0.0.1: file:// and S3 (moto's server mode).

Most tests publish hand-written artifacts (a manifest and run results of one "invocation") and
read them back through remote.fetch, as a deferred run does; the end-to-end tests at the bottom
build the integration project with real dbt on DuckDB, publish, fetch and run deferred.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

from dbt_defer import publish as pub
from dbt_defer import remote
from dbt_defer.pointer import published_version
from dbt_defer.config import EnvironmentSpec
from dbt_defer.manifests import ManifestError

SCHEMA = "https://schemas.getdbt.com/dbt/manifest/v12.json"
REPO = Path(__file__).resolve().parents[1]


# --- artifacts -------------------------------------------------------------------------------


def write_artifacts(
    folder: Path,
    invocation_id: Optional[str] = None,
    *,
    project: str = "shop",
    statuses: Optional[Dict[str, str]] = None,
    padding: int = 0,
    results_invocation_id: Optional[str] = None,
    generated_at: str = "2024-01-01T00:00:00Z",
) -> str:
    """manifest.json + run_results.json of one invocation; returns the invocation id."""
    invocation_id = invocation_id or str(uuid.uuid4())
    folder.mkdir(parents=True, exist_ok=True)
    node = {
        "resource_type": "model", "database": "db", "schema": "prod", "alias": "orders", "name": "orders",
        "package_name": project, "config": {"materialized": "table", "enabled": True},
        "checksum": {"name": "sha256", "checksum": invocation_id},
    }
    nodes = {f"model.{project}.orders": node}
    for i in range(padding):  # bigger files: uploads take long enough to interleave with readers
        nodes[f"model.{project}.m{i}"] = dict(node, alias=f"m{i}", name=f"m{i}", description="x" * 200)
    manifest = {
        "metadata": {"dbt_schema_version": SCHEMA, "dbt_version": "1.11.0", "generated_at": generated_at,
                     "invocation_id": invocation_id, "project_name": project},
        "nodes": nodes,
    }
    statuses = statuses or {f"model.{project}.orders": "success"}
    results = {
        "metadata": {"dbt_schema_version": "https://schemas.getdbt.com/dbt/run-results/v6.json",
                     "dbt_version": "1.11.0", "generated_at": generated_at,
                     "invocation_id": results_invocation_id or invocation_id},
        "results": [{"unique_id": uid, "status": status} for uid, status in statuses.items()],
        "args": {"which": "build", "target": "prod"},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "run_results.json").write_text(json.dumps(results))
    return invocation_id


def cached_pair(local: str) -> tuple:
    """(manifest invocation id, run_results invocation id) of a fetched copy."""
    manifest = json.loads((Path(local) / "manifest.json").read_text())
    results = json.loads((Path(local) / "run_results.json").read_text())
    return manifest["metadata"]["invocation_id"], results["metadata"]["invocation_id"]


def spec(state: str, name: str = "prod") -> EnvironmentSpec:
    return EnvironmentSpec(name, state, "DBT_DEFER_PROD_STATE")


# --- stores ----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[Dict[str, str]]:
    """moto's S3 server on 127.0.0.1 (a real S3 protocol over HTTP), reached through s3fs."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("dbt-artifacts")
    try:
        yield env
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path) -> str:
    """A fresh publish URI on each store."""
    if request.param == "file":
        return f"file://{tmp_path}/published/prod"
    request.getfixturevalue("s3_server")
    return f"s3://dbt-artifacts/{uuid.uuid4().hex[:10]}/prod"


def _fs(uri: str):
    import fsspec

    return fsspec.core.url_to_fs(uri)


def listing(uri: str) -> List[str]:
    """Every file under a URI, relative to it."""
    fs, root = _fs(uri)
    fs.invalidate_cache()
    return sorted(p[len(root.rstrip("/")) + 1:] for p in fs.find(root))


def read(uri: str) -> bytes:
    fs, path = _fs(uri)
    fs.invalidate_cache()
    return fs.cat_file(path)


def publish_folder(uri: str, folder: Path, **kwargs) -> pub.Published:
    return pub.publish(uri, pub.check_artifacts(str(folder), "shop"), **kwargs)


def subprocess_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "plugin") + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


# --- publish, then read through the pointer ---------------------------------------------------


def test_publish_layout_pointer_and_fetch(store, tmp_path):
    first = write_artifacts(tmp_path / "run1")
    result = publish_folder(store, tmp_path / "run1", env="prod")
    assert not result.already
    version = f"versions/{result.version}"
    assert result.version.endswith("-" + first)
    assert listing(store) == ["latest.json", f"{version}/manifest.json", f"{version}/run_results.json"]
    for name in ("manifest.json", "run_results.json"):
        assert read(f"{store}/{version}/{name}") == (tmp_path / "run1" / name).read_bytes()
    pointer = json.loads(read(f"{store}/latest.json"))
    assert pointer["path"] == version and pointer["invocation_id"] == first
    assert pointer["generated_at"] == "2024-01-01T00:00:00Z" and pointer["dbt_version"] == "1.11.0"
    assert pointer["env"] == "prod" and pointer["failed_nodes"] == 0 and pointer["previous"] is None
    assert len(pointer["files"]["manifest.json"]["sha256"]) == 64

    target = str(tmp_path / "target")
    fetched = remote.fetch(spec(store), target)
    assert fetched.action == "downloaded"
    assert fetched.uri == f"{store}/{version}/manifest.json"
    assert published_version(fetched.uri)["invocation_id"] == first
    assert cached_pair(fetched.local) == (first, first)
    assert remote.fetch(spec(store), target).action == "unchanged"

    second = write_artifacts(tmp_path / "run2", generated_at="2024-01-02T00:00:00Z")
    publish_folder(store, tmp_path / "run2", env="prod")
    assert json.loads(read(f"{store}/latest.json"))["previous"] == result.version
    again = remote.fetch(spec(store), target)
    assert again.action == "downloaded" and published_version(again.uri)["invocation_id"] == second
    assert cached_pair(again.local) == (second, second)
    assert remote.fetch(spec(store), target).action == "unchanged"
    # the pointer file itself works as a state too
    assert cached_pair(remote.fetch(spec(f"{store}/latest.json"), str(tmp_path / "t2")).local) == (second, second)


def test_the_pointer_wins_over_loose_files_and_no_pointer_keeps_todays_behaviour(store, tmp_path):
    fs, root = _fs(store)
    old = write_artifacts(tmp_path / "hand-copied")
    fs.makedirs(root, exist_ok=True)
    for name in ("manifest.json", "run_results.json"):
        fs.put_file(str(tmp_path / "hand-copied" / name), f"{root}/{name}")
    plain = remote.fetch(spec(store), str(tmp_path / "t1"))
    assert published_version(plain.uri) is None and plain.uri == f"{store}/manifest.json"
    assert cached_pair(plain.local) == (old, old)

    new = write_artifacts(tmp_path / "run")
    publish_folder(store, tmp_path / "run")
    followed = remote.fetch(spec(store), str(tmp_path / "t1"))
    assert followed.action == "downloaded" and cached_pair(followed.local) == (new, new)


def test_unreachable_store_falls_back_to_the_copy_fetched_through_the_pointer(tmp_path, s3_server):
    store = f"s3://dbt-artifacts/{uuid.uuid4().hex[:10]}/prod"
    first = write_artifacts(tmp_path / "run")
    publish_folder(store, tmp_path / "run")
    target = str(tmp_path / "target")
    remote.fetch(spec(store), target)
    unreachable = f"http://127.0.0.1:{_free_port()}"
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    os.environ["AWS_ENDPOINT_URL"] = unreachable
    try:
        warnings: List[str] = []
        result = remote.fetch(spec(store), target, warn=warnings.append)
        with pytest.raises(ManifestError) as err:
            remote.fetch(spec(store), str(tmp_path / "no-cache"))
    finally:
        os.environ["AWS_ENDPOINT_URL"] = s3_server["AWS_ENDPOINT_URL"]
        s3fs.S3FileSystem.clear_instance_cache()
    assert result.action == "cached (unreachable)"
    assert published_version(result.uri)["invocation_id"] == first
    assert cached_pair(result.local) == (first, first)
    assert len(warnings) == 1 and "using the cached copy" in warnings[0]
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(f"dbt-defer: environment 'prod': cannot fetch {store}/latest.json (")
    assert text.endswith("and there is no cached copy; check the URI, the network and credentials, then run dbt-defer fetch")


def test_prune_keeps_the_newest_k_and_never_the_pointers_version(store, tmp_path):
    names = []
    for i in range(5):
        write_artifacts(tmp_path / f"run{i}")
        names.append(publish_folder(store, tmp_path / f"run{i}", keep=3).version)
    versions = sorted({p.split("/")[1] for p in listing(store) if p.startswith("versions/")})
    assert versions == names[-3:]

    # two publishes killed before their pointer move leave newer folders nobody points at; the
    # pointer's version is kept whatever --keep says
    fs, root = _fs(store)
    for orphan in ("29990101T000000000000Z-orphan1", "29990101T000000000001Z-orphan2"):
        fs.makedirs(f"{root}/versions/{orphan}", exist_ok=True)
        fs.put_file(str(tmp_path / "run0" / "manifest.json"), f"{root}/versions/{orphan}/manifest.json")
    again = publish_folder(store, tmp_path / "run4", keep=1)  # the pointer names run4 already
    assert again.already and again.version == names[-1]
    assert again.removed == [names[-3], names[-2], "29990101T000000000000Z-orphan1"]
    assert again.kept == sorted([names[-1], "29990101T000000000001Z-orphan2"])
    # something else under versions/ is not ours: never touched
    fs.makedirs(f"{root}/versions/README", exist_ok=True)
    fs.put_file(str(tmp_path / "run0" / "manifest.json"), f"{root}/versions/README/manifest.json")
    publish_folder(store, tmp_path / "run4", keep=1)
    assert "versions/README/manifest.json" in listing(store)


def test_an_older_run_never_replaces_a_newer_one(store, tmp_path):
    """Issue 22 (8): the pointer names a run whose manifest is newer: an older run's publish
    uploads nothing and moves nothing, in one line."""
    newer = write_artifacts(tmp_path / "new", generated_at="2024-02-01T00:00:00Z")
    publish_folder(store, tmp_path / "new")
    write_artifacts(tmp_path / "old", generated_at="2024-01-01T00:00:00Z")
    before = listing(store)
    with pytest.raises(pub.PublishError) as err:
        publish_folder(store, tmp_path / "old")
    line = str(err.value)
    assert "\n" not in line and line.startswith("dbt-defer: nothing published: ")
    assert "names a newer run" in line and "2024-02-01T00:00:00Z" in line
    assert json.loads(read(f"{store}/latest.json"))["invocation_id"] == newer
    assert listing(store) == before
    # a run dated in the future (a wrong clock) does not block every later run
    write_artifacts(tmp_path / "future", generated_at="9999-12-31T00:00:00Z")
    publish_folder(store, tmp_path / "future")
    later = write_artifacts(tmp_path / "later", generated_at="2024-03-01T00:00:00Z")
    publish_folder(store, tmp_path / "later")
    assert json.loads(read(f"{store}/latest.json"))["invocation_id"] == later


@pytest.mark.parametrize("a_is_newer", [True, False])
def test_concurrent_publishers_never_leave_the_pointer_at_a_pruned_version(store, tmp_path, monkeypatch, a_is_newer):
    """Issue 22 (8): publisher A reads the pointer and uploads; publisher B publishes in full
    (moves the pointer, prunes with --keep 1, which removes A's upload); then A moves the pointer.
    Before: A's write named the version B had pruned (readers: "not found"), or A's older run
    replaced B's newer one. Now A's write is conditional: A sees B's pointer, and either uploads
    again under a later name and points at that (A newer) or gives up (A older)."""
    write_artifacts(tmp_path / "base", generated_at="2024-01-01T00:00:00Z")
    publish_folder(store, tmp_path / "base", keep=1)
    a = write_artifacts(tmp_path / "a", generated_at="2024-03-01T00:00:00Z" if a_is_newer else "2024-02-01T00:00:00Z")
    b = write_artifacts(tmp_path / "b", generated_at="2024-02-15T00:00:00Z")
    real = pub.write_pointer
    calls = []

    def racing(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:  # A, about to move the pointer: B publishes from start to end first
            publish_folder(store, tmp_path / "b", keep=1)
        return real(*args, **kwargs)

    monkeypatch.setattr(pub, "write_pointer", racing)
    if a_is_newer:
        publish_folder(store, tmp_path / "a", keep=1)
    else:
        with pytest.raises(pub.PublishError) as err:
            publish_folder(store, tmp_path / "a", keep=1)
        assert "names a newer run" in str(err.value) and str(err.value).startswith("dbt-defer: not published: ")
    pointer = json.loads(read(f"{store}/latest.json"))
    winner = a if a_is_newer else b
    assert pointer["invocation_id"] == winner
    assert f"{pointer['path']}/manifest.json" in listing(store)
    versions = {p.split("/")[1] for p in listing(store) if p.startswith("versions/")}
    assert versions == {pointer["version"]}  # --keep 1: the loser's upload is gone too
    assert cached_pair(remote.fetch(spec(store), str(tmp_path / "target")).local) == (winner, winner)


def test_republishing_a_run_whose_version_was_deleted_uploads_it_again(tmp_path):
    store = f"file://{tmp_path}/published/prod"
    invocation = write_artifacts(tmp_path / "run")
    first = publish_folder(store, tmp_path / "run")
    import shutil

    shutil.rmtree(tmp_path / "published" / "prod" / "versions" / first.version)
    again = publish_folder(store, tmp_path / "run")
    assert not again.already and again.version != first.version
    assert cached_pair(remote.fetch(spec(store), str(tmp_path / "target")).local) == (invocation, invocation)


@pytest.mark.parametrize(
    "case, needle",
    [
        ("other invocation", "come from different dbt commands"),
        ("other project", "is a manifest of project 'other', not of 'shop'"),
        ("no run results", "run_results.json does not exist"),
        ("not a manifest", "is not valid JSON"),
    ],
)
def test_bad_artifacts_publish_nothing(case, needle, tmp_path):
    folder = tmp_path / "target"
    if case == "other invocation":
        write_artifacts(folder, results_invocation_id=str(uuid.uuid4()))
    elif case == "other project":
        write_artifacts(folder, project="other")
    elif case == "no run results":
        write_artifacts(folder)
        (folder / "run_results.json").unlink()
    else:
        write_artifacts(folder)
        (folder / "manifest.json").write_text("<html>")
    with pytest.raises(pub.PublishError) as err:
        pub.check_artifacts(str(folder), "shop")
    text = str(err.value)
    assert "\n" not in text and text.startswith("dbt-defer: nothing published: ") and needle in text


def test_a_broken_or_escaping_pointer_is_one_clear_line(tmp_path):
    store = f"file://{tmp_path}/published/prod"
    write_artifacts(tmp_path / "run")
    publish_folder(store, tmp_path / "run")
    pointer = tmp_path / "published" / "prod" / "latest.json"
    for content, needle in (
        ("{not json", "not valid JSON"),
        (json.dumps({"path": "../../elsewhere"}), "is not versions/<UTC time>-<invocation id>"),
        (json.dumps({"path": "versions/../../x"}), "is not versions/"),
        (json.dumps({"version": "x"}), "no version path"),
    ):
        pointer.write_text(content)
        with pytest.raises(ManifestError) as err:
            remote.fetch(spec(store), str(tmp_path / "target"))
        text = str(err.value)
        assert "\n" not in text and needle in text
        assert text.startswith(f"dbt-defer: environment 'prod': {store}/latest.json is not a dbt-defer publish pointer")


def test_a_deeply_nested_pointer_is_an_invalid_pointer_and_never_blocks_publish(tmp_path):
    """Issue 22 (13): a pointer of deeply nested JSON is "not a dbt-defer publish pointer" (no
    RecursionError text, no "check the network"), and the next publish replaces it."""
    store = f"file://{tmp_path}/published/prod"
    (tmp_path / "published" / "prod").mkdir(parents=True)
    pointer = tmp_path / "published" / "prod" / "latest.json"
    pointer.write_text("[" * 60000)
    with pytest.raises(ManifestError) as err:
        remote.fetch(spec(store), str(tmp_path / "target"))
    text = str(err.value)
    assert "\n" not in text and "Recursion" not in text and "network" not in text
    assert text.startswith(f"dbt-defer: environment 'prod': {store}/latest.json is not a dbt-defer publish pointer")
    assert "nested too deeply" in text
    first = write_artifacts(tmp_path / "run")
    result = publish_folder(store, tmp_path / "run")
    assert json.loads(pointer.read_text())["path"] == f"versions/{result.version}"
    assert cached_pair(remote.fetch(spec(store), str(tmp_path / "target")).local) == (first, first)


def test_publish_refuses_stores_and_uris_it_cannot_write(tmp_path, s3_server):
    write_artifacts(tmp_path / "run")
    artifacts = pub.check_artifacts(str(tmp_path / "run"), "shop")
    with pytest.raises(pub.PublishError, match="names a file"):
        pub.publish(f"file://{tmp_path}/x/manifest.json", artifacts)
    with pytest.raises(pub.PublishError, match=r"has a query string") as err:
        pub.publish("https://user:s3cret@example.com/prod?token=T0K", artifacts)
    assert "s3cret" not in str(err.value) and "T0K" not in str(err.value)
    if "s3fs" in sys.modules:  # a missing bucket is an error, never created
        import s3fs

        with pytest.raises(pub.PublishError, match="cannot upload to s3://no-such-bucket-dbt-defer/prod/versions/"):
            pub.publish("s3://no-such-bucket-dbt-defer/prod", artifacts)
        assert not s3fs.S3FileSystem().exists("no-such-bucket-dbt-defer")
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(pub.PublishError, match="cannot upload to .*a-file/prod/versions/.*readers still see"):
        pub.publish(f"file://{tmp_path}/a-file/prod", artifacts)


# --- concurrency and crashes ------------------------------------------------------------------

_PUBLISHER = """
import sys
from dbt_defer import publish as pub
for folder in sys.argv[2:]:
    pub.publish(sys.argv[1], pub.check_artifacts(folder, "shop"), env="prod")
"""


def test_a_reader_fetching_while_a_publisher_writes_always_sees_one_runs_pair(store, tmp_path):
    runs = []
    for i in range(12):
        write_artifacts(tmp_path / f"run{i}", padding=3000)  # ~1.2 MB manifests
        runs.append(str(tmp_path / f"run{i}"))
    publish_folder(store, Path(runs[0]))
    publisher = subprocess.Popen(
        [sys.executable, "-c", _PUBLISHER, store, *runs[1:]], env=subprocess_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    target = str(tmp_path / "target")
    seen = set()
    fetches = 0
    deadline = time.monotonic() + 300
    while publisher.poll() is None and time.monotonic() < deadline:
        result = remote.fetch(spec(store), target)
        manifest_id, results_id = cached_pair(result.local)
        assert manifest_id == results_id, f"a mixed pair after {fetches} fetches"
        assert published_version(result.uri)["invocation_id"] == manifest_id
        seen.add(manifest_id)
        fetches += 1
    _, err = publisher.communicate(timeout=60)
    assert publisher.returncode == 0, err
    final = remote.fetch(spec(store), target)
    last = json.loads((Path(runs[-1]) / "manifest.json").read_text())["metadata"]["invocation_id"]
    assert cached_pair(final.local) == (last, last)
    assert len(seen) >= 2, f"the reader saw only {seen} in {fetches} fetches: no overlap to test"


_KILLED_PUBLISHER = """
import os, signal, sys
from dbt_defer import publish as pub

def killed(*args, **kwargs):  # the process dies after the upload, before the pointer moves
    os.kill(os.getpid(), signal.SIGKILL)

pub.write_pointer = killed
pub.publish(sys.argv[1], pub.check_artifacts(sys.argv[2], "shop"))
"""


def test_a_publisher_killed_between_upload_and_pointer_move(store, tmp_path):
    old = write_artifacts(tmp_path / "old")
    old_version = publish_folder(store, tmp_path / "old").version
    write_artifacts(tmp_path / "killed")
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_PUBLISHER, store, str(tmp_path / "killed")], env=subprocess_env(),
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    versions = {p.split("/")[1] for p in listing(store) if p.startswith("versions/")}
    assert len(versions) == 2  # the killed one's upload is there, unreferenced
    assert json.loads(read(f"{store}/latest.json"))["version"] == old_version

    # readers, new and existing, still see the old version
    assert cached_pair(remote.fetch(spec(store), str(tmp_path / "fresh")).local) == (old, old)

    # the next publish works, and a prune removes the orphan
    new = write_artifacts(tmp_path / "new")
    result = publish_folder(store, tmp_path / "new", keep=1)
    assert cached_pair(remote.fetch(spec(store), str(tmp_path / "fresh")).local) == (new, new)
    assert [p.split("/")[1] for p in listing(store) if p.startswith("versions/")] == [result.version] * 2
    assert not [p for p in listing(store) if ".tmp" in p]


# --- end to end: real dbt on DuckDB, the CLI ---------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The integration project on DuckDB with prod built in full; its artifacts kept in prod-target/."""
    from dbt_harness import make_project

    p = make_project(tmp_path_factory.mktemp("publish"), "duckdb")
    p.dbt("deps")
    p.dbt("build", "--target", "prod")
    p.save_artifacts("prod-target")
    return p


def run_cli(capsys, project, *args: str, env: Optional[Dict[str, str]] = None):
    from dbt_defer import cli
    from dbt_harness import _environment

    capsys.readouterr()
    with _environment(env or {}):
        code = cli.main([*args, "--project-dir", str(project.root)])
    out, err = capsys.readouterr()
    return code, out, err


def drop_dev(p) -> None:
    import duckdb

    with duckdb.connect(str(p.duckdb_path)) as con:
        con.execute(f'drop schema if exists "{p.schema("dev")}" cascade')


def test_publish_then_fetch_then_a_deferred_run(built, store, capsys):
    p = built
    invocation = json.loads((p.root / "prod-target" / "manifest.json").read_text())["metadata"]["invocation_id"]
    code, out, err = run_cli(capsys, p, "publish", store, "--env", "prod", "--target-path", "prod-target")
    assert code == 0, err
    assert f"published invocation {invocation} (build, " in out and "now names it" in out
    pointer = json.loads(read(f"{store}/latest.json"))
    assert pointer["invocation_id"] == invocation and pointer["env"] == "prod" and pointer["command"] == "build"
    # publishing the same run again uploads nothing
    code, out, err = run_cli(capsys, p, "publish", store, "--target-path", "prod-target", "--output", "json")
    assert code == 0, err
    assert json.loads(out)["already_published"] is True

    chain = {"DBT_DEFER_PROD_STATE": store}
    code, out, err = run_cli(capsys, p, "fetch", env=chain)
    assert code == 0, err
    assert "downloaded" in out and pointer["version"] in out
    code, out, err = run_cli(capsys, p, "status", "--output", "json", env=chain)
    assert code == 0, err
    published = json.loads(out)["environments"][0]["published"]
    assert published["invocation_id"] == invocation and published["version"] == pointer["version"]
    assert 0 <= published["age_hours"] < 1
    code, out, err = run_cli(capsys, p, "status", env=chain)
    assert code == 0, err
    assert f"{invocation} (" in out and "min ago)" in out

    drop_dev(p)
    p.dbt("run", "-s", "customer_report", env=dict(chain, DBT_DEFER="1"))
    audit = p.audit()
    assert next(e for e in audit["environments"] if e["name"] == "prod")["state"] == store
    record = p.resolutions()[(p.uid("customer_report"), p.uid("customers"))]
    assert (record["env"], record["reason"]) == ("prod", "deferred")
    count = 'select count(*) from "{}"."customer_report"'
    assert p.query(count.format(p.schema("dev")))[0][0] == p.query(count.format(p.schema("prod")))[0][0] > 0


def test_publish_uploads_no_secret_of_vars_or_the_invocation_command(built, tmp_path, capsys):
    """Issue 22 (11): dbt writes --vars into run_results.json (args.vars, args.invocation_command);
    publish uploads it for every reader, so URI credentials, query strings and fragments in it
    are uploaded as ***, and the pointer's sha256 is of what was uploaded (a reader verifies it)."""
    p = built
    state = "https://reader:SecretPW5@host.example/prod?token=T0KENsecret#Frag5ecret"
    bucket = "s3://AKIAKEYID:wJalrXUt/K7MDENG@bucket/prod"
    vars_ = json.dumps({"my_state": state, "nested": {"list": [bucket, "plain value"]}})
    p.dbt("seed", "--target", "staging", "-s", "raw_orders", "--vars", vars_, "--target-path", "vars-target")
    results_path = p.root / "vars-target" / "run_results.json"
    local = json.loads(results_path.read_text())
    assert local["args"]["vars"]["my_state"] == state  # what dbt wrote (and keeps locally)
    # in-process, dbt records pytest's argv as the command: the command line a shell would give
    local["args"]["invocation_command"] = f"dbt seed --target staging --vars '{vars_}'"
    results_path.write_text(json.dumps(local))
    store = f"file://{tmp_path}/store/staging"
    code, out, err = run_cli(capsys, p, "publish", store, "--env", "staging", "--target-path", "vars-target")
    assert code == 0, err
    assert "still hold --vars" in err and "SecretPW5" not in out + err
    pointer = json.loads(read(f"{store}/latest.json"))
    uploaded = read(f"{store}/{pointer['path']}/run_results.json")
    for secret in ("SecretPW5", "T0KENsecret", "Frag5ecret", "wJalrXUt", "K7MDENG"):
        assert secret.encode() not in uploaded, secret
    args = json.loads(uploaded)["args"]
    assert args["vars"]["my_state"] == "https://***@host.example/prod?***"
    assert args["vars"]["nested"]["list"][1] == "plain value"
    assert "***" in args["invocation_command"] and "seed" in args["invocation_command"]
    import hashlib

    assert pointer["files"]["run_results.json"]["sha256"] == hashlib.sha256(uploaded).hexdigest()
    fetched = remote.fetch(spec(store, "staging"), str(tmp_path / "target"))
    assert b"SecretPW5" not in (Path(fetched.local) / "run_results.json").read_bytes()


def test_a_failed_run_is_published_unless_only_success(built, tmp_path, capsys):
    """Staging's last run of orders failed: published, its failure sends readers on to prod."""
    p = built
    prod_store = f"file://{tmp_path}/store/prod"
    staging_store = f"file://{tmp_path}/store/staging"
    assert run_cli(capsys, p, "publish", prod_store, "--env", "prod", "--target-path", "prod-target")[0] == 0

    p.dbt("build", "--target", "staging", "-s", "raw_orders", "stg_orders", "orders")
    p.dbt("run", "--target", "staging", "-s", "orders", "--vars", "{break_orders: true}", expect=False)
    assert p.relation_exists("staging", "orders")  # the old table stays behind the failed run
    code, out, err = run_cli(capsys, p, "publish", staging_store, "--env", "staging", "--only-success")
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dbt-defer: not published (--only-success): 1 of 1 results")
    assert f"{p.uid('orders')} (error)" in lines[0]
    assert not (tmp_path / "store" / "staging").exists()

    code, out, err = run_cli(capsys, p, "publish", staging_store, "--env", "staging")
    assert code == 0, err
    assert "1 results, 1 not successful" in out

    p.write("models/marts/order_count.sql", "select count(*) as n from {{ ref('orders') }}\n")
    chain = {"DBT_DEFER": "1", "DBT_DEFER_STAGING_STATE": staging_store, "DBT_DEFER_PROD_STATE": prod_store}
    p.dbt("compile", "-s", "order_count", env=chain)
    record = p.resolutions()[(p.uid("order_count"), p.uid("orders"))]
    assert record["env"] == "prod", record


def test_publish_usage_errors(built, capsys, tmp_path):
    p = built
    code, _, err = run_cli(capsys, p, "publish", f"file://{tmp_path}/s", "--keep", "0")
    assert code == 2 and err.startswith("dbt-defer: --keep 0")
    code, _, err = run_cli(capsys, p, "publish", f"file://{tmp_path}/s", "--env", "Prod EU")
    assert code == 2 and "is not an environment name" in err
    code, _, err = run_cli(capsys, p, "publish", f"file://{tmp_path}/s", "--target-path", "nowhere")
    assert code == 1 and "nothing published" in err and "does not exist" in err
    assert len(err.strip().splitlines()) == 1
