"""Build the Cython extensions in ext/ into kernel/_ext/.

All metadata lives in pyproject.toml; this file only declares extensions.
AIOS_CYTHON_DEBUG=1 builds with line tracing and an annotated HTML report.
"""

import os
import shutil
import sys
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

ROOT = Path(__file__).resolve().parent
DEBUG = os.environ.get("AIOS_CYTHON_DEBUG", "") not in ("", "0")
# The scheduler core must compute the same floats as its Python reference:
# no fused multiply-add contraction.
ARGS = ["-ffp-contract=off"]
MODULES = ["bytes_codec", "scheduler", "rules", "rowcodec", "wire", "decision_wire", "auditscan", "infer_scan"]


def pxd_include_dir() -> str:
    """Cython looks up the .pxd of `kernel._ext.x` as kernel/_ext/x.pxd on its include path,
    not beside ext/x.pyx; mirror ext/*.pxd into that shape under build/ so each .pyx keeps
    its sibling .pxd as the one source of its declarations."""
    include = ROOT / "build" / "cython-include"
    package = include / "kernel" / "_ext"
    package.mkdir(parents=True, exist_ok=True)
    (include / "kernel" / "__init__.pxd").touch()
    (package / "__init__.pxd").touch()
    for pxd in (ROOT / "ext").glob("*.pxd"):
        shutil.copyfile(pxd, package / pxd.name)
    return str(include)


extensions = [
    Extension(f"kernel._ext.{name}", [f"ext/{name}.pyx"], include_dirs=["ext"], extra_compile_args=ARGS)
    for name in MODULES
]

# Every usable core for the .pyx -> .c step (cythonize's worker processes) and for the C compiles
# (build_ext's parallel): about half of a fresh clone's set-up for `make test` is this build (47 -> 33 s on
# 2 cores). Worker processes only where they fork (Linux): elsewhere they would re-run this file.
JOBS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
CYTHON_JOBS = JOBS if sys.platform.startswith("linux") else 0

setup(
    options={"build_ext": {"parallel": JOBS}},
    ext_modules=cythonize(
        extensions,
        nthreads=CYTHON_JOBS,
        include_path=[pxd_include_dir(), "ext"],
        annotate=DEBUG,
        compiler_directives={"language_level": "3", "linetrace": DEBUG, "embedsignature": True},
    )
)
