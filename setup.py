"""The one part of the build that pyproject.toml cannot state (as a stable setting): the fused kernels of the merge
methods' hot loops (forgetless.methods.fast.kernels). The extension is optional: without a C compiler the install
goes on and the methods run torch instead, which gives the same result bit for bit, slower (BENCHMARKS.md, "Merge
engine (foundation)").
-ffp-contract=off and no -ffast-math: the kernels round as torch does, operation for operation."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("forgetless.methods.fast._kernels", ["src/forgetless/methods/fast/_kernels.c"],
                             extra_compile_args=["-O3", "-ffp-contract=off", "-fno-math-errno"], optional=True)])
