"""tandem's gateway: the coordinator that drives generation across the stage functions."""

__version__ = "0.1.0"  # kept equal to pyproject.toml's version (a test checks it)
