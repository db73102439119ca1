"""ggsteer: control vectors for llama.cpp models."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("ggsteer")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+source"

from ggsteer.default_model import default_model_path
from ggsteer.model import SteeredModel

__all__ = ["SteeredModel", "default_model_path", "__version__"]
