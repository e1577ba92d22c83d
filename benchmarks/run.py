"""``python -m benchmarks.run``: run a suite and write its results, or list what exists.

Examples::

    python -m benchmarks.run --suite smoke
    python -m benchmarks.run --suite medical --data-root ../shared/data
    python -m benchmarks.run --suite smoke --methods 'grad*' --metrics aopc_morf
    python -m benchmarks.run --suite medical --dry-run
    python -m benchmarks.run --suite medical --data-root ../shared/data --executor ray
    python -m benchmarks.run --suite medical --data-root ../shared/data --strict
    python -m benchmarks.run --list methods

Exit status: 0 when every cell ran or was recorded as not applicable, 1 when a cell
failed (its error is in the results), 2 for bad input (the message says what and how to fix).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from benchmarks.core.errors import UserError
from benchmarks.engine.executors import EXECUTORS, run_groups
from benchmarks.engine.group import check_device, format_plan, group_specs, log, plan
from benchmarks.engine.store import RunStore, atomic_write_parquet, atomic_write_text
from benchmarks.engine.suite import available_suites, filter_suite, load_suite, registries
from benchmarks.reports.leaderboard import (
    CSV_NAME,
    HOST_CSV_NAME,
    aggregate,
    host_note,
    split_host_dependent,
    to_csv,
    to_latex,
    to_markdown,
)

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


def remove_partial_writes(store: RunStore) -> int:
    """Remove what a run killed mid-write left behind: a group folder still under its
    temporary name (``groups/.tmp-*``, which the glob of ``RunStore.read`` would otherwise
    gather) and the temporary files of atomic writes (``.NAME.*.tmp``). Call it holding the
    folder's lock. Returns how many were removed."""
    partial = [*store.groups_dir.glob(".tmp-*"), *store.root.glob(".*.tmp")]
    for path in partial:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return len(partial)


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
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
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
        "--strict",
        action="store_true",
        help="missing real data is an error (default: skip that dataset and say so)",
    )
    return p


def run(args: argparse.Namespace) -> int:
    import dataclasses

    suite = load_suite(args.suite)
    suite = filter_suite(
        suite,
        models=args.models,
        datasets=args.datasets,
        methods=args.methods,
        metrics=args.metrics,
    )
    if args.seed is not None:
        suite = dataclasses.replace(suite, seed=args.seed)
    if args.max_images is not None:
        if args.max_images < 1:
            raise UserError(f"--max-images must be >= 1, got {args.max_images}")
        suite = dataclasses.replace(
            suite, eval=dataclasses.replace(suite.eval, max_images=args.max_images)
        )
    device = check_device(args.device)
    if args.data_root and not Path(args.data_root).is_dir():
        raise UserError(f"--data-root {args.data_root} is not a directory")
    planned = plan(suite, data_root=args.data_root)
    if args.dry_run:
        print(format_plan(suite, planned))
        return 0
    missing = {g.dataset: g.data for g in planned if g.data.startswith("missing")}
    if args.strict and missing:
        raise UserError(
            "--strict: " + "; ".join(f"dataset {name} {why}" for name, why in missing.items())
        )

    run_dir = (
        Path(args.out) if args.out else Path("results") / f"{suite.name}-{suite.config_hash()}"
    )
    store = RunStore(run_dir)
    store.prepare()
    with store.lock():
        if n_partial := remove_partial_writes(store):
            log(f"removed {n_partial} partial write(s) left by an interrupted run")
        started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        manifest = {
            "run_id": run_dir.name,
            "suite": suite.resolved(),
            "suite_files": suite.source,
            "versions": versions(),
            "git": git_hash(),
            "seed": suite.seed,
            "host": platform.node(),
            "platform": platform.platform(),
            "device": device,
            "data_root": args.data_root,
            "executor": args.executor,
            "ray_address": args.ray_address,
            "started": started,
            "status": "running",
            "groups": {},
        }
        atomic_write_text(run_dir / "manifest.json", json.dumps(manifest, indent=2, default=str))
        specs = group_specs(
            suite,
            device=device,
            data_root=args.data_root,
            cache_dir=args.cache,
            progress=not args.no_progress,
        )
        skipped: dict[str, str] = {}
        todo = []
        for spec in specs:
            key = f"{spec.model.label}--{spec.dataset.label}"
            if store.has_group(spec.model.label, spec.dataset.label):
                log(f"{key}: already stored, skipped")
                manifest["groups"][key] = "stored earlier"
            else:
                todo.append(spec)
        log(f"{len(todo)} group(s) to run on the {args.executor} executor")
        groups = run_groups(
            todo, executor=args.executor, ray_address=args.ray_address, num_cpus=args.num_cpus
        )
        # closing: an interrupt or error cancels running tasks (and stops a Ray we started)
        with contextlib.closing(groups):
            for i, (spec, result) in enumerate(groups, 1):
                key = f"{spec.model.label}--{spec.dataset.label}"
                log(f"[{i}/{len(todo)}] {key} done")
                if result.skipped:
                    skipped[spec.dataset.label] = result.skipped
                    log(f"  skipped: {result.skipped}")
                store.write_group(
                    spec.model.label,
                    spec.dataset.label,
                    rows=result.rows,
                    curves=result.curves,
                    cells=result.cells,
                    report=result.report,
                    examples=result.examples,
                )
                manifest["groups"][key] = "skipped" if result.skipped else "done"

        rows, cells, curves = store.read("rows"), store.read("cells"), store.read("curves")
        regs = registries()
        infos = {c.label: regs["metrics"].get(c.use).info for c in suite.metrics}
        directions = {label: info.higher_is_better for label, info in infos.items()}
        table = aggregate(rows, cells, directions, seed=suite.seed)
        # host measurements (wall time) differ between runs: kept out of leaderboard.csv
        host = sorted(label for label, info in infos.items() if info.host_dependent)
        reproducible, host_table = split_host_dependent(table, host)
        notes = [
            f"suite {suite.name} v{suite.version}, seed {suite.seed}, {suite.eval.max_images} images per model x dataset"
        ]
        if note := host_note(set(host_table["metric"])):
            notes.append(note)
        notes += [f"dataset {name} skipped: {why}" for name, why in sorted(skipped.items())]
        atomic_write_parquet(run_dir / "rows.parquet", rows)
        atomic_write_parquet(run_dir / "cells.parquet", cells)
        atomic_write_parquet(run_dir / "curves.parquet", curves)
        atomic_write_text(run_dir / CSV_NAME, to_csv(reproducible))
        atomic_write_text(run_dir / HOST_CSV_NAME, to_csv(host_table))
        title = f"Leaderboard: {suite.name}"
        # the model comparison of the X-ray study: accuracy, recall, F1 beside AOPC
        aopc = [c.label for c in suite.metrics if c.use == "aopc_morf"]
        compare = next((c.label for c in suite.metrics if c.options.get("correct_only")), None)
        atomic_write_text(
            run_dir / "leaderboard.md",
            to_markdown(
                table,
                title=title,
                reports=store.reports(),
                notes=notes,
                compare_metric=compare or (aopc[0] if aopc else None),
            ),
        )
        atomic_write_text(
            run_dir / "leaderboard.tex",
            to_latex(table, title=title, reports=store.reports(), notes=notes),
        )
        errors = cells[cells["status"] == "error"]
        manifest.update(
            finished=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            status="failed cells" if len(errors) else "finished",
            skipped_datasets=skipped,
            models=store.reports(),
        )
        atomic_write_text(run_dir / "manifest.json", json.dumps(manifest, indent=2, default=str))
    log(f"results: {run_dir}/leaderboard.md")
    if len(errors):
        log(
            f"{len(errors)} cell(s) failed; see the 'error' cells in {run_dir}/cells.parquet and the log above"
        )
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.list:
            print(list_entries(args.list))
            return 0
        if not args.suite:
            raise UserError("give --suite NAME (see --list suites) or --list WHAT")
        return run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted: finished groups are stored; rerun the same command to resume",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
