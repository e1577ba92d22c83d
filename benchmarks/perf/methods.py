"""Speed of our CAM methods against captum, pytorch-grad-cam and torchcam, side by side in
one run on one machine, measured against the cost floor each method cannot beat.

    python -m benchmarks.perf_methods --out results/perf_methods.md [--quick]

Settings: ResNet18 and DenseNet121 (random init, eval) at 96x96 batch 32 and 224x224
batch 8 (``--quick``: ResNet18 at 96x96 only, fewer repeats). For every row: the median
seconds per batch over repeats after a warm-up (synchronized on GPU), seconds per image,
and the ratio to the floor, the time of one forward and one backward to the input of the
same model and batch. Score-CAM and occlusion are also compared with the forward passes they
need (1 + K masked images, resp. 1 + n_windows, per image), timed as plain forwards in the
same chunk size just before and just after each of them; a rival implementation is compared
through that ratio, so the machine's drift between rows timed minutes apart cancels. Those
rows may run on a subset of the batch, scaled to the batch; the table says so. Masked
images per forward are ``CHUNK`` for every implementation. The same forwards with the masked
images in channels-last memory, as ours lay them out on the CPU, are a row of their own, so
the table separates what the layout gains from what the method adds.

A library call that fails is a row with its error, not a crash.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import inspect
import io
import math
import os
import platform
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from cambench.benchmarks.core.errors import UserError
from cambench.benchmarks.core.files import atomic_write
from cambench.benchmarks.engine.group import check_device
from cambench.cams import METHODS
from cambench.cams.gradient_cams import gradient_cams
from cambench.metrics.cost import timed

CHUNK = 64  # masked images per forward, for every implementation of Score-CAM and occlusion
WINDOW, STRIDE = 16, 8
LAYERS = {"resnet18": "layer4", "densenet121": "features"}
CHANNELS_LAST = "forwards only, channels-last"


@dataclass(frozen=True)
class Setting:
    arch: str
    size: int
    batch: int


@dataclass(frozen=True)
class Budget:
    """Repeats for the cheap rows, and for the rows of many forwards (run on a subset)."""

    warmup: int
    repeats: int
    heavy_repeats: int
    heavy_images: int  # masked images per repeat at most, which sets the subset size


FULL = Budget(warmup=2, repeats=7, heavy_repeats=3, heavy_images=4096)
QUICK = Budget(warmup=1, repeats=3, heavy_repeats=1, heavy_images=512)


@dataclass
class Context:
    model: nn.Module
    layer_name: str
    layer: nn.Module
    x: torch.Tensor
    target: torch.Tensor
    channels: int  # K, the target layer's channels
    n_windows: int


@dataclass
class Row:
    method: str
    impl: str
    images: int
    seconds: float | None = None  # per batch, scaled from the subset when images < batch
    paired: float | None = None  # median of time / the forwards timed around it, per repeat
    note: str = ""
    kind: str = ""


@dataclass
class Case:
    """One row to time. ``make`` builds the call for (context, x, target)."""

    method: str
    impl: str
    make: Callable[[Context], Callable[[torch.Tensor, torch.Tensor], object]] | None
    kind: str = ""  # "scorecam" or "occlusion": many forwards, subset and forwards ratio


def _error(exc: Exception) -> str:
    return f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"


# --- the calls ------------------------------------------------------------------------------


def floor_call(ctx: Context):
    """One forward and one backward to the input: what any gradient method must at least do."""

    def run(x, t):
        xi = x.detach().requires_grad_(True)
        out = ctx.model(xi)
        torch.autograd.grad(out.gather(1, t[:, None]).sum(), xi)

    return run


def ours(name: str, **options) -> Callable[[Context], Callable] | None:
    """A registered method called with those of ``options`` its signature takes."""
    if name not in METHODS:
        return None
    fn = METHODS.get(name).obj
    accepted = inspect.signature(fn).parameters

    def make(ctx: Context):
        opts = {k: v for k, v in options.items() if k in accepted}
        if "layer" in accepted and "layer" not in opts:
            opts["layer"] = ctx.layer_name
        return lambda x, t: fn(ctx.model, x, t, **opts)

    return make


def ours_one_pass(ctx: Context):
    return lambda x, t: gradient_cams(ctx.model, x, t, layer=ctx.layer_name)


def captum_gradcam(ctx: Context):
    from captum.attr import LayerAttribution, LayerGradCam

    def run(x, t):
        attr = LayerGradCam(ctx.model, ctx.layer).attribute(x, target=t, relu_attributions=True)
        return LayerAttribution.interpolate(attr, tuple(x.shape[-2:]), interpolate_mode="bilinear")

    return run


def captum_occlusion(ctx: Context):
    from captum.attr import Occlusion

    def run(x, t):
        c = x.shape[1]
        # captum's perturbations_per_eval counts per image: CHUNK images per forward in all.
        return Occlusion(ctx.model).attribute(
            x,
            target=t,
            sliding_window_shapes=(c, WINDOW, WINDOW),
            strides=(c, STRIDE, STRIDE),
            baselines=0.0,
            perturbations_per_eval=max(1, CHUNK // x.shape[0]),
        )

    return run


def captum_guided_backprop(ctx: Context):
    from captum.attr import GuidedBackprop

    return lambda x, t: GuidedBackprop(ctx.model).attribute(x, target=t)


def pgc(class_name: str):
    def make(ctx: Context):
        import pytorch_grad_cam
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        cls = getattr(pytorch_grad_cam, class_name)

        def run(x, t):
            # Its ScoreCAM draws a tqdm progress bar per image on stderr: keep the log readable.
            with cls(ctx.model, [ctx.layer]) as cam, contextlib.redirect_stderr(io.StringIO()):
                cam.batch_size = CHUNK  # read by its ScoreCAM only
                out = cam(x, [ClassifierOutputTarget(int(c)) for c in t])
            ctx.model.zero_grad(set_to_none=True)  # it calls loss.backward()
            return out

        return run

    return make


def torchcam_gradcam(ctx: Context):
    from torchcam.methods import GradCAM

    def run(x, t):
        with GradCAM(ctx.model, target_layer=ctx.layer_name, input_shape=tuple(x.shape[1:])) as ext:
            scores = ctx.model(x)
            (cam,) = ext(class_idx=t.tolist(), scores=scores)
        return F.interpolate(
            cam[:, None], size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False
        )

    return run


def torchcam_scorecam(ctx: Context):
    from torchcam.methods import ScoreCAM

    def run(x, t):
        with ScoreCAM(
            ctx.model, target_layer=ctx.layer_name, batch_size=CHUNK, input_shape=tuple(x.shape[1:])
        ) as ext:
            with torch.inference_mode():
                ctx.model(x)
            (cam,) = ext(class_idx=t.tolist())
        return F.interpolate(
            cam[:, None], size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False
        )

    return run


def plain_forwards(ctx: Context, per_image: int, *, channels_last: bool = False):
    """The forwards a perturbation method needs for n images: n clean images in one forward,
    then n * per_image masked images in forwards of CHUNK, under inference mode; the masked
    images in channels-last memory if asked (as ``cams.base.input_buffer`` lays them out on
    the CPU)."""
    layout = torch.channels_last if channels_last else torch.contiguous_format

    def run(x, t):
        n = x.shape[0]
        buffer = torch.rand((CHUNK, *x.shape[1:]), device=x.device).contiguous(memory_format=layout)
        with torch.inference_mode():
            ctx.model(x)
            left = n * per_image
            while left > 0:
                ctx.model(buffer[: min(CHUNK, left)])
                left -= CHUNK

    return run


def cases() -> list[Case]:
    rows = [Case("floor: 1 forward + 1 backward to the input", "-", floor_call)]
    for name in ("gradcam", "gradcampp", "xgradcam", "hirescam", "layercam"):
        rows.append(Case(name, "ours", ours(name)))

    def channels_last_forwards(kind: str) -> Case:
        return Case(
            kind,
            CHANNELS_LAST,
            lambda ctx: plain_forwards(ctx, masked_per_image(ctx, kind), channels_last=True),
            kind=kind,
        )

    rows += [
        Case("gradient_cams: 5 variants, one pass", "ours", ours_one_pass),
        Case("gradcam", "captum LayerGradCam", captum_gradcam),
        Case("gradcam", "pytorch-grad-cam GradCAM", pgc("GradCAM")),
        Case("gradcam", "torchcam GradCAM", torchcam_gradcam),
        Case("gradcampp", "pytorch-grad-cam GradCAMPlusPlus", pgc("GradCAMPlusPlus")),
        Case("scorecam", "ours", ours("scorecam", batch_size=CHUNK), kind="scorecam"),
        Case("scorecam", "pytorch-grad-cam ScoreCAM", pgc("ScoreCAM"), kind="scorecam"),
        Case("scorecam", "torchcam ScoreCAM", torchcam_scorecam, kind="scorecam"),
        channels_last_forwards("scorecam"),
        Case(
            "occlusion",
            "ours",
            ours("occlusion", window=WINDOW, stride=STRIDE, baseline=0.0, batch_size=CHUNK),
            kind="occlusion",
        ),
        Case("occlusion", "captum Occlusion", captum_occlusion, kind="occlusion"),
        channels_last_forwards("occlusion"),
        Case("guided_backprop", "ours", ours("guided_backprop")),
        Case("guided_backprop", "captum GuidedBackprop", captum_guided_backprop),
        Case("guided_gradcam", "ours", ours("guided_gradcam")),
    ]
    return rows


# --- running a setting ------------------------------------------------------------------------


def build_context(setting: Setting, device: torch.device) -> Context:
    torch.manual_seed(0)
    model = getattr(torchvision.models, setting.arch)(weights=None).eval().to(device)
    layer_name = LAYERS[setting.arch]
    layer = dict(model.named_modules())[layer_name]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(setting.batch, 3, setting.size, setting.size, generator=gen).to(device)
    target = torch.randint(0, 1000, (setting.batch,), generator=gen).to(device)
    shapes = []
    handle = layer.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    try:
        with torch.inference_mode():
            model(x[:1])
    finally:
        handle.remove()
    per_axis = math.ceil((setting.size - WINDOW) / STRIDE) + 1
    return Context(model, layer_name, layer, x, target, shapes[0][1], per_axis * per_axis)


def masked_per_image(ctx: Context, kind: str) -> int:
    return ctx.channels if kind == "scorecam" else ctx.n_windows


def subset_size(ctx: Context, kind: str, budget: Budget) -> int:
    """Images to time a heavy row on: as many as fit ``budget.heavy_images`` masked images."""
    per_image = masked_per_image(ctx, kind) + 1
    return max(1, min(ctx.x.shape[0], budget.heavy_images // per_image))


def run_setting(
    setting: Setting, budget: Budget, device: torch.device, log: Callable[[str], None]
) -> tuple[Context, list[Row]]:
    """Time every case of one setting.

    The cheap rows are timed round-robin (one repeat of every row, then the next round), so
    a change in the machine's load during the run hits every row alike, the floor included.
    The heavy rows (Score-CAM, occlusion) likewise, each repeat between two runs of the
    plain forwards it is compared to.
    """
    ctx = build_context(setting, device)
    batch = ctx.x.shape[0]
    rows: list[Row] = []
    cheap: list[tuple[Row, Callable]] = []
    heavy: list[tuple[Row, Callable]] = []
    for case in cases():
        row = Row(case.method, case.impl, 0, kind=case.kind)
        rows.append(row)
        if case.make is None:
            row.note = "not registered"
            continue
        try:
            call = case.make(ctx)
        except Exception as exc:  # a library that fails here is a finding, not a crash
            row.note = _error(exc)
            continue
        (heavy if case.kind else cheap).append((row, call))

    tag = f"{setting.arch} {setting.size}px b{batch}"
    times: dict[int, list[float]] = {id(row): [] for row, _ in cheap}
    live = list(cheap)
    for rep in range(-budget.warmup, budget.repeats):  # negative rounds are the warm-up
        log(
            f"  {tag}: {'warm-up' if rep < 0 else f'repeat {rep + 1}/{budget.repeats}'} of {len(live)} rows"
        )
        for row, call in list(live):
            try:
                elapsed = timed(partial(call, ctx.x, ctx.target), device)
            except Exception as exc:
                row.note = _error(exc)
                live.remove((row, call))
                continue
            if rep >= 0:
                times[id(row)].append(elapsed)
    for row, _ in live:
        row.images, row.seconds = batch, statistics.median(times[id(row)])

    # Heavy rows round-robin too. Per round and kind, the plain forwards are timed before
    # the first row and after every row; each row is compared to the mean of the two runs
    # of the forwards around it, so the machine's drift over the minutes of a round cancels
    # (a separate reference a few minutes away differed by up to 23% on this machine).
    samples: dict[int, list[tuple[float, float]]] = {id(row): [] for row, _ in heavy}
    live = list(heavy)
    kinds = list(dict.fromkeys(row.kind for row, _ in heavy))
    for rep in range(budget.heavy_repeats):  # the first of many chunks is the warm-up
        for kind in kinds:
            n = subset_size(ctx, kind, budget)
            x, t = ctx.x[:n], ctx.target[:n]
            reference = partial(plain_forwards(ctx, masked_per_image(ctx, kind)), x, t)
            log(f"  {tag}: plain forwards for {kind} on {n} image(s), repeat {rep + 1}")
            before = timed(reference, device)
            for row, call in [(r, c) for r, c in live if r.kind == kind]:
                log(f"  {tag}: {row.method} [{row.impl}] on {n} image(s), repeat {rep + 1}")
                try:
                    method_s = timed(partial(call, x, t), device)
                except Exception as exc:
                    row.note = _error(exc)
                    live.remove((row, call))
                    continue
                after = timed(reference, device)
                samples[id(row)].append((method_s, (before + after) / 2))
                before = after
    for row, _ in live:
        n = subset_size(ctx, row.kind, budget)
        pairs = samples[id(row)]
        row.images = n
        row.seconds = statistics.median(m for m, _ in pairs) * batch / n
        row.paired = statistics.median(m / f for m, f in pairs)
        if n < batch:
            row.note = f"timed on {n} of {batch} images, scaled x{batch / n:g}"
    return ctx, rows


# --- the report -------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def setting_table(setting: Setting, ctx: Context, rows: list[Row]) -> str:
    floor = rows[0].seconds
    lines = [
        f"### {setting.arch}, {setting.size}x{setting.size}, batch {setting.batch}",
        "",
        f"Target layer `{ctx.layer_name}` ({ctx.channels} channels, so Score-CAM masks "
        f"{ctx.channels} images per image); occlusion {WINDOW}x{WINDOW} windows, stride "
        f"{STRIDE}: {ctx.n_windows} per image; {CHUNK} masked images per forward.",
        "",
        "| method | implementation | images timed | s / batch | s / image | x floor | x forwards needed | note |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        per_image = None if row.seconds is None else row.seconds / setting.batch
        ratio = None if row.seconds is None or not floor else row.seconds / floor
        fwd = row.paired
        lines.append(
            f"| {row.method} | {row.impl} | {row.images} | {_fmt(row.seconds)} | {_fmt(per_image)} "
            f"| {_fmt(ratio)} | {_fmt(fwd)} | {row.note} |"
        )
    return "\n".join(lines)


def _row(rows: list[Row], method: str, impl: str) -> Row | None:
    return next((r for r in rows if r.method == method and r.impl == impl), None)


def _seconds(rows: list[Row], method: str, impl: str) -> float | None:
    row = _row(rows, method, impl)
    return None if row is None else row.seconds


def target_checks(setting: Setting, rows: list[Row]) -> list[str]:
    """The issue's speed targets, met or missed, for one setting."""
    out = []
    tag = f"{setting.arch} {setting.size}px b{setting.batch}"
    floor = rows[0].seconds
    ours_gradcam = _seconds(rows, "gradcam", "ours")
    one_pass = _seconds(rows, "gradient_cams: 5 variants, one pass", "ours")

    def check(label: str, value: float | None, limit: float) -> None:
        if value is not None:
            out.append(
                f"| {tag} | {label} | {value:.4f} | <= {limit:g} | {'met' if value <= limit else 'MISSED'} |"
            )

    if floor and ours_gradcam:
        check("Grad-CAM / floor", ours_gradcam / floor, 1.1)
    if ours_gradcam and one_pass:
        check("five gradient CAMs, one pass / one Grad-CAM", one_pass / ours_gradcam, 1.3)
    # Each heavy row is measured against the plain forwards timed around it; two rows of a
    # method compare through those ratios, which the drift between their times cancels.
    for method, rival in (("scorecam", "torchcam ScoreCAM"), ("occlusion", "captum Occlusion")):
        ours_row = _row(rows, method, "ours")
        if ours_row and ours_row.paired:
            check(f"{method} / its forwards", ours_row.paired, 1.1)
            same_layout = _row(rows, method, CHANNELS_LAST)
            if same_layout and same_layout.paired:
                check(
                    f"{method} / its forwards in channels-last",
                    ours_row.paired / same_layout.paired,
                    1.1,
                )
            theirs = _row(rows, method, rival)
            if theirs and theirs.paired:
                check(f"{method} / {rival}", ours_row.paired / theirs.paired, 1.0)
    return out


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def report(
    results, *, budget: Budget, device: torch.device, quick: bool, started: str, load: tuple
) -> str:
    versions = ", ".join(
        f"{d} {_version(d)}" for d in ("torch", "torchvision", "captum", "grad-cam", "torchcam")
    )
    head = [
        "# Speed of the CAM methods, side by side",
        "",
        f"- run: {started} to {dt.datetime.now().isoformat(timespec='seconds')}, "
        f"{'--quick' if quick else 'full'}; `python -m benchmarks.perf_methods`",
        f"- host: {platform.node()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, device {device}; "
        f"load average at start {load[0]:.2f}, at end {os.getloadavg()[0]:.2f}",
        f"- {versions}",
        f"- timing: median of {budget.repeats} repeats after {budget.warmup} warm-up round(s), rows "
        "timed round-robin; rows with many forwards (Score-CAM, occlusion): median of "
        f"{budget.heavy_repeats}, on at most {budget.heavy_images} masked images per repeat, "
        "scaled to the batch, each between two runs of the plain forwards they are compared to",
        "- x floor: time / (1 forward + 1 backward to the input, same model and batch). "
        "x forwards needed: median over repeats of time / (plain forwards of the clean batch "
        "and of its masked images in the same chunk size, the mean of the runs just before "
        "and after); a method against a rival: the ratio of their x forwards needed. "
        f"The rows `{CHANNELS_LAST}` are those forwards with the masked images in "
        "channels-last memory, as our Score-CAM and occlusion lay them out on the CPU.",
        "",
    ]
    body, checks = [], []
    for setting, ctx, rows in results:
        body += [setting_table(setting, ctx, rows), ""]
        checks += target_checks(setting, rows)
    tail = [
        "### Targets (issue)",
        "",
        "| setting | ratio | value | target | |",
        "|---|---|---:|---|---|",
        *checks,
    ]
    return "\n".join(head + body + tail) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.perf_methods", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--out", type=Path, default=Path("results/perf_methods.md"), help="Markdown file to write"
    )
    parser.add_argument(
        "--quick", action="store_true", help="ResNet18 at 96x96 only, fewer repeats"
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument(
        "--heavy-images",
        type=int,
        default=None,
        help="masked images per repeat for Score-CAM and occlusion rows (default: 4096, quick 512)",
    )
    parser.add_argument(
        "--heavy-repeats", type=int, default=None, help="repeats of those rows (default: 3)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    parser.add_argument(
        "--models",
        default=None,
        help="only these architectures' settings, comma-separated (resnet18, densenet121)",
    )
    args = parser.parse_args(argv)
    try:
        device = torch.device(check_device(args.device))
        if args.threads is not None:
            if args.threads < 1:
                raise UserError(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
    except UserError as exc:
        parser.exit(2, f"error: {exc}\n")
    budget = QUICK if args.quick else FULL
    if args.heavy_images is not None or args.heavy_repeats is not None:
        import dataclasses

        budget = dataclasses.replace(
            budget,
            heavy_images=args.heavy_images or budget.heavy_images,
            heavy_repeats=args.heavy_repeats or budget.heavy_repeats,
        )
    settings = [Setting("resnet18", 96, 32)]
    if not args.quick:
        settings += [
            Setting("resnet18", 224, 8),
            Setting("densenet121", 96, 32),
            Setting("densenet121", 224, 8),
        ]
    if args.models:
        wanted = args.models.split(",")
        unknown = sorted(set(wanted) - {s.arch for s in settings})
        if unknown:
            parser.exit(
                2,
                f"error: --models {','.join(unknown)}: no such setting; "
                f"choose from {', '.join(sorted({s.arch for s in settings}))}\n",
            )
        settings = [s for s in settings if s.arch in wanted]
    started, load = dt.datetime.now().isoformat(timespec="seconds"), os.getloadavg()

    def log(msg: str) -> None:
        print(msg, flush=True)

    results = []
    for setting in settings:
        ctx, rows = run_setting(setting, budget, device, log)
        results.append((setting, ctx, rows))
    text = report(
        results, budget=budget, device=device, quick=args.quick, started=started, load=load
    )
    atomic_write(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
