"""Listing labelled images on disk: ImageFolder trees and flat ImageNet val folders.

Class index = position in the sorted list of class folder names (torchvision's ImageFolder rule),
unless a class list is given (``classes=``), which is how a val set gets the indices of its train set.
Flat val folders take their labels from the ImageNet devkit ground truth or Kaggle's
``LOC_val_solution.csv``; see :func:`read_labels_file`.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

# torchvision's IMG_EXTENSIONS: files with other suffixes are listed as skipped, not decoded.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# ffcv stores width and height as uint16.
MAX_SIDE = 65535


class DatasetError(ValueError):
    """A problem with the user's input; its message is one line, fit for ``error: ...``."""


@dataclass
class Listing:
    samples: list[tuple[str, int]]  # (path, label), sorted by (label, path)
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def load_rgb(path: str, exif_transpose: bool = False) -> Image.Image:
    """Fully decoded RGB image. Raises on truncated or unreadable files. The pixels as stored, unless
    ``exif_transpose``: then turned upright by the EXIF Orientation tag, as a photo viewer shows them."""
    with Image.open(path) as im:
        return (ImageOps.exif_transpose(im) if exif_transpose else im).convert("RGB")


def open_checked(path: str, max_res: int | None = None,
                 exif_transpose: bool = False) -> tuple[Image.Image | None, str | None]:
    """(the fully decoded RGB image, None) if ``path`` can be written, else (None, a short reason).

    Decodes the whole file (:func:`load_rgb`): ``Image.verify`` alone misses truncated JPEGs.
    """
    try:
        im = load_rgb(path, exif_transpose)
    except UnidentifiedImageError:
        return None, "not a readable image"
    except Exception as e:  # noqa: BLE001 -- any decoder failure means "skip this file"
        return None, f"{type(e).__name__}: {e}"
    if max_res is None and max(im.size) > MAX_SIDE:
        return None, f"{im.size[0]}x{im.size[1]} exceeds ffcv's {MAX_SIDE}px limit (set --max-res)"
    return im, None


def _name_reason(path: str) -> str:
    return f"not an image file name ({Path(path).suffix or 'no suffix'})"


def _files_under(folder: str) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        found.extend(os.path.join(root, f) for f in sorted(files))
    return found


def _check_subset(names: list[str], classes: list[str], what: str) -> None:
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise DatasetError(f"{len(unknown)} {what} not in the class list (e.g. {unknown[0]!r})")


def list_class_folders(src: str | os.PathLike, classes: list[str] | None = None) -> Listing:
    """``src/<class>/**/<image>``; files directly in ``src`` are skipped."""
    src = str(src)
    entries = sorted(os.scandir(src), key=lambda e: e.name)
    folders = [e.name for e in entries if e.is_dir()]
    if not folders:
        raise DatasetError(f"{src}: no class folders (a flat folder of images needs --labels-file)")
    if classes is None:
        classes = folders
    _check_subset(folders, classes, "class folders")
    index = {c: i for i, c in enumerate(classes)}
    skipped = [(e.path, "not in a class folder") for e in entries if not e.is_dir()]
    samples = []
    for name in folders:
        for path in _files_under(os.path.join(src, name)):
            if is_image_name(path):
                samples.append((path, index[name]))
            else:
                skipped.append((path, _name_reason(path)))
    samples.sort(key=lambda s: (s[1], s[0]))
    return Listing(samples, list(classes), skipped)


def read_synsets(path: str | os.PathLike) -> dict[int, str]:
    """ILSVRC2012 ID -> wnid, from the devkit's ``meta.mat`` or a text file.

    Text: ``<id> <wnid>`` per line, or one wnid per line in ID order (line 1 = ID 1). A *sorted* wnid
    list (e.g. Kaggle's LOC_synset_mapping.txt) is refused: the devkit IDs are not in wnid order, so
    reading it as an ID list would silently mislabel almost every image.
    """
    path = Path(path)
    if path.suffix == ".mat":
        from scipy.io import loadmat

        syn = loadmat(str(path), squeeze_me=True)["synsets"]
        return {int(i): str(w) for i, w in zip(syn["ILSVRC2012_ID"], syn["WNID"])}
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    if rows and all(r[0].isdigit() and len(r) >= 2 for r in rows):
        return {int(r[0]): r[1] for r in rows}
    wnids = [r[0] for r in rows]
    if len(wnids) > 1 and wnids == sorted(wnids):
        raise DatasetError(f"--synsets {path}: a sorted wnid list is not the devkit ID order "
                           "(use meta.mat or '<id> <wnid>' lines)")
    return {i + 1: w for i, w in enumerate(wnids)}


def read_labels_file(labels_file: str | os.PathLike, filenames: list[str],
                     synsets: str | os.PathLike | None = None) -> dict[str, str]:
    """Class name (wnid) for each of ``filenames`` (sorted, no directory) of a flat val folder.

    ``*.csv``: Kaggle's ``ImageId,PredictionString`` (the first token of PredictionString is the
    wnid; ImageId is the file name without suffix). Anything else: the devkit's
    ``ILSVRC2012_validation_ground_truth.txt`` (one 1-based ILSVRC2012 ID per line, in sorted file name
    order), which needs ``synsets`` (see :func:`read_synsets`).
    """
    labels_file = Path(labels_file)
    if not labels_file.is_file():
        raise DatasetError(f"--labels-file {labels_file}: no such file")
    if labels_file.suffix.lower() == ".csv":
        with open(labels_file, newline="") as f:
            reader = csv.DictReader(f)
            if not {"ImageId", "PredictionString"} <= set(reader.fieldnames or []):
                raise DatasetError(f"--labels-file {labels_file}: expected columns ImageId,PredictionString")
            by_id = {row["ImageId"]: row["PredictionString"].split()[0] for row in reader}
        missing = [n for n in filenames if Path(n).stem not in by_id]
        if missing:
            raise DatasetError(f"--labels-file {labels_file}: no label for {len(missing)} of "
                               f"{len(filenames)} images (e.g. {missing[0]})")
        return {n: by_id[Path(n).stem] for n in filenames}
    if synsets is None:
        raise DatasetError(f"--labels-file {labels_file}: devkit ground truth needs --synsets "
                           "(meta.mat or an ID->wnid list)")
    try:
        ids = [int(line) for line in labels_file.read_text().split()]
    except ValueError:
        raise DatasetError(f"--labels-file {labels_file}: expected one integer class ID per line") from None
    if len(ids) != len(filenames):
        raise DatasetError(f"--labels-file {labels_file}: {len(ids)} labels for {len(filenames)} images")
    id_to_wnid = read_synsets(synsets)
    unknown = sorted(set(ids) - set(id_to_wnid))
    if unknown:
        raise DatasetError(f"--synsets {synsets}: no wnid for ILSVRC ID {unknown[0]}")
    return {n: id_to_wnid[i] for n, i in zip(filenames, ids)}


def list_flat(src: str | os.PathLike, labels_file: str | os.PathLike, classes: list[str] | None = None,
              synsets: str | os.PathLike | None = None) -> Listing:
    """Images directly in ``src``, labelled by ``labels_file``. Without ``classes`` the class list is
    the sorted set of labels found, which matches the train indices only if every class occurs."""
    src = str(src)
    entries = sorted(os.scandir(src), key=lambda e: e.name)
    if any(e.is_dir() for e in entries):
        raise DatasetError(f"{src}: has subfolders; --labels-file is for a flat folder of images")
    names = [e.name for e in entries if is_image_name(e.name)]
    if not names:
        raise DatasetError(f"{src}: no image files")
    wnid = read_labels_file(labels_file, names, synsets)
    if classes is None:
        classes = sorted(set(wnid.values()))
    _check_subset(list(wnid.values()), classes, "labels")
    index = {c: i for i, c in enumerate(classes)}
    samples = sorted(((os.path.join(src, n), index[wnid[n]]) for n in names), key=lambda s: (s[1], s[0]))
    skipped = [(e.path, _name_reason(e.path)) for e in entries if not is_image_name(e.name)]
    return Listing(samples, list(classes), skipped)
