"""__version__ lives in cio_outbox._version, so modules that need it (the client's
User-Agent, the library context of every message) do not depend on __init__'s order."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version


def test_version_is_the_installed_packages_and_the_same_everywhere() -> None:
    import cio_outbox
    from cio_outbox import _version, client, messages

    assert _version.__version__ == version("cio-outbox") == cio_outbox.__version__
    assert client.USER_AGENT.startswith(f"cio-outbox/{_version.__version__} ")
    assert messages.LIBRARY["version"] == _version.__version__


def test_modules_that_use_the_version_import_first_in_a_fresh_interpreter() -> None:
    for module in ("cio_outbox.client", "cio_outbox.messages", "cio_outbox._version"):
        done = subprocess.run([sys.executable, "-c", f"import {module}"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
