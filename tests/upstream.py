"""Where the tests find Customer.io's published Pipelines API document.

The document is Customer.io's, not ours, so the repository does not hold it: CI lays it at
``../shared/cio_pipelines_api.json`` beside the clone, and ``CIO_UPSTREAM_SPEC`` names it
anywhere else. Tests that need it are skipped with :data:`MISSING_REASON` when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = "CIO_UPSTREAM_SPEC"
# The developers' shared folder on the project's build machine, tried last.
_SHARED = Path("/work/shared/cio_pipelines_api.json")


def upstream_path() -> Path | None:
    """The document's path: CIO_UPSTREAM_SPEC, else ../shared/ beside the clone, else None."""
    named = os.environ.get(ENV)
    if named:
        path = Path(named)
        return path if path.is_file() else None
    for candidate in (REPO.parent / "shared" / "cio_pipelines_api.json", _SHARED):
        if candidate.is_file():
            return candidate
    return None


MISSING_REASON = (
    "Customer.io's published Pipelines API document (cio_pipelines_api.json) is not "
    f"available: put it in shared/ beside the clone, as CI does, or set {ENV} to its path"
)
