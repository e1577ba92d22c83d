"""``python -m benchmarks.perf_metrics``: metric speed (the code is ``benchmarks.perf.metrics``)."""

import sys

from cambench.benchmarks.perf.metrics import main

if __name__ == "__main__":
    sys.exit(main())
