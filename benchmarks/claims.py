"""``python -m benchmarks.claims``: test claims from the literature on this harness.

Each claim of the registry (``benchmarks/claims_registry.py``) is a small suite
(``benchmarks/claims/*.toml``) and a pass/fail rule over its results. The command runs each
suite through the runner (``benchmarks.run``) into ``<out>/<claim>/``, reads what it
stored, applies the rule, and prints one line per claim: the claim, its source, the measured
figures and whether it held here. The table is written to ``<out>/claims.md`` and
``<out>/claims.json``.

Examples::

    python -m benchmarks.claims
    python -m benchmarks.claims --only 'selvaraju*' samek2017
    python -m benchmarks.claims --data-root ../shared/data --out results/claims
    python -m benchmarks.claims --list

Reuse is by content, as for any run: rerunning resumes from the groups stored in each claim's
folder, and trained models come from the model cache (``--cache``, shared with
``benchmarks.run``). A claim whose suite needs real data (BUSI) runs on it when
``--data-root`` (default ``../shared/data`` where it exists) holds it, and otherwise on its
synthetic stand-in, saying so on its line.

Exit status: 0 when every claim was decided (held or not: a claim that did not hold here is
a finding, not a failure), 1 when a claim could not run (its line says why), 2 for bad input,
130 on Ctrl-C and 143 on SIGTERM (finished groups are kept; the same command resumes).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

from cambench.benchmarks.claims_registry import CLAIMS, CLAIMS_DIR, Evidence, Undecidable
from cambench.benchmarks.core.errors import UserError
from cambench.benchmarks.core.files import atomic_write, check_writable
from cambench.benchmarks.core.registry import Entry
from cambench.benchmarks.engine.progress import duration, log

DEFAULT_DATA_ROOT = "../shared/data"
HELD, NOT_HELD, NOT_RUN = "held", "did not hold", "could not run"
TINY_IMAGES = 16  # --tiny: images per group, for tests of the command itself


@dataclass
class Outcome:
    """One claim's line: what was run, what it measured, and the verdict."""

    id: str
    source: str
    claim: str
    protocol: str
    result: str  # held, did not hold, could not run
    figures: str = ""
    note: str = ""  # e.g. that a synthetic stand-in replaced missing real data
    suite: str = ""
    run: str = ""
    seconds: float = 0.0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.claims",
        description="Test claims from the explanation literature on this harness.",
        epilog=__doc__.split("Examples::", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="results/claims", help="folder of the claims' runs and table")
    p.add_argument(
        "--data-root",
        help=f"folder holding the real datasets (default: {DEFAULT_DATA_ROOT} if it exists)",
    )
    p.add_argument(
        "--cache", default="results/cache", help="model cache folder (default: results/cache)"
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument("--only", nargs="+", metavar="CLAIM", help="claim ids or wildcard patterns")
    p.add_argument("--list", action="store_true", help="list the claims and exit")
    p.add_argument(
        "--tiny",
        action="store_true",
        help=f"for tests of this command: each suite's first model, 1 training epoch, "
        f"{TINY_IMAGES} images per group (the figures are no evidence)",
    )
    return p


def list_claims() -> str:
    lines = []
    for entry in CLAIMS:
        info = entry.info
        lines.append(f"{entry.name:<18} {info.claim}")
        lines.append(f"{'':<18} source: {info.source}")
        lines.append(f"{'':<18} here: {info.protocol}")
    return "\n".join(lines)


def data_root(args: argparse.Namespace) -> str | None:
    if args.data_root:
        if not Path(args.data_root).expanduser().is_dir():
            raise UserError(f"--data-root {args.data_root} does not exist")
        return args.data_root
    return DEFAULT_DATA_ROOT if Path(DEFAULT_DATA_ROOT).is_dir() else None


def missing_data(suite_file: Path, root: str | None) -> str:
    """Why the suite's real data is not there ("" when it is, or it needs none): the plan's
    check (no data folder named) and the dataset's own (its files under that folder)."""
    from cambench.benchmarks.core.errors import DataNotFound
    from cambench.benchmarks.engine.plan import make_plan
    from cambench.benchmarks.engine.suite import load_suite
    from cambench.datasets import DATASETS

    suite = load_suite(str(suite_file))
    plan = make_plan(suite, data_root=root)
    if missing := plan.missing_data():
        return "; ".join(why.removeprefix("missing: ") for why in missing.values())
    for g in plan.groups:
        if g.root is None:
            continue
        try:  # reads (and caches) the evaluation split, as the run would
            DATASETS.get(g.dataset.use).obj(
                suite.eval.split, root=g.root, seed=suite.seed, **g.dataset.options
            )
        except DataNotFound as exc:
            return str(exc)
    return ""


def choose_suite(entry: Entry, root: str | None) -> tuple[Path, str]:
    """The claim's suite file, or its fallback when the suite's real data is missing, with
    a note saying so."""
    suite = CLAIMS_DIR / entry.info.suite
    if not entry.info.fallback:
        return suite, ""
    why = missing_data(suite, root)
    if not why:
        return suite, ""
    short = why.split(". ")[0]
    return CLAIMS_DIR / entry.info.fallback, f"ran on the synthetic stand-in: {short}"


def tiny_suite(suite: Path, folder: Path) -> tuple[Path, list[str]]:
    """``--tiny``: a suite that includes ``suite`` and trains every model for 1 epoch (as
    the ``train_on`` of every model and dataset, which wins over every other training
    setting), and the runner's arguments that keep its first model and ``TINY_IMAGES``
    images per group."""
    from cambench.benchmarks.engine.suite import load_suite

    loaded = load_suite(str(suite))
    lines = [f"include = {json.dumps(str(suite.resolve()))}", ""]
    for m in loaded.models:
        for d in loaded.datasets:
            lines.append(f"[models.{json.dumps(m.label)}.train_on.{json.dumps(d.label)}]")
            lines.append("epochs = 1")
    path = folder / f"{suite.stem}-tiny.toml"
    atomic_write(path, "\n".join(lines) + "\n")
    return path, ["--models", loaded.models[0].label, "--max-images", str(TINY_IMAGES)]


class Tail(io.TextIOBase):
    """A stream that passes what is written on to ``target`` and keeps its last lines."""

    def __init__(self, target, keep: int = 20):
        self.target, self.lines, self._part = target, deque(maxlen=keep), ""

    def write(self, text: str) -> int:
        self.target.write(text)
        self._part += text
        *done, self._part = self._part.split("\n")
        self.lines.extend(done)
        return len(text)

    def flush(self) -> None:
        self.target.flush()

    def error(self) -> str:
        """The runner's one-line message of bad input, if it printed one."""
        found = [line for line in self.lines if line.startswith("error: ")]
        return found[-1].removeprefix("error: ") if found else ""


def run_suite(suite: Path, out: Path, args: argparse.Namespace, root: str | None) -> str:
    """Run the suite through ``benchmarks.run`` into ``out``; "" when its results can be
    read, else why not. Ctrl-C and SIGTERM stop the whole command."""
    from cambench.benchmarks.run import main as run_main

    argv = ["--suite", str(suite), "--out", str(out), "--cache", args.cache, "--no-progress"]
    argv += ["--device", args.device] + (["--data-root", root] if root else [])
    if args.tiny:
        suite, extra = tiny_suite(suite, out.parent / "suites")
        argv[1] = str(suite)
        argv += extra
    tail = Tail(sys.stderr)
    with contextlib.redirect_stderr(tail):
        code = run_main(argv)
    if code in (130, 143):
        raise KeyboardInterrupt(code)
    if code == 2:
        return f"the run was refused: {tail.error() or 'bad input (see the log)'}"
    return ""  # 0, or 1: a cell failed, which the rule finds if it needs that cell


def run_claim(entry: Entry, args: argparse.Namespace, root: str | None) -> Outcome:
    """Run one claim's suite and apply its rule."""
    info = entry.info
    outcome = Outcome(entry.name, info.source, info.claim, info.protocol, NOT_RUN)
    start = time.perf_counter()
    try:
        suite, outcome.note = choose_suite(entry, root)
        folder = Path(args.out) / (entry.name if suite.stem == entry.name else suite.stem)
        outcome.suite, outcome.run = f"benchmarks/claims/{suite.name}", str(folder)
        log(f"claim {entry.name}: running {outcome.suite} into {folder}")
        why = run_suite(suite, folder, args, root)
        if why:
            outcome.figures = why
        else:
            verdict = entry.obj(Evidence.from_run(folder))
            outcome.result = HELD if verdict.held else NOT_HELD
            outcome.figures = verdict.figures
    except Undecidable as exc:
        outcome.figures = f"the results cannot decide: {exc}"
    except UserError as exc:
        outcome.figures = f"error: {' '.join(str(exc).split())}"
    outcome.seconds = round(time.perf_counter() - start, 1)
    log(f"claim {entry.name}: {outcome.result} ({duration(outcome.seconds)})")
    return outcome


def cell(text: str) -> str:
    """Text for one cell of a Markdown table."""
    return " ".join(text.split()).replace("|", "\\|")


def table(outcomes: list[Outcome]) -> str:
    """The claims as a Markdown table, one line per claim."""
    lines = [
        "| claim | source | figures | here |",
        "|---|---|---|---|",
    ]
    for o in outcomes:
        figures = o.figures + (f" [{o.note}]" if o.note else "")
        lines.append(
            f"| {o.id}: {cell(o.claim)} | {cell(o.source)} | {cell(figures)} | {o.result} |"
        )
    return "\n".join(lines)


def markdown(outcomes: list[Outcome], header: dict[str, str]) -> str:
    """``claims.md``: the table, then each claim's protocol, suite and run folder."""
    parts = ["# Claims from the literature, tested here", ""]
    parts += [f"- {k}: {v}" for k, v in header.items()]
    parts += ["", table(outcomes), "", "## Protocols", ""]
    for o in outcomes:
        parts += [
            f"### {o.id} ({o.result})",
            "",
            f"- claim: {o.claim}",
            f"- source: {o.source}",
            f"- protocol here: {o.protocol}",
            f"- suite: {o.suite or '-'}; run folder: {o.run or '-'}; {duration(o.seconds)}",
            *([f"- note: {o.note}"] if o.note else []),
            "",
        ]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    from cambench.benchmarks.run import Terminated, sigterm_as_interrupt

    args = parser().parse_args(argv)
    try:
        if args.list:
            print(list_claims())
            return 0
        entries = [CLAIMS.get(n) for n in CLAIMS.names(args.only or "*")]
        root = data_root(args)
        out = Path(args.out)
        check_writable(out, "choose another --out")
        started, start = dt.datetime.now(dt.timezone.utc), time.perf_counter()
        with sigterm_as_interrupt():
            outcomes = [run_claim(entry, args, root) for entry in entries]
        header = {
            "started": started.isoformat(timespec="seconds"),
            "seconds": f"{time.perf_counter() - start:.0f}",
            "data root": str(root),
            "model cache": args.cache,
            **({"tiny": "yes: a smoke-size run, no evidence"} if args.tiny else {}),
        }
        atomic_write(out / "claims.md", markdown(outcomes, header) + "\n")
        run = {**header, "seconds": float(header["seconds"]), "tiny": args.tiny}
        record = {"run": run, "claims": [asdict(o) for o in outcomes]}
        atomic_write(out / "claims.json", json.dumps(record, indent=2) + "\n")
    except UserError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        code = exc.args[0] if exc.args and exc.args[0] in (130, 143) else 130
        code = 143 if isinstance(exc, Terminated) else code
        print("interrupted: finished groups are stored; rerun to resume", file=sys.stderr)
        return code
    print(table(outcomes))
    log(
        f"claims: {out / 'claims.md'}, {out / 'claims.json'} ({duration(float(header['seconds']))})"
    )
    return 1 if any(o.result == NOT_RUN for o in outcomes) else 0


if __name__ == "__main__":
    # `python -m benchmarks.claims` executes this file as __main__: run the one imported copy
    from cambench.benchmarks.claims import main as _main

    sys.exit(_main())
