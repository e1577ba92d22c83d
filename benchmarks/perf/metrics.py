"""``python -m benchmarks.perf_metrics``: how fast is AOPC-MoRF, against its own forward
passes and against Quantus ``RegionPerturbation`` at the same settings, in one run on this
machine.

Setting (the issue's): torchvision resnet18 (random init, eval, 3 channels, 1000 classes) at
96 x 96, regions of 16 x 16 pixels on a grid, the first 20 regions perturbed (black), a
batch of 32 images, logits scored. Three timings, interleaved per repeat so a shared CPU
slows them alike, median over repeats after one warm-up:

- forwards: the B x 20 perturbed images the metric needs, through the model in forwards of
  the metric's batch size under ``torch.inference_mode()``, inputs prepared beforehand:
  the floor any implementation pays;
- ours: ``metrics.faithfulness.aopc_morf`` (the unperturbed logits come with the context,
  as in the runner);
- quantus: ``quantus.RegionPerturbation(patch_size=16, regions_evaluation=20,
  perturb_baseline=0.0)``, softmax off, one call on the whole batch.

The two metrics' outputs are compared as a sanity check (Quantus returns the drops
f(x) - f(x^(k)), ours the curve f(x^(k))). Targets: ours <= 1.1 x forwards, ours <= quantus.

Examples::

    python -m benchmarks.perf_metrics --out results/perf_metrics.md
    python -m benchmarks.perf_metrics --out results/perf_metrics.md --quick
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torchvision

from cambench.metrics.base import MetricContext
from cambench.metrics.faithfulness import aopc_morf

TARGET_VS_FORWARDS = 1.1


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.perf_metrics", description=__doc__.splitlines()[0]
    )
    p.add_argument(
        "--out", type=Path, default=Path("results/perf_metrics.md"), help="Markdown report to write"
    )
    p.add_argument(
        "--quick", action="store_true", help="4 images, 1 repeat: checks the script runs"
    )
    p.add_argument(
        "--batch", type=int, default=None, help="images per metric call (default 32; quick 4)"
    )
    p.add_argument(
        "--forward-batch", type=int, default=None, help="images per forward (default: --batch)"
    )
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5; quick 1)")
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--region", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)"
    )
    p.add_argument("--no-quantus", action="store_true", help="skip the Quantus timing")
    args = p.parse_args(argv)
    args.batch = args.batch or (4 if args.quick else 32)
    args.forward_batch = args.forward_batch or args.batch
    args.repeats = args.repeats or (1 if args.quick else 5)
    for name in ("batch", "forward_batch", "repeats", "size", "region", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def build(args: argparse.Namespace):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(args.batch, 3, args.size, args.size, generator=g)
    maps = torch.rand(args.batch, args.size, args.size, generator=g)
    with torch.inference_mode():
        logits = model(x)
    target = logits.argmax(1)
    ctx = MetricContext(
        model=model,
        x=x,
        labels=target.clone(),
        target=target,
        maps=maps,
        logits=logits,
        ids=[f"img{i}" for i in range(args.batch)],
        batch_size=args.forward_batch,
    )
    return model, ctx


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, ctx = build(args)
    n_regions = (-(-args.size // args.region)) ** 2
    steps = min(args.steps, n_regions)

    # The floor: the same number of images through the same model at the same batch size.
    stream = ctx.x.repeat(steps, 1, 1, 1)

    def forwards():
        with torch.inference_mode():
            for chunk in stream.split(args.forward_batch):
                model(chunk)

    def ours():
        return aopc_morf(ctx, region=args.region, steps=steps, perturbation="zero").curves["morf"]

    runs: dict[str, Callable[[], object]] = {"forwards": forwards, "ours": ours}
    if not args.no_quantus:
        import quantus

        metric = quantus.RegionPerturbation(
            patch_size=args.region,
            regions_evaluation=steps,
            perturb_baseline=0.0,
            normalise=False,
            disable_warnings=True,
            display_progressbar=False,
        )
        x_np, y_np = ctx.x.numpy(), ctx.target.numpy()
        a_np = ctx.maps[:, None].numpy()

        def quantus_run():
            return np.asarray(
                metric(
                    model=model,
                    x_batch=x_np,
                    y_batch=y_np,
                    a_batch=a_np,
                    softmax=False,
                    device="cpu",
                    batch_size=args.batch,
                )
            )

        runs["quantus"] = quantus_run

    outputs = {name: fn() for name, fn in runs.items()}  # warm-up
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            seconds, _ = timed(fn)
            times[name].append(seconds)
    ms = {name: 1000 * statistics.median(t) / args.batch for name, t in times.items()}

    lines = [
        "# AOPC-MoRF speed",
        "",
        f"{dt.datetime.now().isoformat(timespec='seconds')}, {cpu_name()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), python {platform.python_version()}"
        + (", **quick run**" if args.quick else ""),
        "",
        f"resnet18 (random init, eval) at {args.size}x{args.size}, {steps} regions of "
        f"{args.region}x{args.region} perturbed (black), {args.batch} images per call, "
        f"{args.forward_batch} images per forward, median of {args.repeats} repeats after a warm-up.",
        "",
        "| what | ms per image |",
        "|---|---:|",
        f"| forwards ({steps} per image, inference_mode) | {ms['forwards']:.1f} |",
        f"| ours: metrics.faithfulness.aopc_morf | {ms['ours']:.1f} |",
    ]
    if "quantus" in ms:
        lines.append(f"| quantus.RegionPerturbation | {ms['quantus']:.1f} |")
    ratio_fwd = ms["ours"] / ms["forwards"]
    lines += [
        "",
        f"- ours / forwards: {ratio_fwd:.3f} (target <= {TARGET_VS_FORWARDS}: "
        f"{'met' if ratio_fwd <= TARGET_VS_FORWARDS else 'NOT met'})",
    ]
    if "quantus" in ms:
        ratio_q = ms["ours"] / ms["quantus"]
        drops = outputs["ours"][:, :1] - outputs["ours"][:, 1:]
        diff = float(np.abs(drops - outputs["quantus"]).max())
        lines += [
            f"- ours / quantus: {ratio_q:.3f} (target <= 1: {'met' if ratio_q <= 1 else 'NOT met'})",
            f"- same output: max |ours - quantus| over the logit drops = {diff:.2e}",
        ]
    report = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    tmp.write_text(report)
    tmp.replace(args.out)
    print(report, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
