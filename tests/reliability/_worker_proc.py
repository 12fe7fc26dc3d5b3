"""A worker in a process of its own, so that a test can SIGSTOP and SIGCONT it.

    python _worker_proc.py OUTBOX HOST KEY '{"lease_seconds": 2, ...}'

The JSON holds Worker options; ``timeout`` is the client's (connect, read) timeout. Prints
the WorkerResult as JSON and exits with its exit code.
"""

from __future__ import annotations

import json
import sys

from cio_outbox import Outbox


def main() -> int:
    location, host, key, raw = sys.argv[1:5]
    options = json.loads(raw)
    timeout = tuple(options.pop("timeout", (5.0, 30.0)))
    with Outbox(location) as box:
        worker = box.worker(host=host, key=key, timeout=timeout, **options)
        try:
            result = worker.run(until_empty=True, timeout=120)
        finally:
            worker.client.close()
    print(json.dumps(result.as_dict()), flush=True)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
