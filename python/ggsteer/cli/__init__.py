"""The `ggsteer` command line (`ggsteer.cli.main:main`)."""

from ggsteer.cli.main import main

__all__ = ["main"]
