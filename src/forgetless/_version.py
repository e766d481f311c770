"""The version of forgetless: read by the package (``forgetless.__version__``) and by the build (pyproject.toml)."""

__version__ = "0.1.0"
