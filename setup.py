"""Build script for skupy's C extension (skupy._core).

The extension links OpenBLAS from the scipy-openblas32 wheel by default, so a
fresh machine needs nothing but pip. Environment variables at build time:
  SKUPY_BLAS=system   link a system OpenBLAS (libopenblas) instead.
  SKUPY_NATIVE=1      compile with -march=native (faster, not portable).
  SKUPY_SANITIZE=1    build with AddressSanitizer and UndefinedBehaviorSanitizer.
  SKUPY_DEBUG=1       build with -O0 -g.
"""
import os
from glob import glob

import numpy
from setuptools import Extension, setup


def blas_settings():
    if os.environ.get("SKUPY_BLAS") == "system":
        return {"include_dirs": ["/usr/include/openblas", "/usr/include/x86_64-linux-gnu/openblas-pthread"],
                "library_dirs": [], "libraries": ["openblas"], "define_macros": [("SKUPY_SYSTEM_BLAS", "1")],
                "runtime_library_dirs": []}

    import scipy_openblas32

    return {"include_dirs": [scipy_openblas32.get_include_dir()],
            "library_dirs": [scipy_openblas32.get_lib_dir()],
            "libraries": [scipy_openblas32.get_library()],
            "define_macros": [],
            # skupy/__init__.py imports scipy_openblas32 first, which loads the
            # library by its soname, so this rpath only helps when run in place.
            "runtime_library_dirs": [scipy_openblas32.get_lib_dir()]}


def compile_flags():
    flags = ["-std=c11", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
    if os.environ.get("SKUPY_DEBUG") == "1":
        flags += ["-O0", "-g"]
    else:
        flags += ["-O3", "-fno-math-errno"]
    if os.environ.get("SKUPY_NATIVE") == "1":
        flags += ["-march=native"]
    if os.environ.get("SKUPY_SANITIZE") == "1":
        flags += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]
    return flags


def link_flags():
    flags = ["-fopenmp"]
    if os.environ.get("SKUPY_SANITIZE") == "1":
        flags += ["-fsanitize=address,undefined"]
    return flags


blas = blas_settings()
core = Extension(
    "skupy._core",
    sources=sorted(glob("csrc/*.c")),
    depends=sorted(glob("csrc/*.h")),
    include_dirs=[numpy.get_include(), "csrc"] + blas["include_dirs"],
    library_dirs=blas["library_dirs"],
    libraries=blas["libraries"] + ["m"],
    runtime_library_dirs=blas["runtime_library_dirs"],
    define_macros=blas["define_macros"],
    extra_compile_args=compile_flags(),
    extra_link_args=link_flags(),
)

setup(ext_modules=[core])
