"""data_prep/write_ffcv.py: round trip, skipped files, atomic output, flat val labels, CLI errors."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import read_beton
from PIL import Image

from data_prep import write_ffcv
from data_prep.write_ffcv import convert
from fastssl.data import num_classes, read_classes
from fastssl.data.imagefolder import DatasetError, read_synsets

REPO = Path(__file__).resolve().parents[1]
QUIET = dict(workers=1, log=lambda *a, **k: None)


def _jpeg(path: Path, seed: int, size=(20, 16)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path, quality=95)


def _pixel_keys(beton: Path) -> dict[bytes, int]:
    images, labels = read_beton(beton)
    return {img.tobytes(): int(lab) for img, lab in zip(images, labels)}


def test_round_trip_matches_folders(demo_betons):
    files = sorted((demo_betons.root / "train").glob("*/*.jpg"), key=lambda p: (int(p.parent.name), str(p)))
    images, labels = read_beton(demo_betons.train)
    assert read_classes(demo_betons.train) == [str(d) for d in range(10)]
    assert num_classes(demo_betons.val) == 10
    assert len(labels) == len(files) == 100
    assert labels.tolist() == [int(p.parent.name) for p in files]
    # raw mode at the source size stores exactly the decoded JPEG: order and content both checked
    for i in (0, 57, 99):
        assert np.array_equal(images[i], np.asarray(Image.open(files[i]).convert("RGB")))


def test_skips_corrupt_and_non_image_files(tmp_path):
    src = tmp_path / "src"
    for i in range(3):
        _jpeg(src / "cat" / f"{i}.jpg", i)
        _jpeg(src / "dog" / f"{i}.JPEG", 10 + i)
    good = (src / "dog" / "0.JPEG").read_bytes()
    (src / "cat" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (src / "dog" / "text.jpg").write_text("this is not a JPEG")
    (src / "dog" / "notes.txt").write_text("hello")

    summary = convert(src, tmp_path / "out.beton", **{**QUIET, "workers": 2})

    reasons = {Path(p).name: r for p, r in summary.skipped}
    assert set(reasons) == {"truncated.jpg", "text.jpg", "notes.txt"}
    assert "truncated" in reasons["truncated.jpg"].lower()
    assert reasons["text.jpg"] == "not a readable image"
    assert reasons["notes.txt"].startswith("not an image file name")
    _, labels = read_beton(summary.out, with_images=False)
    assert summary.images == 6 and labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert "truncated.jpg" in summary.format() and "notes.txt" in summary.format()


def test_a_file_failing_in_a_rewrite_is_skipped_too(demo_betons, tmp_path, monkeypatch):
    # files that fail while writing are dropped and the output rewritten, until a pass is clean:
    # a second failure (say, a file changed on disk meanwhile) must not stay in as a placeholder
    real, calls = write_ffcv._write_beton, []

    def flaky(path, samples, *args):
        calls.append([p for p, _ in samples])
        failed = real(path, samples, *args)
        return failed or ([0] if len(calls) < 3 else [])  # the first file of passes 1 and 2 "fails"

    monkeypatch.setattr(write_ffcv, "_write_beton", flaky)
    summary = convert(demo_betons.root / "val", tmp_path / "o.beton", **QUIET)
    assert len(calls) == 3 and [len(c) for c in calls] == [20, 19, 18]
    assert [p for p, _ in summary.skipped] == [calls[0][0], calls[1][0]]
    assert all(r == "failed while writing" for _, r in summary.skipped)  # both files read fine now
    _, labels = read_beton(summary.out, with_images=False)
    assert summary.images == labels.size == 18


def test_refuses_to_overwrite_without_force(demo_betons, tmp_path):
    out = tmp_path / "x.beton"
    out.write_bytes(b"precious")
    with pytest.raises(DatasetError, match="exists"):
        convert(demo_betons.root / "val", out, **QUIET)
    assert out.read_bytes() == b"precious"
    convert(demo_betons.root / "val", out, force=True, **QUIET)
    assert read_beton(out, with_images=False)[1].size == 20


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failed_write_leaves_no_output(demo_betons, tmp_path, monkeypatch, error):
    def half_write(path, *args):
        Path(path).write_bytes(b"half a beton")
        raise error("boom")

    monkeypatch.setattr(write_ffcv, "_write_beton", half_write)
    out = tmp_path / "x.beton"
    with pytest.raises(error):
        convert(demo_betons.root / "val", out, **QUIET)
    assert list(tmp_path.iterdir()) == []

    out.write_bytes(b"old")  # --force onto an existing file: a failure keeps the old one
    with pytest.raises(error):
        convert(demo_betons.root / "val", out, force=True, **QUIET)
    assert [p.name for p in tmp_path.iterdir()] == ["x.beton"] and out.read_bytes() == b"old"


def _flat_val(demo_betons, tmp_path, keep=lambda c: True) -> tuple[Path, list[tuple[str, str]]]:
    """Copy the demo val images into one folder named like ImageNet's; return it and (stem, class)."""
    flat = tmp_path / "flat"
    flat.mkdir()
    rows = []
    files = sorted((demo_betons.root / "val").glob("*/*.jpg"), key=lambda p: p.name)
    for n, f in enumerate(p for p in files if keep(p.parent.name)):
        stem = f"ILSVRC2012_val_{n + 1:08d}"
        shutil.copy(f, flat / f"{stem}.JPEG")
        rows.append((stem, f.parent.name))
    return flat, rows


def test_flat_val_kaggle_csv_maps_to_train_indices(demo_betons, tmp_path):
    flat, rows = _flat_val(demo_betons, tmp_path, keep=lambda c: c != "0")  # class 0 absent
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text("ImageId,PredictionString\n"
                   + "".join(f"{stem},{c} 1 2 30 40 {c} 5 6 7 8\n" for stem, c in reversed(rows)))
    out = convert(flat, tmp_path / "v.beton", labels_file=csv, classes_from=demo_betons.train, **QUIET).out
    flat_keys = _pixel_keys(out)
    folder_keys = _pixel_keys(demo_betons.val)
    assert len(flat_keys) == 18 and all(folder_keys[k] == v for k, v in flat_keys.items())
    assert read_classes(out) == read_classes(demo_betons.train)


def test_flat_val_devkit_ground_truth_with_synsets(demo_betons, tmp_path):
    flat, rows = _flat_val(demo_betons, tmp_path)
    # ILSVRC IDs deliberately differ from class order: ID k names class (3k mod 10).
    synsets = tmp_path / "synsets.txt"
    synsets.write_text("".join(f"{k} {3 * k % 10}\n" for k in range(1, 11)))
    id_of = {str(3 * k % 10): k for k in range(1, 11)}
    gt = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    gt.write_text("".join(f"{id_of[c]}\n" for _, c in rows))
    out = convert(flat, tmp_path / "v.beton", labels_file=gt, synsets=synsets,
                  classes_from=demo_betons.train.with_name("train.classes.txt"), **QUIET).out
    assert _pixel_keys(out) == _pixel_keys(demo_betons.val)

    gt.write_text("1\n2\n")
    with pytest.raises(DatasetError, match="2 labels for 20 images"):
        convert(flat, tmp_path / "w.beton", labels_file=gt, synsets=synsets, **QUIET)


def test_sorted_wnid_list_is_not_taken_for_devkit_ids(tmp_path):
    f = tmp_path / "LOC_synset_mapping.txt"
    f.write_text("n01440764 tench\nn01443537 goldfish\nn01484850 great white shark\n")
    with pytest.raises(DatasetError, match="sorted wnid list"):
        read_synsets(f)
    f.write_text("n02119789\nn02100735\n")  # devkit order: ID 1 = kit fox
    assert read_synsets(f) == {1: "n02119789", 2: "n02100735"}


def test_empty_class_folder_keeps_its_index(tmp_path):
    src = tmp_path / "src"
    _jpeg(src / "a" / "1.jpg", 1)
    (src / "b").mkdir()
    _jpeg(src / "c" / "1.jpg", 2)
    logged = []
    summary = convert(src, tmp_path / "o.beton", **{**QUIET, "log": logged.append})
    assert read_classes(summary.out) == ["a", "b", "c"]
    assert read_beton(summary.out, with_images=False)[1].tolist() == [0, 2]
    assert any("'b' (index 1) has no images" in w for w in summary.warnings)
    assert any("'b'" in line for line in logged)


def test_preset_then_explicit_flags():
    o = write_ffcv.resolve_options("ffcv-imagenet", jpeg_quality=95)
    assert (o.write_mode, o.compress_prob, o.max_res, o.jpeg_quality) == ("proportion", 0.5, 500, 95)
    assert write_ffcv.resolve_options(compress_prob=0.3).write_mode == "proportion"
    assert write_ffcv.resolve_options().write_mode == "raw"  # eval sets: no JPEG loss unless asked
    assert write_ffcv.resolve_options(max_res=0).max_res is None


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "data_prep" / "write_ffcv.py"), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=60)


@pytest.mark.parametrize("args, message", [
    ("--src {val} --jpeg-quality 150", "error: --jpeg-quality 150: must be in 1..100"),
    ("--src {val} --jpeg-quality high", "error: argument --jpeg-quality: invalid int value: 'high'"),
    ("--src {val} --preset nope", "error: --preset nope: unknown (choose from dailymae, ffcv-imagenet)"),
    ("--src {val} --compress-prob 2", "error: --compress-prob 2.0: must be in 0..1"),
    ("--src /nonexistent/x", "error: --src /nonexistent/x: no such folder"),
    ("--src {empty}", "error: {empty}: no class folders (a flat folder of images needs --labels-file)"),
    ("--src {flat} --labels-file {gt} --synsets {gt}",
     "error: --labels-file {gt}: expected one integer class ID per line"),
])
def test_cli_bad_input_exits_2_with_one_line(demo_betons, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "gt.txt").write_text("not numbers\n")
    flat, _ = _flat_val(demo_betons, tmp_path)
    paths = dict(val=demo_betons.root / "val", empty=tmp_path / "empty", flat=flat, gt=tmp_path / "gt.txt")
    out = tmp_path / "o.beton"
    r = _cli("--out", str(out), *args.format(**paths).split())
    assert r.returncode == 2
    assert r.stderr.strip() == message.format(**paths)
    assert not out.exists() and r.stdout == ""


def test_cli_converts_and_prints_summary(demo_betons, tmp_path):
    out = tmp_path / "o.beton"
    r = _cli("--src", str(demo_betons.root / "val"), "--out", str(out), "--workers", "1", "--limit", "10",
             "--preset", "dailymae")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"wrote {out}: 10 images, 10 classes")
    assert read_beton(out, with_images=False)[1].tolist() == list(range(10))  # --limit takes classes in turn


def _gradient_jpeg(path: Path, size: tuple[int, int], exif: Image.Exif | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ramp = np.linspace(0, 255, size[0], dtype=np.uint8)  # smooth: a small file, whatever its pixels
    Image.fromarray(np.stack([np.tile(ramp, (size[1], 1))] * 3, axis=-1)).save(path, exif=exif or Image.Exif())


def _stored_sizes(beton: Path) -> list[tuple[int, int]]:
    from ffcv.reader import Reader

    meta = Reader(str(beton)).metadata["f0"]  # fields in order: image, label
    return [(int(w), int(h)) for w, h in zip(meta["width"], meta["height"])]


def test_raw_image_larger_than_ffcvs_default_page_is_written(tmp_path):
    # 2000x1500 raw pixels are 9 MB, over ffcv's 8 MiB page: its worker died and the writer waited
    # forever; the timeout is what proves there is no hang
    src, out = tmp_path / "src", tmp_path / "o.beton"
    _gradient_jpeg(src / "big" / "photo.jpg", (2000, 1500))
    _gradient_jpeg(src / "small" / "icon.jpg", (20, 16))
    r = _cli("--src", str(src), "--out", str(out), "--max-res", "0", "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert _stored_sizes(out) == [(2000, 1500), (20, 16)]


def test_page_size_follows_the_largest_stored_image(tmp_path):
    _gradient_jpeg(tmp_path / "a.jpg", (4000, 3000))
    samples = [(str(tmp_path / "a.jpg"), 0)]
    assert write_ffcv.page_size(samples, max_res=500) == 8 * 2**20  # ffcv's default holds 500x500
    assert write_ffcv.page_size(samples, max_res=2000) == 16 * 2**20  # 2000x2000x3 = 12 MB, bound
    assert write_ffcv.page_size(samples, max_res=None) == 64 * 2**20  # 36 MB, from the header


@pytest.mark.timeout(120)
def test_a_worker_that_dies_ends_the_conversion_with_an_error(tmp_path, monkeypatch):
    # any worker failure, here ffcv's own page-size error, must end the run rather than hang it
    monkeypatch.setattr(write_ffcv, "page_size", lambda *a: write_ffcv.MIN_PAGE_SIZE)
    _gradient_jpeg(tmp_path / "src" / "big" / "photo.jpg", (2000, 1500))
    with pytest.raises(DatasetError, match=r"a writer worker died \(exit code 1; .*\): nothing written"):
        convert(tmp_path / "src", tmp_path / "o.beton", max_res=0, **QUIET)
    assert not (tmp_path / "o.beton").exists() and not list(tmp_path.glob(".o.beton.*"))


def test_temp_files_of_killed_conversions_are_removed(demo_betons, tmp_path):
    # a kill -9 runs no cleanup: the next conversion of the same output removes what it left, but
    # not a temp whose process still runs (a second conversion at work)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale, live = tmp_path / f".o.beton.tmp{dead.pid}", tmp_path / f".o.beton.tmp{os.getppid()}"
    other = tmp_path / f".x.beton.tmp{dead.pid}"
    for f in (stale, live, other):
        f.write_bytes(b"half a beton")
    logged = []
    convert(demo_betons.root / "val", tmp_path / "o.beton", workers=1, log=logged.append)
    assert not stale.exists() and live.exists() and other.exists()
    assert f"removed {stale}, left by an earlier conversion that was killed" in logged


@pytest.mark.parametrize("flag, stored", [(False, (40, 20)), (True, (20, 40))])
def test_exif_orientation_is_ignored_unless_asked(tmp_path, flag, stored):
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    _gradient_jpeg(tmp_path / "src" / "c" / "phone.jpg", (40, 20), exif)
    summary = convert(tmp_path / "src", tmp_path / "o.beton", exif_transpose=flag, **QUIET)
    assert _stored_sizes(summary.out) == [stored]


@pytest.mark.parametrize("out, reason", [("/proc/x.beton", "No such file or directory"),
                                         ("/sys/x.beton", "Permission denied")])
def test_cli_unwritable_out_is_one_line(demo_betons, out, reason):
    r = _cli("--src", str(demo_betons.root / "val"), "--out", out)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == f"error: --out {out}: cannot write in {Path(out).parent} ({reason})"
