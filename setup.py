"""Build the Cython extensions in ext/ into kernel/_ext/.

All metadata lives in pyproject.toml; this file only declares extensions.
AIOS_CYTHON_DEBUG=1 builds with line tracing and an annotated HTML report.
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("AIOS_CYTHON_DEBUG", "") not in ("", "0")

extensions = [
    Extension("kernel._ext.bytes_codec", ["ext/bytes_codec.pyx"], include_dirs=["ext"]),
]

setup(
    ext_modules=cythonize(
        extensions,
        include_path=["ext"],
        annotate=DEBUG,
        compiler_directives={"language_level": "3", "linetrace": DEBUG, "embedsignature": True},
    )
)
