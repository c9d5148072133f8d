"""Build the compiled parts of the simulator (Cython; everything else is in pyproject.toml).

Each compiled module has a Python twin that is its specification and its fallback: where the build
cannot compile (no C compiler), ``optional=True`` lets the install go on and the simulator runs the
Python classes, with the same results (``cwsim.native`` says which are in use).
"""

from Cython.Build import cythonize
from setuptools import Extension, setup

NATIVE = ["cwsim._free_queue", "cwsim._block_pool", "cwsim._hashing", "cwsim._kv_cache_manager"]

EXTENSIONS = cythonize([Extension(name, [name.replace(".", "/") + ".pyx"]) for name in NATIVE], language_level=3)
for ext in EXTENSIONS:
    ext.optional = True  # a module that does not compile is skipped (set here: cythonize drops the flag)

setup(ext_modules=EXTENSIONS)
