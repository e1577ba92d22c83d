"""How heavy a run's HTML report is: ``python -m benchmarks.perf_report RUN [--repeat 3]``.

Writes the report (``benchmarks.reports.html``) to a temporary file, then opens it in
headless Chromium (``benchmarks.reports.browser``) ``--repeat`` times, each in a fresh
browser, and prints its size, the time to write it, and the time from navigation to the
load event (every embedded image decoded, the script run): the median and the range. The
issue's budget for the medical run: under 30 MB, under 3 s to open.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from cambench.benchmarks.core.errors import UserError
from cambench.benchmarks.reports.browser import opened, unavailable
from cambench.benchmarks.reports.html import write_report


def measure(run: str, repeat: int) -> dict[str, float]:
    """Size (MiB), seconds to write, and seconds to open (median, min, max of ``repeat``)."""
    if why := unavailable():
        raise UserError(f"cannot open the report in a browser: {why}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "report.html"
        start = time.perf_counter()
        write_report(run, path)
        written = time.perf_counter() - start
        loads = []
        for _ in range(repeat):
            with opened(path) as seen:
                if seen.errors:
                    raise UserError(f"the page logged errors: {'; '.join(seen.errors)[:300]}")
                loads.append(seen.load_seconds)
        return dict(
            mib=path.stat().st_size / 2**20,
            write_s=written,
            open_s=statistics.median(loads),
            open_min_s=min(loads),
            open_max_s=max(loads),
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.perf_report", description=__doc__)
    p.add_argument("run", help="run folder written by python -m benchmarks.run --out RUN")
    p.add_argument("--repeat", type=int, default=3, help="times the page is opened (default 3)")
    args = p.parse_args(argv)
    try:
        m = measure(args.run, max(1, args.repeat))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"report of {args.run}: {m['mib']:.1f} MiB, written in {m['write_s']:.1f} s, opened in "
        f"{m['open_s']:.2f} s (median of {args.repeat}; {m['open_min_s']:.2f}-"
        f"{m['open_max_s']:.2f} s) in headless Chromium"
    )
    return 0
