"""``python -m benchmarks.figures``: paper figures from a run folder (the code is ``benchmarks.reports.figures``)."""

import sys

from cambench.benchmarks.reports.figures import main

if __name__ == "__main__":
    sys.exit(main())
