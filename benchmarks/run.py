"""``python -m benchmarks.run``: run a suite and write its results, or list what exists.

Examples::

    python -m benchmarks.run --suite smoke
    python -m benchmarks.run --suite medical --data-root ../shared/data
    python -m benchmarks.run --suite smoke --methods 'grad*' --metrics aopc_morf
    python -m benchmarks.run --suite medical --dry-run
    python -m benchmarks.run --suite medical --data-root ../shared/data --executor ray
    python -m benchmarks.run --suite medical --data-root ../shared/data --strict
    python -m benchmarks.run --list methods

A run reads as its steps: the command line's overrides, the plan (``benchmarks.engine.plan``:
every cell with its status, decided before any work), the execution of the groups that
are not stored from the same configuration (``execute``), and ``publish`` (the gathered
tables, the leaderboard and the final manifest, through ``benchmarks.engine.store``).

Exit status: 0 when every cell ran or was recorded as not applicable, 1 when a cell
failed (its error is in the results; the manifest says "finished with errors"), 2 for
bad input (one line saying what and how to fix; refused before any work where it can be
checked, and then the run folder is left as it was), 130 on Ctrl-C and 143 on SIGTERM
(finished groups are kept, the lock is released, the manifest says "interrupted", and
the same command resumes).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import os
import platform
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pandas as pd

from cambench.benchmarks.core.checks import NonNegativeInt, PositiveInt, check_value
from cambench.benchmarks.core.errors import UserError
from cambench.benchmarks.core.files import check_writable
from cambench.benchmarks.engine.executors import EXECUTORS, run_groups
from cambench.benchmarks.engine.group import GroupResult, check_device, group_specs, preflight
from cambench.benchmarks.engine.plan import (
    GroupPlan,
    Plan,
    describe_change,
    fingerprint_inputs,
    format_plan,
    make_plan,
)
from cambench.benchmarks.engine.progress import Progress, log
from cambench.benchmarks.engine.store import LEADERBOARD, Manifest, RunStore, entry_metadata
from cambench.benchmarks.engine.suite import (
    Suite,
    available_suites,
    filter_suite,
    load_suite,
    registries,
)
from cambench.benchmarks.reports.collect import collect
from cambench.benchmarks.reports.conformance import agreement_means, compare_libraries, references
from cambench.benchmarks.reports.conformance import markdown as conformance_markdown
from cambench.benchmarks.reports.headline import headline_text, legend
from cambench.benchmarks.reports.html import write_report
from cambench.benchmarks.reports.layers import markdown as layers_markdown
from cambench.benchmarks.reports.leaderboard import views

LISTABLE = ("methods", "metrics", "datasets", "models", "suites")
PACKAGES = (
    "torch",
    "torchvision",
    "captum",
    "numpy",
    "scipy",
    "pandas",
    "pyarrow",
    "seaborn",
    "cambench",
)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def git_hash() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def list_entries(what: str) -> str:
    if what == "suites":
        lines = []
        for name in available_suites():
            suite = load_suite(name)
            lines.append(f"{name:<16} {suite.description}")
        return "\n".join(lines)
    reg = registries()[what]
    lines = []
    for entry in reg:
        info = ", ".join(f"{k}={v}" for k, v in vars(entry.info).items() if v not in ((), None, ""))
        alias = f" (aliases: {', '.join(entry.aliases)})" if entry.aliases else ""
        lines.append(f"{entry.name:<22} {entry.doc}{alias}\n{'':<22} {info}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Benchmark CAM-family explanation methods over models x datasets x metrics.",
        epilog=__doc__.split("Examples::", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--suite", help="suite name (see --list suites) or path to a suite .toml")
    p.add_argument("--list", choices=LISTABLE, help="list registered entries and exit")
    for kind in ("models", "datasets", "methods", "metrics"):
        p.add_argument(
            f"--{kind}",
            nargs="+",
            metavar="PATTERN",
            help=f"keep only these {kind} of the suite (wildcards)",
        )
    p.add_argument("--data-root", help="directory holding the real datasets (e.g. ../shared/data)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument("--out", help="run folder (default: results/<suite>-<config hash>)")
    p.add_argument(
        "--cache", default="results/cache", help="model cache folder (default: results/cache)"
    )
    p.add_argument("--seed", type=int, help="override the suite's seed")
    p.add_argument(
        "--max-images", type=int, help="override the number of images per (model, dataset)"
    )
    p.add_argument(
        "--model-seeds",
        type=int,
        help="train N models per (architecture, dataset) from seeds seed..seed+N-1 "
        "(labels gain -s0, -s1, ...); the findings say whether each holds for every seed",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars: a log line per finished batch and group (as without a terminal)",
    )
    p.add_argument(
        "--executor",
        default="local",
        choices=EXECUTORS,
        help="run the (model, dataset) groups here, or as Ray tasks (default: local)",
    )
    p.add_argument(
        "--ray-address", help="address of an existing Ray cluster (default: a local Ray)"
    )
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray the harness starts")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (cells, not-applicable ones with reasons, passes) and exit",
    )
    p.add_argument(
        "--report",
        action="store_true",
        help="also write RUN/report.html: one self-contained page of the run's findings, "
        "leaderboard, figures and maps (python -m benchmarks.report RUN does it later)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="missing real data is an error (default: skip that dataset and say so)",
    )
    return p


def run(args: argparse.Namespace) -> int:
    """overrides -> plan -> checks -> execute -> publish; the exit status.

    Everything that can be checked before work is: the suite's values, the data of every
    group to compute, the output and cache folders. A run refused there leaves the run
    folder as it was; once work starts the manifest says how it ended."""
    suite = with_overrides(load_suite(args.suite), args)
    device = check_device(args.device)
    if args.data_root and not Path(args.data_root).expanduser().exists():
        raise UserError(f"--data-root {args.data_root} does not exist")
    plan = make_plan(suite, data_root=args.data_root)
    if args.dry_run:
        print(format_plan(plan))
        return 0
    if args.strict and (missing := plan.missing_data()):
        raise UserError(
            "--strict: " + "; ".join(f"dataset {name} {why}" for name, why in missing.items())
        )
    check_writable(args.cache, "choose another --cache")
    run_dir = Path(args.out or Path("results") / f"{suite.name}-{suite.config_hash()}")
    with RunStore(run_dir).open() as store:
        todo, reused = to_compute(plan, store)
        preflight(todo)
        manifest = new_manifest(suite, run_dir, args, device)
        for group in plan.groups:  # a method's layer variants: one row each in the reports
            for m in group.methods:
                if m.entry and m.entry != m.label:
                    meta = {**entry_metadata("methods", m.use), "entry": m.entry, "layer": m.layer}
                    manifest.methods.setdefault(m.label, meta)
        manifest.groups.update(reused)
        store.write("manifest.json", manifest)
        try:
            execute(plan, todo, store, manifest, args, device)
            errors, table = publish(plan, store, manifest)
        except BaseException as exc:  # interrupted, or bad input found mid-run
            interrupted(store, manifest, exc)
            raise
    if text := headline_text(table, [m.label for m in suite.methods], title=f"{suite.name}:"):
        print(f"{text}\n{legend(table)}", flush=True)
    log(f"results: {run_dir}/leaderboard.md")
    if args.report:
        log("writing the report (figures, gallery)")
        start = time.perf_counter()
        path = write_report(run_dir)
        size = path.stat().st_size / 2**20
        log(f"report: {path} ({size:.1f} MiB, {time.perf_counter() - start:.0f} s)")
    if errors:
        log(
            f"{errors} cell(s) failed; see the 'error' cells in {run_dir}/cells.parquet and the log above"
        )
        return 1
    return 0


def with_overrides(suite: Suite, args: argparse.Namespace) -> Suite:
    """The suite after the command line's filters, --seed and --max-images."""
    suite = filter_suite(
        suite,
        models=args.models,
        datasets=args.datasets,
        methods=args.methods,
        metrics=args.metrics,
    )
    for flag, value, tp in (
        ("--seed", args.seed, NonNegativeInt),
        ("--max-images", args.max_images, PositiveInt),
        ("--num-cpus", args.num_cpus, PositiveInt),
        ("--model-seeds", args.model_seeds, PositiveInt),
    ):
        if value is not None:
            check_value(value, tp, flag)
    if args.seed is not None:
        suite = dataclasses.replace(suite, seed=args.seed)
    if args.model_seeds is not None:
        suite = dataclasses.replace(suite, model_seeds=args.model_seeds)
    if args.max_images is not None:
        evaluation = dataclasses.replace(suite.eval, max_images=args.max_images)
        suite = dataclasses.replace(suite, eval=evaluation)
    return suite


def new_manifest(suite: Suite, run_dir: Path, args: argparse.Namespace, device: str) -> Manifest:
    return Manifest(
        run_id=run_dir.name,
        suite=suite.resolved(),
        suite_files=suite.source,
        versions=versions(),
        git=git_hash(),
        seed=suite.seed,
        host=platform.node(),
        platform=platform.platform(),
        device=device,
        data_root=args.data_root,
        executor=args.executor,
        ray_address=args.ray_address,
        started=now(),
        methods={m.label: entry_metadata("methods", m.use) for m in suite.methods},
        metrics={k.label: entry_metadata("metrics", k.use) for k in suite.metrics},
    )


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def interrupted(store: RunStore, manifest: Manifest, exc: BaseException) -> None:
    """Record in the manifest that the run stopped before publishing, and why."""
    manifest.status = "interrupted"
    if isinstance(exc, Terminated):
        manifest.stopped_by = "SIGTERM"
    elif isinstance(exc, KeyboardInterrupt):
        manifest.stopped_by = "Ctrl-C (SIGINT)"
    else:
        manifest.stopped_by = f"{type(exc).__name__}: {exc}".splitlines()[0]
    with contextlib.suppress(UserError, OSError):  # a full disk cannot take it either
        store.write("manifest.json", manifest)


def to_compute(plan: Plan, store: RunStore) -> tuple[list[GroupPlan], dict[str, dict]]:
    """The groups to compute, and the manifest entries of those reused: a group stored
    from the same fingerprint, whole (its files match their checksums), is reused; a
    damaged one is named and computed again; one stored from another configuration says
    what changed and is computed again."""
    todo, reused = [], {}
    for g in plan.groups:
        if damage := store.damaged(g.key):
            log(f"{g.key}: stored results are damaged ({damage}); recomputing")
            todo.append(g)
        elif store.reusable(g.key, g.fingerprint):
            log(
                f"{g.key}: stored from the same configuration (fingerprint {g.fingerprint}), reused"
            )
            reused[g.key] = {"state": "reused", "fingerprint": g.fingerprint}
        else:
            stored = store.stored_fingerprint(g.key)
            if stored is not None and stored.get("fingerprint") != g.fingerprint:
                change = describe_change(stored.get("inputs") or {}, fingerprint_inputs(g))
                log(
                    f"{g.key}: stored results came from another configuration ({change}); recomputing"
                )
            elif store.group_dir(g.key).is_dir():
                log(f"{g.key}: stored results are incomplete or of an older version; recomputing")
            todo.append(g)
    return todo, reused


def execute(
    plan: Plan, todo: list[GroupPlan], store: RunStore, manifest: Manifest, args, device: str
) -> None:
    """Compute the groups ``todo``, storing each as it finishes."""
    log(f"{len(todo)} group(s) to run on the {args.executor} executor")
    specs = group_specs(todo, device=device, cache_dir=args.cache, progress=not args.no_progress)
    groups = run_groups(
        specs, executor=args.executor, ray_address=args.ray_address, num_cpus=args.num_cpus
    )
    progress = Progress(len(todo), "groups", bar=False)
    # closing: an interrupt or error cancels running tasks (and stops a Ray we started)
    with contextlib.closing(groups):
        for spec, result in groups:
            g = spec.plan
            store.write_group(
                g.key, result, fingerprint=g.fingerprint, inputs=fingerprint_inputs(g)
            )
            state = group_state(result)
            manifest.groups[g.key] = {"state": state, "fingerprint": g.fingerprint}
            if result.skipped:
                manifest.skipped_datasets[g.dataset.label] = result.skipped
            store.write("manifest.json", manifest)
            progress.step(f"{g.key} {state}" + (f": {result.skipped}" if result.skipped else ""))
    manifest.groups = {g.key: manifest.groups[g.key] for g in plan.groups}  # plan order


def group_state(result: GroupResult) -> str:
    if result.skipped:
        return "skipped"
    return "error" if result.error else "computed"


def publish(plan: Plan, store: RunStore, manifest: Manifest) -> tuple[int, pd.DataFrame]:
    """Gather the run's groups, write its tables, leaderboard and final manifest; returns
    the number of failed cells and the leaderboard."""
    suite = plan.suite
    tables = collect(store, [g.key for g in plan.groups], manifest, suite.seed)
    rows, cells, table, reports = tables.rows, tables.cells, tables.table, tables.reports
    curves = tables.curves
    directions = {k: meta["higher_is_better"] for k, meta in manifest.metrics.items()}
    families = {k: meta["kind"] for k, meta in manifest.metrics.items()}
    for name, frame in (("rows", rows), ("cells", cells), ("curves", curves)):
        store.write(f"{name}.parquet", frame)
    store.write(LEADERBOARD, table)
    notes = [
        f"suite {suite.name} v{suite.version}, seed {suite.seed}; at most "
        f"{suite.eval.max_images} evaluation images drawn per model x dataset, each entry "
        "capped by its max_images: every cell gives the n it scored"
    ]
    notes += [
        f"dataset {name} skipped: {why}" for name, why in sorted(manifest.skipped_datasets.items())
    ]
    notes += [f"{m} x {d} left out by the suite: {why}" for m, d, why in plan.left_out]
    # the libraries' implementations beside ours: does the implementation change the verdict?
    method_uses = {k: meta["use"] for k, meta in manifest.methods.items()}
    metric_uses = {k: meta["use"] for k, meta in manifest.metrics.items()}
    sections: list[str] = []
    if references(method_uses):
        verdicts = compare_libraries(
            rows, table, method_uses, families, directions, seed=suite.seed
        )
        store.write("conformance.parquet", verdicts)
        sections = conformance_markdown(
            verdicts, agreement_means(rows, metric_uses), method_uses
        )
    # a layer sweep: how each metric moves with depth
    sections += layers_markdown(table, manifest.methods, reports)
    # the model comparison of the X-ray study: accuracy, recall, F1 beside AOPC
    aopc = [c.label for c in suite.metrics if c.use == "aopc_morf"]
    compare = next((c.label for c in suite.metrics if c.options.get("correct_only")), None)
    files = views(
        table,
        title=f"Leaderboard: {suite.name}",
        notes=notes,
        host_metrics=sorted(k for k, meta in manifest.metrics.items() if meta["host_dependent"]),
        reports=reports,
        compare_metric=compare or (aopc[0] if aopc else None),
        uses=metric_uses,
        model_seeds={m.label: m.entry for m in suite.model_entries() if m.entry},
        sections=sections,
    )
    for name, text in files.items():
        store.write(name, text)
    errors = int((cells["status"] == "error").sum())
    if profile := time_profile(reports):
        log(profile)
    manifest.finished = now()
    manifest.status = "finished with errors" if errors else "finished"
    manifest.models = reports
    store.write("manifest.json", manifest)
    return errors, table


class Terminated(KeyboardInterrupt):
    """SIGTERM (what schedulers, ``timeout`` and ``kill`` send), raised like Ctrl-C so
    the same clean-up runs: the lock released, the manifest saying "interrupted"."""


def _terminate(signum, frame) -> None:
    raise Terminated()


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within: SIGTERM raises ``Terminated`` (in the main thread; elsewhere unchanged)."""
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: signals stay as they are
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def time_profile(reports: dict[str, dict], top: int = 5) -> str:
    """Where the run's groups spent their time (explaining, per method; scoring, per
    metric), from the seconds each group's report recorded when it was computed; "" when
    none recorded any.

    >>> time_profile({"g": {"seconds": {"cam": 1.0, "cam / aopc": 2.0, "rise / aopc": 4.0}}})
    'time in explaining and scoring: 7 s; explaining, by method: cam 1 s; scoring, by metric: aopc 6 s'
    """
    methods: dict[str, float] = {}
    metrics: dict[str, float] = {}
    for report in reports.values():
        for key, seconds in (report.get("seconds") or {}).items():
            method, _, metric = key.partition(" / ")
            into, name = (metrics, metric) if metric else (methods, method)
            into[name] = into.get(name, 0.0) + seconds
    if not methods and not metrics:
        return ""
    total = sum(methods.values()) + sum(metrics.values())

    def largest(d: dict[str, float]) -> str:
        items = sorted(d.items(), key=lambda kv: -kv[1])[:top]
        return ", ".join(f"{k} {v:.3g} s" for k, v in items)

    return (
        f"time in explaining and scoring: {total:.3g} s; explaining, by method: "
        f"{largest(methods)}; scoring, by metric: {largest(metrics)}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # a model named by import path ("my_model:build") is found in the current folder, as
    # under `python -m`, also when run as the `cambench` command (after installed packages)
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        with sigterm_as_interrupt():
            if args.list:
                print(list_entries(args.list))
                return 0
            if not args.suite:
                raise UserError("give --suite NAME (see --list suites) or --list WHAT")
            return run(args)
    except UserError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        print(
            f"{what}: finished groups are stored; rerun the same command to resume",
            file=sys.stderr,
        )
        return 143 if isinstance(exc, Terminated) else 130


if __name__ == "__main__":
    # `python -m benchmarks.run` executes this file as __main__: run the one imported copy,
    # whose functions the executors can pickle by name
    from cambench.benchmarks.run import main as _main

    sys.exit(_main())
