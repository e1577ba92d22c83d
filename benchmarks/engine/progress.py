"""Progress of long work, with or without a terminal.

On a terminal, a tqdm bar. Elsewhere (a scheduler, CI, ``nohup``, ``--no-progress``), one
log line per finished step, with the elapsed time and an estimate of what is left, so a
48-minute run says where it is in its log and not only at the end.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def log(message: str) -> None:
    """A line on stderr, flushed at once (the run's log)."""
    print(message, file=sys.stderr, flush=True)


def duration(seconds: float) -> str:
    """A short human duration.

    >>> duration(4.2), duration(75), duration(3 * 3600 + 120)
    ('4.2 s', '1 min 15 s', '3 h 2 min')
    """
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


class Progress:
    """``total`` steps of work named ``desc``: a bar when ``bar`` and stderr is a terminal,
    else one log line per ``step``.

    >>> import io
    >>> out = io.StringIO()
    >>> p = Progress(2, "demo", bar=False, stream=out, clock=iter([0.0, 1.0, 3.0]).__next__)
    >>> p.step("first")
    >>> p.step("second")
    >>> print(out.getvalue(), end="")
    demo: 1/2 first (1.0 s elapsed, about 1.0 s left)
    demo: 2/2 second (3.0 s elapsed)
    """

    def __init__(
        self,
        total: int,
        desc: str,
        *,
        bar: bool = True,
        stream: TextIO | None = None,
        clock=time.monotonic,
    ):
        self.total, self.desc, self.done = total, desc, 0
        self._stream = stream or sys.stderr
        self._clock = clock
        self._start = clock()
        self._bar = None
        if bar and getattr(self._stream, "isatty", lambda: False)():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, file=self._stream)

    def step(self, what: str = "") -> None:
        """One step finished; ``what`` names it in the log line."""
        self.done += 1
        if self._bar is not None:
            self._bar.update(1)
            return
        elapsed = self._clock() - self._start
        left = self.total - self.done
        eta = f", about {duration(elapsed / self.done * left)} left" if left > 0 else ""
        text = f"{self.desc}: {self.done}/{self.total} {what}".rstrip()
        print(f"{text} ({duration(elapsed)} elapsed{eta})", file=self._stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
