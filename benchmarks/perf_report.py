"""``python -m benchmarks.perf_report``: a run report's size and time to open (the code is ``benchmarks.perf.report``)."""

import sys

from cambench.benchmarks.perf.report import main

if __name__ == "__main__":
    sys.exit(main())
