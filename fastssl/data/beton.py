"""Recognising an ffcv ``.beton`` by its header, before ffcv opens it.

ffcv's files have no magic number: its reader takes the first bytes of any file as a header and
stops on an ``AssertionError: file format mismatch`` (or worse, a bad allocation) when they are
not one. :func:`what_is_wrong` reads the fixed-size header (ffcv's ``HeaderType``, written out here
so that the check needs neither ffcv nor numba) and, for a file that is not a .beton, says what it
looks like instead.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

FORMAT_VERSION = 2  # ffcv 1.0's CURRENT_VERSION
_HEADER = np.dtype([("version", "<u2"), ("num_fields", "<u2"), ("page_size", "<u4"),
                    ("num_samples", "<u8"), ("alloc_table_ptr", "<u8")], align=True)
_MIN_PAGE = 2**21  # ffcv's MIN_PAGE_SIZE
_SIGNATURES = {b"PK\x03\x04": "a zip archive (a torch checkpoint?)", b"\xff\xd8\xff": "a JPEG image",
               b"\x89PNG": "a PNG image", b"\x80": "a Python pickle (a torch checkpoint?)"}


def what_is_wrong(path: str | os.PathLike) -> str | None:
    """None if ``path`` starts with a plausible ffcv header; else what the file is instead."""
    what = _what(Path(path))
    if what is None or what.startswith("an ffcv"):
        return what
    return f"{what}, not an ffcv .beton (data_prep/write_ffcv.py writes one)"


def _what(path: Path) -> str | None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(512)
    if len(head) >= _HEADER.itemsize:
        h = np.frombuffer(head[:_HEADER.itemsize], _HEADER)[0]
        sane = (h["num_fields"] > 0 and h["page_size"] >= _MIN_PAGE and h["page_size"] & (h["page_size"] - 1) == 0
                and h["num_samples"] > 0 and _HEADER.itemsize < h["alloc_table_ptr"] <= size)
        if sane and h["version"] == FORMAT_VERSION:
            return None
        if sane:
            return f"an ffcv .beton of format version {h['version']}; this ffcv reads version {FORMAT_VERSION}"
    if not head:
        return "an empty file"
    for signature, what in _SIGNATURES.items():
        if head.startswith(signature):
            return what
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "a binary file of unknown format"
    return "a text file" + (" (the class list beside a .beton)" if path.name.endswith(".classes.txt") else "")
