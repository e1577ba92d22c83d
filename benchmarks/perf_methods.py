"""``python -m benchmarks.perf_methods``: method speed beside captum, pytorch-grad-cam and torchcam (the code is ``benchmarks.perf.methods``)."""

import sys

from cambench.benchmarks.perf.methods import main

if __name__ == "__main__":
    sys.exit(main())
