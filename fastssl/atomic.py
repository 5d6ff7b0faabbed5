"""Files written whole or not at all: a reader (or a resumed job) never sees half a file."""
from __future__ import annotations

import contextlib
import glob
import os
import zipfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path` for the caller to write; when the block ends, fsync it, rename
    it to `path` and fsync the folder. On any error (KeyboardInterrupt included) the temp is removed
    and `path` is left as it was. A path, not a file object, so that writers that open files by
    name (torch.save, safetensors, PIL, ffcv's writer) can write into it."""
    path = Path(path)
    tmp = _temp_path(path, os.getpid())  # same folder: the rename stays atomic
    try:
        yield tmp
        _fsync(tmp)  # the data reaches the disk before the new name does
        os.replace(tmp, path)
        _fsync(path.parent)  # and the rename itself survives a crash
    finally:
        tmp.unlink(missing_ok=True)


def _temp_path(path: Path, pid: int) -> Path:
    return path.with_name(f".{path.name}.tmp{pid}")


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temp files that :func:`replacing` left beside `path` in processes that no longer
    run (kill -9, a power cut: no `finally` ran); return them. A temp whose process still runs on
    this host is kept: it may be a second writer of the same file, still at work."""
    path = Path(path)
    prefix = _temp_path(path, 0).name[:-1]
    removed = []
    for tmp in path.parent.glob(glob.escape(prefix) + "*"):
        pid = tmp.name[len(prefix):]
        if pid.isdigit() and not _running(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def why_unwritable(folder: str | os.PathLike) -> str | None:
    """Why files cannot be created in `folder`, or in the nearest existing folder above it that
    `mkdir -p` would extend; None if they can. Creates and removes a probe file there: the one test
    that holds for read-only mounts, /proc, /sys and permissions alike (os.access says yes to root)."""
    existing = Path(folder)
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    probe = existing / f".probe{os.getpid()}.tmp"
    try:
        probe.touch()
        probe.unlink()
    except OSError as e:
        return f"cannot write in {existing} ({e.strerror})"
    return None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with replacing(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def verify_archive(path: Path) -> str | None:
    """None if every record of a zip archive (torch's checkpoint format) matches the CRC-32 written
    with it, else why not: torch.load itself never checks them."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError) as e:
        return f"not a complete checkpoint archive ({e})"
    return None if bad is None else f"checksum mismatch in {bad}"
