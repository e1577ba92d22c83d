"""``python -m benchmarks.perf_training``: milliseconds per image of one training step
(forward, backward, AdamW step) of the zoo models, in the default memory format and in
channels-last (what ``benchmarks.models.training.train`` uses), side by side in one run.

The two formats are interleaved per repeat so a shared CPU slows them alike; each figure is
the median over repeats after one warm-up step. The table goes to stdout and, with
``--out``, to a Markdown file.

Examples::

    python -m benchmarks.perf_training
    python -m benchmarks.perf_training --models resnet18,vgg16_bn --sizes 28,64 --out results/perf_training.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from cambench.benchmarks.models.zoo import build_model

FORMATS = {"default": torch.contiguous_format, "channels_last": torch.channels_last}


def step_seconds(
    name: str, size: int, *, batch: int, repeats: int, channels: int = 1, classes: int = 3
) -> dict[str, float]:
    """Median seconds per image of a training step, per memory format."""
    torch.manual_seed(0)
    x = torch.rand(batch, channels, size, size)
    y = torch.randint(0, classes, (batch,))
    setups = {}
    for label, fmt in FORMATS.items():
        model = build_model(name, in_channels=channels, num_classes=classes).train()
        model.to(memory_format=fmt)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        setups[label] = (model, opt, x.contiguous(memory_format=fmt))

    def step(label: str) -> float:
        model, opt, xb = setups[label]
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(xb), y).backward()
        opt.step()
        return time.perf_counter() - start

    for label in setups:  # warm-up
        step(label)
    times: dict[str, list[float]] = {label: [] for label in setups}
    for _ in range(repeats):
        for label in setups:
            times[label].append(step(label))
    return {label: statistics.median(t) / batch for label, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.perf_training",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--models", default="resnet18,densenet121,vgg16_bn,gapcnn")
    p.add_argument("--sizes", default="28,32,64", help="input sizes in pixels, comma-separated")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", help="also write the table to this Markdown file")
    args = p.parse_args(argv)
    lines = [
        f"# Training step, ms per image (batch {args.batch}, median of {args.repeats}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()})",
        "",
        "| model | input | default | channels-last | ratio |",
        "|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for name in args.models.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            t = step_seconds(name, size, batch=args.batch, repeats=args.repeats)
            row = (
                f"| {name} | {size} px | {t['default'] * 1e3:.1f} | "
                f"{t['channels_last'] * 1e3:.1f} | {t['channels_last'] / t['default']:.2f} |"
            )
            lines.append(row)
            print(row, flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
