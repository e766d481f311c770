"""The one part of the build that pyproject.toml cannot state (as a stable setting): the fused kernels of the merge
methods' hot loops (forgetless.methods.kernels). The extension is optional: without a C compiler the install goes
on and the methods run their pure-torch rule, which gives the same result bit for bit, slower (a TIES merge: 1.6×
the wall, BENCHMARKS.md).
-ffp-contract=off and no -ffast-math: the kernels round as torch does, operation for operation."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("forgetless.methods._kernels", ["src/forgetless/methods/_kernels.c"],
                             extra_compile_args=["-O3", "-ffp-contract=off", "-fno-math-errno"], optional=True)])
