"""Build the compiled parts of the simulator (Cython; everything else is in pyproject.toml).

Each compiled module has a Python twin that is its specification and its fallback: where the build
cannot compile (no C compiler), ``optional=True`` lets the install go on and the simulator runs the
Python classes, with the same results (``cwsim.native`` says which are in use).
"""

import importlib.util
from pathlib import Path

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

# cwsim/native.py alone (not the package: the build environment has none of its dependencies)
_spec = importlib.util.spec_from_file_location("cwsim_native", Path(__file__).parent / "cwsim" / "native.py")
_native = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_native)
DIGEST = _native.source_digest(Path(__file__).parent / "cwsim")  # compiled into each module: see cwsim.native.stale

NATIVE = list(_native.MODULES)

# numpy's C API (cwsim/_arrays.pxi): its headers at build time, hence numpy among the build requirements
EXTENSIONS = cythonize([Extension(name, [name.replace(".", "/") + ".pyx"], include_dirs=[numpy.get_include()],
                                  define_macros=[("CWSIM_SOURCE_DIGEST", f'"{DIGEST}"'),
                                                 ("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")])
                        for name in NATIVE], language_level=3, force=True)  # all of them: each holds the digest
for ext in EXTENSIONS:
    ext.optional = True  # a module that does not compile is skipped (set here: cythonize drops the flag)

setup(ext_modules=EXTENSIONS)
