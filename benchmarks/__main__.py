"""``python -m benchmarks [--quick | --full] [--out results.json] [--only drain,...]``."""

import sys

from benchmarks.run import main

sys.exit(main())
