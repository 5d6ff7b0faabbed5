"""Copy a dataset file to node-local storage once per node, verified by size and SHA-256.

Every process of a node calls `copy_to_node`; a file lock lets the first one copy while the others wait and
then find the copy done. A marker beside the copy records the source's size, mtime and checksum, so a
requeued job on the same node (same stage folder) copies nothing.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path

from fastssl import atomic

_CHUNK = 16 << 20


class CopyError(RuntimeError):
    """The copy does not match its source."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def copy_to_node(src: str | os.PathLike, dest_dir: str | os.PathLike) -> Path:
    """The node-local copy of `src` in `dest_dir` (made if missing or stale)."""
    src = Path(src).resolve()
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    # two runs may stage different files of the same name (train.beton): name copies by their source
    tag = hashlib.sha1(str(src).encode()).hexdigest()[:8]
    dest = dest_dir / f"{tag}-{src.name}"
    marker = dest.with_name(dest.name + ".json")
    with open(dest_dir / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        st = src.stat()
        want = {"source": str(src), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        if dest.is_file() and marker.is_file() and dest.stat().st_size == st.st_size:
            if {k: v for k, v in json.loads(marker.read_text()).items() if k != "sha256"} == want:
                return dest
        with atomic.replacing(dest) as tmp:
            digest = _copy_hashing(src, tmp)
            if tmp.stat().st_size != st.st_size or sha256(tmp) != digest:
                raise CopyError(f"copying {src} to {dest_dir}: the copy differs from the source")
        atomic.write_text(marker, json.dumps({**want, "sha256": digest}))
    return dest


def _copy_hashing(src: Path, dst: Path) -> str:
    """Copy and hash the source in one read."""
    h = hashlib.sha256()
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while chunk := fi.read(_CHUNK):
            h.update(chunk)
            fo.write(chunk)
    return h.hexdigest()
