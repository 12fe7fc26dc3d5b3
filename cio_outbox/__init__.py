"""cio-outbox: a durable, auditable outbox for the Customer.io Data Pipelines API."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cio-outbox")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
