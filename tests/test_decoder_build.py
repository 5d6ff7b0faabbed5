"""The crop-aware JPEG decoder is part of the install: the set-up builds it into the package (and an
install that cannot says what is missing, in one line), a loader that asks for it never runs without it,
every run says which decode it uses, and nothing needs a writable home."""
from __future__ import annotations

import ctypes
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest

from fastssl.data import jpeg_crop, kernel_cache

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes/demo/pretrain_cpu.yaml"
# A package installed without the extension: its import fails (as it does where the file is absent)
ABSENT = "import sys; sys.modules['fastssl.data._jpeg_crop'] = None\n"


@pytest.fixture(scope="module")
def jpg_beton(demo_betons, tmp_path_factory):
    from data_prep.write_ffcv import convert

    out = tmp_path_factory.mktemp("jpg") / "train.beton"
    return convert(demo_betons.root / "train", out, write_mode="jpg", workers=1, log=lambda *a, **k: None).out


def python(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, timeout=300)


def tiny(beton, run_dir) -> list[str]:
    return [str(RECIPE), f"run_dir={run_dir}", f"data.train={beton}", "data.val=", "data.res=32",
            "batch_size=32", "epochs=1", "log.wandb=disabled", "log.progress=false", "data.num_workers=1",
            "log.recon_every_epochs=0"]


def test_setup_builds_the_decoder_into_the_package():
    spec = importlib.util.find_spec("fastssl.data._jpeg_crop")
    assert spec is not None and Path(spec.origin).parent == Path(jpeg_crop.__file__).parent
    assert jpeg_crop.AVAILABLE and jpeg_crop.PATH == spec.origin
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((64, 48, 3), 200, np.uint8)).save(buf, format="JPEG", quality=95)
    src, out = np.frombuffer(buf.getvalue(), np.uint8), np.zeros((16, 16, 3), np.uint8)
    decode = getattr(ctypes.CDLL(spec.origin), jpeg_crop.SYMBOL)
    decode.argtypes = jpeg_crop._ARGS
    # the box (y, x, h, w) = (8, 8, 32, 32) at DCT scale 1/2 -> 16 x 16
    assert decode(src.ctypes.data, src.size, 8, 8, 32, 32, 2, out.ctypes.data, 16, 16, 0) == 0
    assert np.abs(out.astype(int) - 200).max() <= 2


@pytest.mark.parametrize("cc, missing", [("fastssl-no-such-cc", "no C compiler (`fastssl-no-such-cc` not found)"),
                                         ("cc -nostdinc", "no libjpeg headers (jpeglib.h)")])
def test_an_install_that_cannot_build_the_decoder_says_what_is_missing_in_one_line(tmp_path, cc, missing):
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", tmp_path / "lib",
                        "--build-temp", tmp_path / "tmp"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "CC": cc}, timeout=120)
    assert r.returncode == 1
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: cannot build the crop-aware JPEG decoder (fastssl/data/jpeg_crop.c): ")
    assert missing in line and "apt-get install" in line and "conda install" in line


def test_pretrain_refuses_to_start_without_the_decoder(demo_betons, tmp_path):
    r = python(ABSENT + "from fastssl.pretrain import main; main()", *tiny(demo_betons.train, tmp_path / "run"))
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith(
        "error: data.crop_decode=true: the crop-aware JPEG decoder is not built (ModuleNotFoundError")
    assert "data.crop_decode=false" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()  # nothing written: it stopped before any work


LOADER = ABSENT + """
from fastssl.data import jpeg_crop, make_pretrain_loader
try:
    make_pretrain_loader(sys.argv[1], 8, 32, 1, seed=0)
    print("built")
except jpeg_crop.DecoderUnavailable:
    print("refused")
images, _ = next(iter(make_pretrain_loader(sys.argv[1], 8, 32, 1, seed=0, crop_decode=False)))
print(tuple(images.shape))
print(jpeg_crop.describe(False))
"""


def test_without_the_decoder_a_loader_decodes_full_images_only_when_asked(jpg_beton):
    r = python(LOADER, jpg_beton)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines() == ["refused", "(8, 3, 32, 32)", "full-image JPEG decode (data.crop_decode=false)"]


def test_a_run_logs_its_decode_first_and_needs_no_writable_home(jpg_beton, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.touch()  # HOME below a file: nothing can be created there, not even by root
    run_dir = tmp_path / "run"
    r = python("from fastssl.pretrain import main; main()", *tiny(jpg_beton, run_dir),
               env={"HOME": str(blocker / "home")})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines()[0] == f"data: crop-aware JPEG decode ({jpeg_crop.PATH})"
    assert json.loads((run_dir / "config.json").read_text())["data"]["crop_decode"] is True
    assert (run_dir / "log.jsonl").read_text()


def test_numba_caches_kernels_in_a_writable_place_never_home(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.touch()
    tree, tmp = tmp_path / "tree", str(tmp_path / "tmp")
    monkeypatch.setattr(numba.config, "CACHE_DIR", "")
    assert kernel_cache.cache_dir(tree, tmp) == tree
    assert kernel_cache.cache_dir(blocked / "tree", tmp) == Path(tmp) / f"fastssl-numba-{os.getuid()}"
    assert kernel_cache.cache_dir(blocked / "tree", str(blocked / "tmp")) is None  # compiled per process
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path / "chosen"))  # NUMBA_CACHE_DIR first
    assert kernel_cache.cache_dir(tree, tmp) == tmp_path / "chosen"
