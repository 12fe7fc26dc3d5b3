"""The installed package's version, in a module of its own: any module may import it
without importing the package's public API (and so without caring about import order)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cio-outbox")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"
