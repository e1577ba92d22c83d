"""``python -m benchmarks.perf_training``: training speed (the code is ``benchmarks.perf.training``)."""

import sys

from cambench.benchmarks.perf.training import main

if __name__ == "__main__":
    sys.exit(main())
