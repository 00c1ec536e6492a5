"""rayinfer's version, from the installed package's metadata (the lowest layer: parts and the
manifest record it)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rayinfer")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
