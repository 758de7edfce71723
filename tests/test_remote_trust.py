"""Remote state as untrusted input (SPEC §7, §8; issues 11 and 17): secrets, signed URLs, size
limits, the fetch deadline, long names, the atomic versioned cache, verify-before-replace and
every fsspec URI form ending in one line.

HTTP cases run against servers on 127.0.0.1 started here (slow, gzip, never answering, signed);
the end-to-end secret test runs real dbt (DuckDB) and the dbt-defer CLI in subprocesses and greps
every file they write and everything they print.
"""

from __future__ import annotations

import base64
import functools
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
import zipfile
import zlib
from email.utils import formatdate
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from dbt_defer import chain, remote, state_cache, store
from dbt_defer.config import EnvironmentSpec, redact, uri_secrets
from dbt_defer.manifests import ManifestError
from test_publish import cached_pair, write_artifacts
from test_remote import Server, write_manifest, write_run_results

pytest.importorskip("aiohttp")

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TIMEOUT_ENV = "DBT_DEFER_FETCH_TIMEOUT"
MAX_STATE_ENV = "DBT_DEFER_MAX_STATE_MB"


def spec(state: str, name: str = "prod") -> EnvironmentSpec:
    return EnvironmentSpec(name, state, "DBT_DEFER_PROD_STATE")


def one_line(text: str) -> str:
    assert "\n" not in text and "Traceback" not in text, text
    assert text.startswith("dbt-defer: "), text
    return text


@pytest.fixture
def clean_env(monkeypatch):
    for key in (TIMEOUT_ENV, MAX_STATE_ENV):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def _serve(handler_cls, root: Optional[Path] = None):
    handler = functools.partial(handler_cls, directory=str(root)) if root else handler_cls
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


def _stop(httpd) -> None:
    httpd.shutdown()
    httpd.server_close()


# --- secrets: the redaction itself ------------------------------------------------------------


@pytest.mark.parametrize("state, secrets", [
    ("http://user:s3cretPW@host/prod", ["s3cretPW"]),
    ("s3://KEY:SECRETKEY@bucket/dbt/prod", ["SECRETKEY"]),
    ("s3://AKIAKEYID:wJalrXUt/K7MDENG@bucket/prod", ["wJalrXUt", "K7MDENG"]),
    ("https://host/prod?token=T0KENsecret", ["T0KENsecret"]),
    ("https://host/prod/manifest.json?X-Amz-Signature=abcdef123&X-Amz-Credential=AKIA%2F2024", ["abcdef123", "AKIA"]),
    ("zip://manifest.json::s3://KEY:SECRETKEY@bucket/prod.zip", ["SECRETKEY"]),
])
def test_secrets_of_a_state_uri_are_never_shown(state, secrets):
    env = spec(state)
    messages = [
        state,
        f"dbt-defer: environment 'prod': cannot fetch {store.manifest_uri(state)} (ClientResponseError: 403, "
        f"message='Forbidden', url='{store.manifest_uri(state)}')",
        f"Invalid bucket name \"{state.split('://', 1)[1].split('/')[0]}\"",  # s3fs quotes the 'bucket' alone
        json.dumps({"state": state}),
    ]
    for message in messages:
        shown = env.redact(message)
        for secret in secrets:
            assert secret not in shown, (message, shown)
        assert "\n" not in shown
    assert "***" in env.redact(state)
    # the generic function (no spec): credentials and query strings of any URI in a text
    assert redact("see http://u:pw@h:8080/x?sig=1 and s3://b/k") == "see http://***@h:8080/x?*** and s3://b/k"
    assert redact("zip://m.json::https://h/x.zip?t=abc::x") == "zip://m.json::https://h/x.zip?***::x"
    # nothing secret: unchanged
    for plain in ("s3://bucket/dbt/prod", "/local/prod-artifacts", "http://host:8080/a@b/manifest.json"):
        assert spec(plain).redact(plain) == plain and not uri_secrets(plain)


@pytest.mark.parametrize("state", ["https://host/dbt/prod#SecretPW5", "https://host/dbt/prod?sig=abcd#SecretPW5",
                                   "zip://manifest.json::https://host/prod.zip#SecretPW5"])
def test_a_uri_fragment_is_a_secret_too(state, tmp_path, clean_env):
    """Issue 22 (12): a fragment (`#SecretPW5`) is rendered *** like a password or a query string."""
    assert "SecretPW5" in uri_secrets(state)
    assert "SecretPW5" not in redact(f"cannot fetch {state} (boom)") and "***" in redact(state)
    assert redact("see issue #5 and a/b#c") == "see issue #5 and a/b#c"  # not a URI: unchanged
    port = _free_port()  # nothing listens there
    env = spec(state.replace("https://host", f"http://127.0.0.1:{port}"))
    with pytest.raises(ManifestError) as err:
        remote.fetch(env, str(tmp_path / "target"))
    assert "SecretPW5" not in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("state", ["s3://AKIAKEYID:wJalrXUt/K7MDENG@bucket/prod", "gs://svc:SECRETKEY@bucket/prod",
                                   "zip://manifest.json::s3://KEY:SECRETKEY@bucket/prod.zip"])
def test_credentials_in_an_object_store_uri_are_refused_in_one_line(state, tmp_path, clean_env):
    """Issue 22 (12): s3fs would read "KEY:SECRET" as a bucket name (a truncated botocore
    ParamValidationError); instead one line says it is not supported and where credentials go."""
    from dbt_defer import publish as pub

    with pytest.raises(ManifestError) as err:
        remote.fetch(spec(state), str(tmp_path / "target"))
    text = str(err.value)
    assert "\n" not in text and "bucket name" not in text.lower() and "Parameter validation" not in text
    assert text.startswith("dbt-defer: environment 'prod': state ") and "has credentials in the URI" in text
    assert ("AWS_ACCESS_KEY_ID" in text) if "s3://" in state else ("GOOGLE_APPLICATION_CREDENTIALS" in text)
    for secret in ("wJalrXUt", "K7MDENG", "SECRETKEY"):
        assert secret not in text
    if state.startswith(("s3://", "gs://")):
        write_artifacts(tmp_path / "run")
        with pytest.raises(pub.PublishError) as published:
            pub.publish(state, pub.check_artifacts(str(tmp_path / "run"), "shop"))
        line = str(published.value)
        assert line.startswith("dbt-defer: nothing published: ") and "has credentials in the URI" in line
        assert "\n" not in line and "SECRETKEY" not in line and "wJalrXUt" not in line


def test_fetch_json_holds_no_hash_of_a_uri_with_its_secrets(tmp_path, clean_env):
    """Issue 22 (10): fetch.json kept sha256 of the URI with its password (a wordlist recovers it);
    it hashes only the redacted form."""
    import hashlib

    root = tmp_path / "www"
    write_manifest(root / "prod")
    write_run_results(root / "prod")
    server = Server(root)
    try:
        host = server.url.split("://", 1)[1]
        state = f"http://reader:SecretPW5@{host}/prod?token=T0KENsecret#Frag5ecret"
        result = remote.fetch(spec(state), str(tmp_path / "target"))
    finally:
        server.stop()
    text = (Path(result.local).parent / "fetch.json").read_text()
    raw_forms = {state, store.manifest_uri(state), state.split("#")[0], store.manifest_uri(state.split("#")[0])}
    for raw in raw_forms:
        assert hashlib.sha256(raw.encode()).hexdigest() not in text, raw
    for secret in ("SecretPW5", "T0KENsecret", "Frag5ecret"):
        assert secret not in text
    meta = json.loads(text)
    shown = redact(store.manifest_uri(state))
    assert meta["uri_sha256"] == hashlib.sha256(shown.encode()).hexdigest()
    # the copy is still recognised as this state's: unchanged on the next fetch
    server = Server(root)
    try:
        state = state.replace(host, server.url.split("://", 1)[1])
        assert remote.fetch(spec(state), str(tmp_path / "target2")).action == "downloaded"
        assert remote.fetch(spec(state), str(tmp_path / "target2")).action == "unchanged"
    finally:
        server.stop()


# --- run results: only a clean not-found means "none" (issue 22, item 7) ------------------------


class BrokenResultsHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; run_results.json answers ``status`` (500, 403) while ``broken`` is set."""

    broken: Dict[str, int] = {}

    def log_message(self, *args):
        pass

    def send_head(self):
        code = self.broken.get("status")
        if code and self.path.endswith("/run_results.json"):
            self.send_error(code)
            return None
        return super().send_head()


@pytest.mark.parametrize("status", [500, 403])
def test_an_unreadable_run_results_is_not_absent_and_the_old_pair_is_kept(tmp_path, clean_env, status):
    """prod's run_results records orders as failed; later its run_results.json cannot be read
    (a server error, denied). Reading on without it would defer to the failed node: the fetch
    fails and the cached pair (with the failure) stays, with one warning naming run_results.json."""
    root = tmp_path / "www"
    write_manifest(root / "prod")
    write_run_results(root / "prod", status="error")
    broken: Dict[str, int] = {}
    httpd, url = _serve(type("H", (BrokenResultsHandler,), {"broken": broken}), root)
    target = str(tmp_path / "target")
    try:
        first = remote.fetch(spec(f"{url}/prod"), target)
        assert first.action == "downloaded" and first.run_results
        write_manifest(root / "prod", generated_at="2024-02-01T00:00:00Z", extra_node=True)
        broken["status"] = status
        warnings: List[str] = []
        second = remote.fetch(spec(f"{url}/prod"), target, warn=warnings.append)
    finally:
        _stop(httpd)
    assert second.action == "cached (unreachable)" and second.local == first.local
    [line] = warnings
    one_line(line)
    assert f"{url}/prod/run_results.json" in line and str(status) in line
    results = json.loads((Path(second.local) / "run_results.json").read_text())
    assert results["results"][0]["status"] == "error"
    assert "model.shop.customers" not in (Path(second.local) / "manifest.json").read_text()


def _published_store(tmp_path):
    from test_publish import publish_folder

    store_uri = f"file://{tmp_path}/published/prod"
    v1 = write_artifacts(tmp_path / "run1")
    publish_folder(store_uri, tmp_path / "run1")
    target = str(tmp_path / "target")
    assert cached_pair(remote.fetch(spec(store_uri), target).local) == (v1, v1)
    v2 = write_artifacts(tmp_path / "run2", statuses={"model.shop.orders": "error"})
    result = publish_folder(store_uri, tmp_path / "run2")
    return store_uri, target, v1, v2, tmp_path / "published" / "prod" / "versions" / result.version


def test_run_results_the_pointer_lists_are_never_optional(tmp_path, clean_env):
    store_uri, target, v1, _, version = _published_store(tmp_path)
    (version / "run_results.json").unlink()
    warnings: List[str] = []
    result = remote.fetch(spec(store_uri), target, warn=warnings.append)
    assert result.action == "cached (unreachable)" and cached_pair(result.local) == (v1, v1)
    [line] = warnings
    assert "run_results.json (not found, though latest.json lists it)" in one_line(line)
    with pytest.raises(ManifestError) as err:  # and with no cached copy: one line, nothing half-cached
        remote.fetch(spec(store_uri), str(tmp_path / "empty-target"))
    assert "lists it" in one_line(str(err.value))


@pytest.mark.parametrize("name", ["manifest.json", "run_results.json"])
def test_a_published_file_that_does_not_match_its_sha256_is_refused(tmp_path, clean_env, name):
    store_uri, target, v1, _, version = _published_store(tmp_path)
    other = write_artifacts(tmp_path / "other")  # valid artifacts, but not what was published
    data = json.loads((tmp_path / "other" / name).read_text())
    data["metadata"]["invocation_id"] = json.loads((version / name).read_text())["metadata"]["invocation_id"]
    (version / name).write_text(json.dumps(data))
    assert other
    with pytest.raises(ManifestError) as err:
        remote.fetch(spec(store_uri), target)
    text = one_line(str(err.value))
    assert f"{store_uri}/versions/{version.name}/{name} does not match the sha256" in text
    assert "the cached copy was kept" in text
    assert cached_pair(state_cache.cached_folder(target, "prod")) == (v1, v1)


# --- signed URLs: the query string stays at the end --------------------------------------------


class GatedHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a file only when ``_allowed()`` says so (it sends the error itself otherwise)."""

    def log_message(self, *args):
        pass

    def _allowed(self) -> bool:
        raise NotImplementedError

    def do_HEAD(self):
        if self._allowed():
            super().do_HEAD()

    def do_GET(self):
        if self._allowed():
            super().do_GET()


class TokenHandler(GatedHandler):
    token = "T0KENsecret"
    seen: List[str] = []

    def log_message(self, *args):
        pass

    def _allowed(self) -> bool:
        self.seen.append(self.path)
        if not self.path.endswith(f"?token={self.token}"):
            self.send_error(403, "signature does not match")
            return False
        return True



def test_signed_url_keeps_its_query_string_at_the_end(tmp_path, clean_env):
    root = tmp_path / "www"
    write_manifest(root / "prod")
    write_run_results(root / "prod", status="error")
    TokenHandler.seen = []
    httpd, url = _serve(TokenHandler, root)
    try:
        target = str(tmp_path / "target")
        result = remote.fetch(spec(f"{url}/prod?token={TokenHandler.token}"), target)
    finally:
        _stop(httpd)
    assert result.action == "downloaded" and result.run_results
    asked = {p.split("?")[0] for p in TokenHandler.seen}
    assert asked == {"/prod/manifest.json", "/prod/run_results.json"}, TokenHandler.seen
    assert all(p.endswith(f"?token={TokenHandler.token}") for p in TokenHandler.seen)
    assert json.loads((Path(result.local) / "run_results.json").read_text())["results"][0]["status"] == "error"
    # the token is in no file of the cache and in no field of the result
    for path in Path(target).rglob("*"):
        if path.is_file():
            assert TokenHandler.token not in path.read_text(errors="replace"), path
    assert TokenHandler.token not in result.uri and result.uri.endswith("/prod/manifest.json?***")


# --- size limit --------------------------------------------------------------------------------

_BOMB: Dict[str, bytes] = {}


def gzip_bomb() -> bytes:
    """About 1 MB of gzip that inflates to 1 GiB of spaces."""
    if "data" not in _BOMB:
        packer = zlib.compressobj(9, zlib.DEFLATED, 31)
        block = b" " * (1 << 20)
        _BOMB["data"] = b"".join([packer.compress(block) for _ in range(1024)] + [packer.flush()])
    return _BOMB["data"]


def bomb_server(root: Path, bomb_file: str):
    stamp = formatdate(time.time() - 60, usegmt=True)
    body = gzip_bomb()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _bomb_headers(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Last-Modified", stamp)
            self.end_headers()

        def do_HEAD(self):
            if self.path.endswith(bomb_file):
                return self._bomb_headers()
            super().do_HEAD()

        def do_GET(self):
            if self.path.endswith(bomb_file):
                self._bomb_headers()
                try:
                    self.wfile.write(body)
                except OSError:
                    pass
                return
            super().do_GET()

    return _serve(Handler, root)


@pytest.mark.parametrize("bomb_file", ["manifest.json", "run_results.json"])
def test_a_gzip_bomb_stops_at_the_size_limit(tmp_path, clean_env, bomb_file):
    root = tmp_path / "www"
    write_manifest(root / "prod")
    write_run_results(root / "prod")
    assert len(gzip_bomb()) < 2 * 1024 * 1024
    clean_env.setenv(MAX_STATE_ENV, "16")
    httpd, url = bomb_server(root, bomb_file)
    target = tmp_path / "target"
    try:
        started = time.monotonic()
        with pytest.raises(ManifestError) as err:
            remote.fetch(spec(f"{url}/prod"), str(target))
        elapsed = time.monotonic() - started
    finally:
        _stop(httpd)
    text = one_line(str(err.value))
    assert f"{url}/prod/{bomb_file} is larger than 16 MB" in text
    assert MAX_STATE_ENV in text and "nothing was cached" in text
    assert elapsed < 20, elapsed
    # nothing of it stays in the cache: no version, no scratch folder, nothing near the limit
    files = [p for p in target.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 1024 * 1024, files
    assert state_cache.cached_folder(str(target), "prod") is None


@pytest.mark.parametrize("value", ["0", "-5", "abc", "1.5", "nan"])
def test_max_state_mb_must_be_a_whole_number(tmp_path, clean_env, value):
    write_manifest(tmp_path / "prod")
    clean_env.setenv(MAX_STATE_ENV, value)
    with pytest.raises(ManifestError) as err:
        remote.fetch(spec(f"file://{tmp_path / 'prod'}"), str(tmp_path / "target"))
    text = one_line(str(err.value))
    assert MAX_STATE_ENV in text and repr(value) in text and "whole number of megabytes" in text


# --- the fetch deadline ------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "-1", "abc", "nan", "inf", ""])
def test_fetch_timeout_values(tmp_path, clean_env, value):
    write_manifest(tmp_path / "prod")
    clean_env.setenv(TIMEOUT_ENV, value)
    env = spec(f"file://{tmp_path / 'prod'}")
    if value == "":  # empty: the default
        assert remote.fetch(env, str(tmp_path / "target")).action == "downloaded"
        return
    with pytest.raises(ManifestError) as err:
        remote.fetch(env, str(tmp_path / "target"))
    text = one_line(str(err.value))
    assert TIMEOUT_ENV in text and repr(value) in text and "greater than 0" in text


def dribble_server(root: Path):
    """Answers HEAD at once; a GET of a manifest sends its headers, then one byte every 0.2 s."""
    stamp = formatdate(time.time() - 60, usegmt=True)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_HEAD(self):
            super().do_HEAD()

        def do_GET(self):
            if not self.path.endswith("manifest.json"):
                return super().do_GET()
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.send_header("Last-Modified", stamp)
            self.end_headers()
            try:
                for _ in range(100000):
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass

    return _serve(Handler, root)


def test_the_timeout_is_a_total_deadline_and_is_reported_as_a_timeout(tmp_path, clean_env):
    root = tmp_path / "www"
    write_manifest(root / "prod")
    write_run_results(root / "prod")
    clean_env.setenv(TIMEOUT_ENV, "3")
    httpd, url = dribble_server(root)
    try:
        started = time.monotonic()
        with pytest.raises(ManifestError) as err:
            remote.fetch(spec(f"{url}/prod"), str(tmp_path / "target"))
        elapsed = time.monotonic() - started
    finally:
        _stop(httpd)
    text = one_line(str(err.value))
    assert "timed out after 3 s" in text and TIMEOUT_ENV in text and "not found" not in text
    assert elapsed < 6, elapsed  # 2x the setting at most (it was 11.9 s for 3 s)
    assert not list((tmp_path / "target").rglob("manifest.json"))


def test_a_server_that_never_answers_times_out_and_the_cache_serves(tmp_path, clean_env):
    folder = tmp_path / "published"
    write_manifest(folder)
    target = str(tmp_path / "target")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)  # connections complete in the kernel; nothing ever answers
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/prod"
    clean_env.setenv(TIMEOUT_ENV, "1")
    try:
        started = time.monotonic()
        with pytest.raises(ManifestError) as err:
            remote.fetch(spec(url), target)
        assert time.monotonic() - started < 2.5
        assert "timed out after 1 s" in one_line(str(err.value)) and "no cached copy" in str(err.value)
    finally:
        listener.close()


# --- long environment names ----------------------------------------------------------------------


def test_a_300_character_environment_name_has_a_bounded_cache_folder(tmp_path, clean_env):
    write_manifest(tmp_path / "prod")
    name = "e" * 300
    target = str(tmp_path / "target")
    result = remote.fetch(spec(f"file://{tmp_path / 'prod'}", name=name), target)
    assert result.action == "downloaded"
    folder = Path(state_cache.cache_dir(target, name))
    assert len(folder.name) <= state_cache.NAME_MAX and folder.name.startswith("e" * 40)
    assert state_cache.cached_folder(target, name) == result.local
    assert state_cache.cache_dir(target, name) != state_cache.cache_dir(target, "e" * 299)
    assert remote.fetch(spec(f"file://{tmp_path / 'prod'}", name=name), target).action == "unchanged"


# --- the atomic versioned cache --------------------------------------------------------------------

KILLER = """
import os, sys
from dbt_defer import remote
from dbt_defer.config import EnvironmentSpec
kill_at = int(sys.argv[3])
calls = [0]
def hook(real):
    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == kill_at:
            os._exit(9)  # a kill: no finally, no cleanup
        return real(*args, **kwargs)
    return wrapped
os.replace = hook(os.replace)
os.rename = hook(os.rename)
remote.fetch(EnvironmentSpec("prod", sys.argv[1], "DBT_DEFER_PROD_STATE"), sys.argv[2])
print("finished after", calls[0], "renames")
"""


@pytest.mark.parametrize("kill_at", [1, 2, 3])
def test_a_fetch_killed_between_renames_leaves_one_consistent_pair(tmp_path, clean_env, kill_at):
    published = tmp_path / "published"
    v1 = write_artifacts(published / "prod")
    uri = f"file://{published / 'prod'}"
    target = str(tmp_path / "target")
    assert cached_pair(remote.fetch(spec(uri), target).local) == (v1, v1)

    v2 = write_artifacts(published / "prod", statuses={"model.shop.orders": "error"}, padding=3)
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))  # this dbt_defer
    proc = subprocess.run([sys.executable, str(script), uri, target, str(kill_at)], capture_output=True, text=True,
                          env=env)
    assert proc.returncode in (0, 9), proc.stderr
    assert "Traceback" not in proc.stderr

    # the remote is gone: a deferred run reads the cache, which holds one whole pair
    shutil.move(str(published), str(tmp_path / "away"))
    warnings: List[str] = []
    fallback = remote.fetch(spec(uri), target, warn=warnings.append)
    assert fallback.action == "cached (unreachable)"
    assert cached_pair(fallback.local) in ((v1, v1), (v2, v2))

    # back again: the next fetch sweeps what the killed one left and ends on the new pair
    shutil.move(str(tmp_path / "away"), str(published))
    result = remote.fetch(spec(uri), target)
    assert cached_pair(result.local) == (v2, v2)
    root = Path(state_cache.cache_dir(target, "prod"))
    leftovers = [p.name for p in root.iterdir() if p.name.startswith((".incoming", ".fetch"))]
    assert leftovers == []
    versions = [p.name for p in root.iterdir() if p.name.startswith("v-")]
    assert 1 <= len(versions) <= 2 and result.local.endswith(tuple(versions))


def test_readers_of_the_previous_version_keep_it_while_a_new_one_arrives(tmp_path, clean_env):
    published = tmp_path / "published" / "prod"
    uri = f"file://{published}"
    target = str(tmp_path / "target")
    write_artifacts(published)
    first = remote.fetch(spec(uri), target).local
    write_artifacts(published, padding=1)
    second = remote.fetch(spec(uri), target).local
    assert first != second and os.path.isfile(os.path.join(first, "manifest.json"))  # kept one version back
    write_artifacts(published, padding=2)
    third = remote.fetch(spec(uri), target).local
    assert not os.path.exists(first) and os.path.isdir(second) and os.path.isdir(third)


# --- verify before replacing (issue 17) ------------------------------------------------------------


def other_project(folder: Path) -> None:
    path = write_manifest(folder, generated_at="2024-05-05T00:00:00Z")
    doc = json.loads(path.read_text())
    doc["metadata"]["project_name"] = "another_project"
    path.write_text(json.dumps(doc))


def not_a_manifest(folder: Path) -> None:
    (folder / "manifest.json").write_text("<html>please log in to see this page</html>")


@pytest.mark.parametrize("publish_bad", [other_project, not_a_manifest])
def test_a_bad_remote_never_replaces_the_good_cached_copy(tmp_path, clean_env, publish_bad):
    root = tmp_path / "www"
    write_manifest(root / "prod")
    server = Server(root)
    env = spec(f"{server.url}/prod")
    target = str(tmp_path / "target")
    try:
        good = chain.load_environment(env, target, "shop")
        good_text = Path(good.path).read_text()
        time.sleep(1.1)  # Last-Modified has one-second resolution
        publish_bad(root / "prod")
        with pytest.raises((ManifestError, chain.ChainError)) as err:
            chain.load_environment(env, target, "shop")
        text = one_line(str(err.value))
        assert "the cached copy was kept" in text
        assert (Path(state_cache.cached_folder(target, "prod")) / "manifest.json").read_text() == good_text
    finally:
        server.stop()
    # the remote goes down: the good copy still serves, with its age stated
    warnings: List[str] = []
    again = chain.load_environment(env, target, "shop", warn=warnings.append)
    assert again.project_name == "shop"
    assert len(warnings) == 1 and "using the cached copy" in warnings[0] and "fetched 0 min ago" in warnings[0]


# --- every fsspec URI form: one line ---------------------------------------------------------------


@pytest.mark.parametrize("uri", [
    "zip://manifest.json::file:///tmp/dbt-defer-nonexist-{u}.zip",
    "zip://::",
    "nope://bucket/prod",
    "abc://",
    "simplecache::gs://bucket/prod",
    "gs://bucket/dbt/prod",
    "hdfs://namenode/dbt/prod",
    "sftp://user:s3cretPW@127.0.0.1:1/prod",
    "file:///nonexistent-{u}/prod",
    "memory://nothing-{u}/prod",
    "http://",
    "file:///tmp/a\x00b/prod",
    "zip://prod::file://{zip}",
])
def test_every_uri_form_ends_in_one_line(tmp_path, clean_env, uri):
    clean_env.setenv(TIMEOUT_ENV, "5")
    empty_zip = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty_zip, "w") as zf:
        zf.writestr("other/readme.txt", "nothing here")
    uri = uri.format(u=uuid.uuid4().hex[:8], zip=empty_zip)
    with pytest.raises(ManifestError) as err:
        remote.fetch(spec(uri), str(tmp_path / "target"))
    text = one_line(str(err.value))
    assert text.startswith("dbt-defer: environment 'prod': ")
    assert "s3cretPW" not in text


def test_chained_zip_uris_read_the_manifest_inside(tmp_path, clean_env):
    artifacts = tmp_path / "artifacts"
    invocation = write_artifacts(artifacts)
    archive = tmp_path / "prod.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name in ("manifest.json", "run_results.json"):
            zf.write(artifacts / name, f"prod/{name}")
            zf.write(artifacts / name, name)
    for uri in (f"zip://prod::file://{archive}", f"zip://manifest.json::file://{archive}"):
        result = remote.fetch(spec(uri), str(tmp_path / "target"))
        assert result.action == "downloaded" and cached_pair(result.local) == (invocation, invocation)


def test_cli_status_with_a_broken_chained_uri_is_one_line(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "dbt_project.yml").write_text("name: shop\nversion: '1.0'\nprofile: shop\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DBT_")}
    env["DBT_DEFER_PROD_STATE"] = "zip://manifest.json::file:///tmp/nonexist.zip"
    for command in ("status", "fetch"):
        proc = subprocess.run([str(BIN / "dbt-defer"), command, "--project-dir", str(project)],
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert lines[0].startswith("dbt-defer: environment 'prod': ") and "nonexist.zip" in lines[0]


# --- secrets end to end: a real dbt run, the CLI, every file and every line ------------------------

PASSWORD = "s3cretPW"
TOKEN = "T0KENsecret"
S3_SECRET = "S3CRETKEYvalue"


class AuthHandler(GatedHandler):
    """Serves only with the right basic auth and token (so the credentials really are used)."""

    def log_message(self, *args):
        pass

    def _allowed(self) -> bool:
        expected = "Basic " + base64.b64encode(f"user:{PASSWORD}".encode()).decode()
        if self.headers.get("Authorization") != expected or not self.path.endswith(f"?token={TOKEN}"):
            self.send_error(403)
            return False
        return True



@pytest.fixture(scope="module")
def duck(tmp_path_factory):
    from conftest import built_environments
    from dbt_harness import make_project

    project = make_project(tmp_path_factory.mktemp("secrets"), "duckdb")
    built_environments(project)
    try:
        from dbt.adapters.duckdb.connections import DuckDBConnectionManager

        DuckDBConnectionManager.close_all_connections()
    except ImportError:  # pragma: no cover
        pass
    import gc

    gc.collect()
    return project


def test_no_secret_of_a_state_uri_is_written_or_printed_anywhere(duck, tmp_path):
    httpd, url = _serve(AuthHandler, duck.root)
    host = url.split("://", 1)[1]
    state = f"http://user:{PASSWORD}@{host}/prod-artifacts?token={TOKEN}"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DBT_DEFER", "DBT_STATE", "DBT_TARGET"))}
    base.update(DBT_SEND_ANONYMOUS_USAGE_STATS="false", DBT_DEFER_STAGING_STATE="staging-artifacts",
                DBT_DEFER_PROD_STATE=state, DBT_DEFER_FETCH_TIMEOUT="20")
    printed: List[str] = []

    def run(*argv: str, expect: Optional[int] = 0, **extra: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(argv), cwd=str(duck.root), env=dict(base, **extra),
                              capture_output=True, text=True, timeout=300)
        printed.append(proc.stdout + proc.stderr)
        if expect is not None:
            assert proc.returncode == expect, (argv, proc.stdout[-3000:], proc.stderr[-3000:])
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc

    dbt, cli = str(BIN / "dbt"), str(BIN / "dbt-defer")
    try:
        run(cli, "fetch")
        fetched = run(cli, "fetch", "--output", "json")
        run(cli, "status")
        status = run(cli, "status", "--output", "json")
        run(dbt, "run", "-s", "customer_report", DBT_DEFER="1")
        run(dbt, "--log-format", "json", "compile", "-s", "customer_report", DBT_DEFER="1")
    finally:
        _stop(httpd)
    prod = next(e for e in json.loads(fetched.stdout)["environments"] if e["name"] == "prod")
    assert prod["ok"] and prod["action"] in ("downloaded", "unchanged"), prod
    assert prod["state"] == f"http://***@{host}/prod-artifacts?***"
    prod = next(e for e in json.loads(status.stdout)["environments"] if e["name"] == "prod")
    assert prod["usable"] and prod["state"] == f"http://***@{host}/prod-artifacts?***"
    audit = json.loads((duck.target / "dbt_defer_audit.json").read_text())
    assert any(e["state"] == f"http://***@{host}/prod-artifacts?***" for e in audit["environments"])

    # unreachable now: warnings (text and JSON logs, the CLI) name the URI, redacted
    warned = run(cli, "fetch")
    assert "using the cached copy" in warned.stderr
    run(dbt, "--log-format", "json", "compile", "-s", "customer_report", DBT_DEFER="1")
    assert "using the cached copy" in (duck.root / "logs" / "dbt.log").read_text()
    # and error lines: no cached copy in another target path
    failed = run(cli, "fetch", "--target-path", "target-elsewhere", expect=1)
    assert "no cached copy" in failed.stderr
    run(dbt, "compile", "-s", "customer_report", "--target-path", "target-elsewhere", DBT_DEFER="1", expect=None)
    # an S3 URI with a key and secret in it (s3fs takes them for the bucket name) fails in one line
    s3 = dict(DBT_DEFER_PROD_STATE=f"s3://AKIAKEYID:{S3_SECRET}@bucket/prod",
              AWS_ENDPOINT_URL=f"http://127.0.0.1:{_free_port()}", AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="y",
              DBT_DEFER_FETCH_TIMEOUT="10")
    run(cli, "status", "--target-path", "target-s3", expect=1, **s3)
    run(cli, "fetch", "--target-path", "target-s3", expect=1, **s3)
    run(dbt, "compile", "-s", "customer_report", "--target-path", "target-s3", DBT_DEFER="1", expect=None, **s3)

    for secret in (PASSWORD, TOKEN, S3_SECRET):
        for text in printed:
            assert secret not in text, text[-2000:]
        for path in duck.root.rglob("*"):
            if path.is_file() and path.suffix not in (".duckdb", ".wal", ".msgpack"):
                assert secret not in path.read_text(errors="replace"), path
        for path in duck.root.rglob("*.msgpack"):
            assert secret.encode() not in path.read_bytes(), path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
