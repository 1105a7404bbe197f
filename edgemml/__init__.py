"""edgemml: a pretrained PyTorch model in, a small, fast, verified artifact for CPUs out."""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("edgemml")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
