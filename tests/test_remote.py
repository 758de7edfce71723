"""Remote state through fsspec (SPEC §8): the cache, its reuse, and the unreachable paths.

Runs against a local HTTP server started here (http.server in a thread) and file:// URIs;
no dbt run needed (a minimal, valid manifest is written by hand).
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import threading
import time
from pathlib import Path
from typing import List, Tuple

import pytest

from dbt_defer import chain, remote, state_cache, store
from dbt_defer.config import EnvironmentSpec
from dbt_defer.manifests import ManifestError

pytest.importorskip("aiohttp")  # fsspec's http(s) implementation (the [http] / [test] extras)

SCHEMA = "https://schemas.getdbt.com/dbt/manifest/v12.json"


def write_manifest(folder: Path, generated_at: str = "2024-01-01T00:00:00Z", extra_node: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    nodes = {
        "model.shop.orders": {
            "resource_type": "model", "database": "db", "schema": "prod", "alias": "orders",
            "name": "orders", "package_name": "shop", "config": {"materialized": "table", "enabled": True},
            "checksum": {"name": "sha256", "checksum": "abc"},
        }
    }
    if extra_node:
        nodes["model.shop.customers"] = dict(nodes["model.shop.orders"], alias="customers", name="customers")
    doc = {
        "metadata": {"dbt_schema_version": SCHEMA, "dbt_version": "1.11.0", "generated_at": generated_at,
                     "project_name": "shop"},
        "nodes": nodes,
    }
    path = folder / "manifest.json"
    path.write_text(json.dumps(doc))
    return path


def write_run_results(folder: Path, status: str = "success") -> Path:
    path = folder / "run_results.json"
    path.write_text(json.dumps({"results": [{"unique_id": "model.shop.orders", "status": status}]}))
    return path


class Server:
    """A static file server over a folder; records every (method, path) it answers."""

    def __init__(self, root: Path, last_modified: bool = True) -> None:
        self.requests: List[Tuple[str, str]] = []
        requests = self.requests

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def send_header(self, key, value):
                if key == "Last-Modified" and not last_modified:
                    return
                super().send_header(key, value)

            def do_GET(self):
                requests.append(("GET", self.path))
                super().do_GET()

            def do_HEAD(self):
                requests.append(("HEAD", self.path))
                super().do_HEAD()

        handler = functools.partial(Handler, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def gets(self, name: str) -> int:
        return sum(1 for method, path in self.requests if method == "GET" and path.endswith(name))

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def served(tmp_path):
    root = tmp_path / "www"
    write_manifest(root / "prod")
    write_run_results(root / "prod")
    server = Server(root)
    yield server, root
    server.stop()


def spec(state: str, name: str = "prod") -> EnvironmentSpec:
    return EnvironmentSpec(name, state, "DBT_DEFER_PROD_STATE")


def test_manifest_uri_folder_or_file():
    assert store.manifest_uri("s3://b/dbt/prod") == "s3://b/dbt/prod/manifest.json"
    assert store.manifest_uri("s3://b/dbt/prod/") == "s3://b/dbt/prod/manifest.json"
    assert store.manifest_uri("https://h/p/manifest.json") == "https://h/p/manifest.json"
    assert store.manifest_uri("gs://b/prod-manifest.json") == "gs://b/prod-manifest.json"


def test_http_fetch_then_reuse_then_refetch_when_changed(served, tmp_path):
    server, root = served
    target = tmp_path / "target"
    env = spec(f"{server.url}/prod")

    first = remote.fetch(env, str(target))
    assert first.action == "downloaded"
    # each fetched version has its own folder in the environment's cache; fetch.json names it
    assert Path(first.local).parent == target / "dbt_defer_state" / "prod"
    assert first.local == state_cache.cached_folder(str(target), "prod")
    assert (Path(first.local) / "manifest.json").read_text() == (root / "prod" / "manifest.json").read_text()
    assert (Path(first.local) / "run_results.json").exists()
    assert first.run_results
    assert server.gets("manifest.json") == 1

    # unchanged remote (same Last-Modified and size): the cache is reused, nothing downloaded
    second = remote.fetch(env, str(target))
    assert second.action == "unchanged"
    assert server.gets("manifest.json") == 1
    assert server.gets("run_results.json") == 1

    # the remote changes (new content, new size and modification time): downloaded again
    time.sleep(1.1)  # Last-Modified has one-second resolution
    write_manifest(root / "prod", generated_at="2024-02-02T00:00:00Z", extra_node=True)
    third = remote.fetch(env, str(target))
    assert third.action == "downloaded"
    cached = json.loads((Path(third.local) / "manifest.json").read_text())
    assert cached["metadata"]["generated_at"] == "2024-02-02T00:00:00Z"

    # run_results.json removed remotely: removed from the cache too
    (root / "prod" / "run_results.json").unlink()
    time.sleep(1.1)
    write_manifest(root / "prod", generated_at="2024-03-03T00:00:00Z")
    fourth = remote.fetch(env, str(target))
    assert fourth.action == "downloaded" and not fourth.run_results
    assert not (Path(fourth.local) / "run_results.json").exists()


def test_force_downloads_even_when_unchanged(served, tmp_path):
    server, _ = served
    env = spec(f"{server.url}/prod/manifest.json")  # the file itself, not the folder
    remote.fetch(env, str(tmp_path / "t"))
    assert remote.fetch(env, str(tmp_path / "t"), force=True).action == "downloaded"
    assert server.gets("manifest.json") == 2


def test_no_version_information_means_always_download(tmp_path):
    root = tmp_path / "www"
    write_manifest(root / "prod")
    server = Server(root, last_modified=False)  # only a size: cannot tell two versions apart
    try:
        env = spec(f"{server.url}/prod")
        assert remote.fetch(env, str(tmp_path / "t")).action == "downloaded"
        assert remote.fetch(env, str(tmp_path / "t")).action == "downloaded"
    finally:
        server.stop()


def test_unreachable_falls_back_to_the_cache_with_its_age(served, tmp_path):
    server, _ = served
    env = spec(f"{server.url}/prod")
    target = str(tmp_path / "target")
    remote.fetch(env, target)
    server.stop()

    warnings: List[str] = []
    result = remote.fetch(env, target, warn=warnings.append)
    assert result.action == "cached (unreachable)"
    assert result.local == state_cache.cached_folder(target, "prod")
    assert os.path.dirname(result.local) == os.path.join(target, "dbt_defer_state", "prod")
    assert len(warnings) == 1
    line = warnings[0]
    assert "\n" not in line
    assert line.startswith("dbt-defer: environment 'prod': cannot fetch ")
    assert "using the cached copy" in line and "fetched 0 min ago" in line
    assert "manifest generated" in line and "2024-01-01T00:00:00Z" in line
    # the session's entry point behaves the same
    assert chain.local_state(env, target) == result.local


def test_unreachable_without_cache_is_one_clear_error(served, tmp_path):
    server, _ = served
    server.stop()
    env = spec(f"{server.url}/prod")
    with pytest.raises(ManifestError) as err:
        remote.fetch(env, str(tmp_path / "target"))
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(f"dbt-defer: environment 'prod': cannot fetch {server.url}/prod/manifest.json")
    assert "no cached copy" in text


def test_missing_remote_manifest(served, tmp_path):
    server, _ = served
    with pytest.raises(ManifestError, match="cannot fetch .*/nowhere/manifest.json"):
        remote.fetch(spec(f"{server.url}/nowhere"), str(tmp_path / "target"))


def test_not_a_manifest_is_refused_and_the_cache_kept(served, tmp_path):
    server, root = served
    env = spec(f"{server.url}/prod")
    target = tmp_path / "target"
    good_folder = remote.fetch(env, str(target)).local
    good = (Path(good_folder) / "manifest.json").read_text()
    time.sleep(1.1)
    (root / "prod" / "manifest.json").write_text("<html>login</html>")
    with pytest.raises(ManifestError) as err:
        remote.fetch(env, str(target))
    assert f"{server.url}/prod/manifest.json is not valid JSON" in str(err.value)
    assert ".incoming" not in str(err.value)
    assert state_cache.cached_folder(str(target), "prod") == good_folder
    assert (Path(good_folder) / "manifest.json").read_text() == good
    assert not [p for p in (target / "dbt_defer_state" / "prod").iterdir() if p.name.startswith(".incoming")]


def test_file_uri(tmp_path):
    folder = tmp_path / "published" / "prod"
    write_manifest(folder)
    env = spec(f"file://{folder}")
    target = str(tmp_path / "target")
    assert remote.fetch(env, target).action == "downloaded"
    assert remote.fetch(env, target).action == "unchanged"
    time.sleep(0.01)
    write_manifest(folder, extra_node=True)  # new size and mtime
    assert remote.fetch(env, target).action == "downloaded"


def test_a_different_uri_does_not_reuse_another_copy(tmp_path):
    for name in ("a", "b"):
        write_manifest(tmp_path / name, generated_at=f"2024-01-0{1 if name == 'a' else 2}T00:00:00Z")
    target = str(tmp_path / "target")
    remote.fetch(spec(f"file://{tmp_path / 'a'}"), target)
    result = remote.fetch(spec(f"file://{tmp_path / 'b'}"), target)
    assert result.action == "downloaded"
    assert "2024-01-02" in (Path(result.local) / "manifest.json").read_text()


@pytest.mark.parametrize("module, uri, extra", [("s3fs", "s3://bucket/dbt/prod", "s3"), ("gcsfs", "gs://bucket/dbt/prod", "gcs")])
def test_missing_implementation_names_the_extra(tmp_path, module, uri, extra):
    try:
        __import__(module)
    except ImportError:
        pass
    else:
        pytest.skip(f"{module} is installed")
    with pytest.raises(ManifestError, match=rf'pip install "dbt-defer\[{extra}\]"'):
        remote.fetch(spec(uri), str(tmp_path / "target"))


def test_unknown_protocol(tmp_path):
    with pytest.raises(ManifestError, match="Protocol not known"):
        remote.fetch(spec("nope://bucket/prod"), str(tmp_path / "target"))
