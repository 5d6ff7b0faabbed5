"""The compiled part of the package: the crop-aware JPEG decoder (``fastssl/data/jpeg_crop.c``).

Built at install time into the extension ``fastssl.data._jpeg_crop`` against libjpeg(-turbo), as ffcv
builds its ``_libffcv``; the rest of the package metadata is in pyproject.toml. Where the decoder cannot
be built the install stops with one line naming what is missing and how to get it.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SOURCE = "fastssl/data/jpeg_crop.c"
HOW = ("to get them: apt-get install build-essential libjpeg-dev python3-dev (Debian/Ubuntu), "
       "or in a conda environment: conda install -c conda-forge compilers libjpeg-turbo")


def libjpeg_dirs() -> tuple[list[str], list[str]]:
    """libjpeg's include and library directories by pkg-config (a conda environment's, a module
    system's); none where pkg-config does not know it (the compiler's default paths)."""
    try:
        r = subprocess.run(["pkg-config", "--cflags-only-I", "--libs-only-L", "libjpeg"], capture_output=True,
                           text=True)
    except OSError:
        return [], []
    flags = r.stdout.split() if r.returncode == 0 else []
    return [f[2:] for f in flags if f.startswith("-I")], [f[2:] for f in flags if f.startswith("-L")]


class BuildExt(build_ext):
    """build_ext whose failure is one line: what is missing (compiler, libjpeg or Python headers, libjpeg) and
    how to get it, found by compiling small probes with the same compiler and flags."""

    def build_extensions(self) -> None:
        try:
            super().build_extensions()
        except Exception as e:  # noqa: BLE001 -- setuptools raises several types for a failed build
            missing = self.missing(self.extensions[0])
            raise SystemExit(f"error: cannot build the crop-aware JPEG decoder ({SOURCE}): "
                             + (f"{missing}; {HOW}" if missing else f"{e}")) from None

    def missing(self, ext: Extension) -> str | None:
        cc = list(getattr(self.compiler, "compiler_so", None) or ["cc"])
        if shutil.which(cc[0]) is None:
            return f"no C compiler (`{cc[0]}` not found)"
        inc = [f"-I{d}" for d in ext.include_dirs]
        py_inc = [f"-I{d}" for d in self.include_dirs]
        lib = [f"-L{d}" for d in ext.library_dirs] + ["-ljpeg"]
        probes = [("int main(void) { return 0; }\n", ["-c"], f"the C compiler `{cc[0]}` does not work"),
                  ("#include <stdio.h>\n#include <jpeglib.h>\n", [*inc, "-c"], "no libjpeg headers (jpeglib.h)"),
                  ("#include <Python.h>\n", [*py_inc, "-c"], "no Python headers (Python.h)"),
                  ("char jpeg_std_error(void);\nint main(void) { return jpeg_std_error(); }\n", lib,
                   "no libjpeg library to link (-ljpeg)")]
        with tempfile.TemporaryDirectory() as tmp:
            for text, flags, what in probes:
                src = Path(tmp) / "probe.c"
                src.write_text(text)
                r = subprocess.run([*cc, str(src), *flags, "-o", str(Path(tmp) / "probe")], capture_output=True)
                if r.returncode != 0:
                    return what
        return None


include_dirs, library_dirs = libjpeg_dirs()
setup(
    ext_modules=[Extension(
        "fastssl.data._jpeg_crop", [SOURCE, "fastssl/data/jpeg_crop_module.c"], libraries=["jpeg", "m"],
        extra_compile_args=["-O3"], include_dirs=include_dirs, library_dirs=library_dirs,
        runtime_library_dirs=library_dirs,  # a conda libjpeg resolves without LD_LIBRARY_PATH
    )],
    cmdclass={"build_ext": BuildExt},
)
