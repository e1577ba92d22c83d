"""``python -m benchmarks.regress``: the CI regression gate on explanation quality (the code is ``benchmarks.reports.regress``)."""

import sys

from cambench.benchmarks.reports.regress import main

if __name__ == "__main__":
    sys.exit(main())
