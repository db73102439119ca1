"""Optional dependencies (`pip install "ggsteer[serve]"`, `"ggsteer[plot]"`): a clear one-line error
naming the install command when one is missing."""

from __future__ import annotations

import importlib


class MissingExtraError(ImportError):
    """A feature needs an optional dependency that is not installed."""


def require(module: str, extra: str, feature: str):
    """Import `module`, or raise MissingExtraError telling which extra to install."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name is None or error.name.split(".")[0] != module.split(".")[0]:
            raise
        raise MissingExtraError(
            f"{feature} needs {module.split('.')[0]}, which is not installed: pip install \"ggsteer[{extra}]\""
        ) from None
