"""The class list that travels beside each ``.beton``: ``NAME.classes.txt``, one class name a line.

Line i names the class whose integer label is i, so val and train sets (and the linear probe's head)
agree on what an index means.
"""
from __future__ import annotations

import os
from pathlib import Path

from fastssl import atomic


def classes_path(beton_path: str | os.PathLike) -> Path:
    """``/x/in1k_train.beton`` -> ``/x/in1k_train.classes.txt``."""
    p = Path(beton_path)
    return p.with_name(p.stem + ".classes.txt")


def read_class_file(path: str | os.PathLike) -> list[str]:
    names = [line.strip() for line in Path(path).read_text().splitlines()]
    return [n for n in names if n]


def read_classes(beton_path: str | os.PathLike) -> list[str]:
    """Class names of a converted dataset, index order. Raises FileNotFoundError if the list is missing."""
    return read_class_file(classes_path(beton_path))


def num_classes(beton_path: str | os.PathLike) -> int:
    return len(read_classes(beton_path))


def write_classes(path: str | os.PathLike, names: list[str]) -> None:
    """Atomic write: a reader never sees a half-written list."""
    atomic.write_text(path, "".join(f"{n}\n" for n in names))
