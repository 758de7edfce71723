"""The local copy of a remote environment's state (SPEC §8): ``<target path>/dbt_defer_state/<env>/``.

Layout: version folders ``v-<time>-<random>/`` (each a verified manifest.json + run_results.json,
never modified once named) and ``fetch.json``, the one pointer naming the version in use (with
where it came from, redacted, and the remote fingerprint), replaced by one atomic rename: a
reader, or a fetch killed at any moment, sees the old pair or the new pair, never a mix.
Beside them, ``manifest.json`` and ``run_results.json`` of the version in use (``expose``): the
stable folder dbt's own ``--state`` reads for ``state:modified`` in slim CI; each is replaced by
one rename (a hard link to the version's file, else a copy), run results first.
Scratch folders of killed fetches are swept by the next fetch; the previous version is kept for
readers still on it. Owns the layout, the fingerprints that say "unchanged", sweeping, pruning
and the age of a cached copy. May not touch: the network (``store``), deciding when to fetch
(``remote``). Imports ``manifests`` and ``localfiles``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from datetime import datetime, timezone
from typing import Any, Dict, Optional, Tuple

from dbt_defer import localfiles
from dbt_defer.config import redact, uri_secrets
from dbt_defer.localfiles import remove, replace_atomically
from dbt_defer.manifests import MANIFEST, RUN_RESULTS, ManifestError, format_age, load_manifest, parse_timestamp

CACHE_DIR = "dbt_defer_state"
META = "fetch.json"  # the pointer: which version folder is in use, and where it came from
NAME_MAX = 64  # longer environment names: a prefix + a hash as the cache folder name
INCOMING = ".incoming-"
META_SCRATCH = ".fetch-"
STALE_SCRATCH_SECONDS = 3600.0
_VERSION = re.compile(r"^v-[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}$")
# info() keys that identify a version of a remote file, by store:
#   http: ETag / Last-Modified / Content-MD5; s3: ETag, LastModified; gcs: etag, md5Hash,
#   generation, updated; local and most others: mtime (+ size everywhere)
_VERSION_KEYS = (
    "ETag", "etag", "Content-MD5", "md5Hash", "Digest", "generation",
    "Last-Modified", "LastModified", "last_modified", "updated", "mtime",
)


def cache_dir(target_path: str, env_name: str) -> str:
    """The cache folder of an environment; names longer than NAME_MAX: a prefix + a hash."""
    name = env_name
    if len(name) > NAME_MAX:
        name = name[:40] + "-" + hashlib.sha256(env_name.encode("utf-8")).hexdigest()[:16]
    return os.path.join(target_path, CACHE_DIR, name)


def uri_id(uri: str) -> str:
    """What fetch.json keeps to recognise a URI: a hash of its redacted form only (SPEC §7: no
    hash of a secret; an unsalted hash of a URI with its password gives the password to a
    wordlist). URIs that differ only in credentials, query string or fragment share it; their
    fingerprints (ETag, size, ...) still tell their contents apart."""
    return hashlib.sha256(redact(uri, uri_secrets(uri)).encode("utf-8")).hexdigest()


def fingerprint(info: Dict[str, Any]) -> Dict[str, str]:
    out = {k: str(info[k]) for k in _VERSION_KEYS if info.get(k) not in (None, "")}
    if info.get("size") is not None:
        out["size"] = str(info["size"])
    return out


def trustworthy(fp: Dict[str, str]) -> bool:
    """A fingerprint with only a size cannot tell two versions apart: always download."""
    return any(k != "size" for k in fp)


def current(root: str) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """(the pointer, the version folder it names) of an environment's cache; (None, None) when
    there is no usable copy. A cache written before versioned folders is its own folder."""
    try:
        with open(os.path.join(root, META), encoding="utf-8") as fh:
            meta = json.load(fh)
    except (OSError, ValueError):
        return None, None
    if not isinstance(meta, dict):
        return None, None
    version = meta.get("version")
    if version is None:
        folder = root  # the layout before versions: manifest.json in the environment's folder
    elif isinstance(version, str) and _VERSION.match(version):
        folder = os.path.join(root, version)
    else:
        return None, None
    if not os.path.isfile(os.path.join(folder, MANIFEST)):
        return None, None
    return meta, folder


def cached_meta(target_path: str, env_name: str) -> Optional[Dict[str, Any]]:
    """What the cache holds for an environment (None when nothing usable)."""
    return current(cache_dir(target_path, env_name))[0]


def cached_folder(target_path: str, env_name: str) -> Optional[str]:
    """The folder holding an environment's cached manifest.json (+ run_results.json), if any."""
    return current(cache_dir(target_path, env_name))[1]


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _hours_since(stamp: Optional[str]) -> Optional[float]:
    when = parse_timestamp(stamp or "")
    if when is None:
        return None
    return max(0.0, (datetime.now(timezone.utc) - when).total_seconds() / 3600.0)


def age_text(meta: Dict[str, Any], folder: str) -> str:
    fetched = _hours_since(meta.get("fetched_at"))
    parts = []
    if fetched is not None:
        parts.append(f"fetched {format_age(fetched)} ago")
    try:
        generated_at = load_manifest("cache", os.path.join(folder, MANIFEST)).generated_at
    except ManifestError:
        generated_at = None
    generated = _hours_since(generated_at)
    if generated is not None:
        parts.append(f"manifest generated {format_age(generated)} ago, at {generated_at}")
    return "; ".join(parts) or "age unknown"


_SCRATCH = re.compile(r"^(?:\.incoming-|\.fetch-)(?P<pid>[^-]*)-")


def sweep(root: str) -> None:
    """Remove what killed fetches left behind: scratch folders and pointer files of processes
    that are gone (or older than an hour)."""
    localfiles.sweep(root, _SCRATCH, STALE_SCRATCH_SECONDS, 0.0)


def prune(root: str, keep: Tuple[str, ...]) -> None:
    """Version folders other than ``keep`` (the current one and the one before it, which a
    reader may still be reading)."""
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        if _VERSION.match(name) and name not in keep:
            remove(os.path.join(root, name))


def expose(root: str) -> Optional[str]:
    """Make ``root/manifest.json`` (+ ``run_results.json``) the files of the version ``fetch.json``
    names, so ``dbt ... --state <root>`` reads the version in use; returns ``root`` (None: no
    usable copy). Each file is replaced by one rename, run results first (a run results of
    another version never sits beside the new manifest afterwards; none when the version has
    none). Files already the version's own (same inode) are left alone."""
    meta, folder = current(root)
    if meta is None or folder is None:
        return None
    if folder == root:
        return root  # the layout before versions: the files are the copy itself
    sweep(root)  # a link a killed fetch left half-placed
    for name in (RUN_RESULTS, MANIFEST):
        source, stable = os.path.join(folder, name), os.path.join(root, name)
        if not os.path.isfile(source):
            remove(stable)
            continue
        try:
            if os.path.samefile(source, stable):
                continue
        except OSError:
            pass
        _link_atomically(source, stable)
    return root


def _link_atomically(source: str, path: str) -> None:
    folder = os.path.dirname(path)
    tmp = os.path.join(folder, f"{META_SCRATCH}{os.getpid()}-{os.urandom(6).hex()}.json")
    try:
        try:
            os.link(source, tmp)
        except OSError:  # a file system without hard links: a copy
            shutil.copyfile(source, tmp)
        os.replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise


def write_meta(root: str, meta: Dict[str, Any]) -> None:
    """Replace the pointer in one atomic rename: this is the moment a new version is in use."""
    data = (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode("utf-8")
    replace_atomically(os.path.join(root, META), data,
                       lambda: f"{META_SCRATCH}{os.getpid()}-{os.urandom(6).hex()}.json", durable=True)


def new_version() -> str:
    """The name of a new version folder."""
    return f"v-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{os.urandom(4).hex()}"
