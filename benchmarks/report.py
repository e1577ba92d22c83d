"""``python -m benchmarks.report``: one self-contained HTML page of a run folder (the code is ``benchmarks.reports.html``)."""

import sys

from cambench.benchmarks.reports.html import main

if __name__ == "__main__":
    sys.exit(main())
