"""Claims from the literature that the harness tests: a registry of claims, each a small
suite (``benchmarks/claims/<file>.toml``) and a rule that reads the run's stored results and
decides whether the claim held here. ``python -m benchmarks.claims`` runs them.

A rule is a function ``rule(evidence) -> Verdict``, registered with its source, the claim in
one sentence, how the protocol here differs from the paper's, and its suite (and the suite
to run instead when the suite's real data is missing). Rules read what the runner stored:
the per-image rows, the cells, the examples' maps (``Evidence.from_run``); paired
comparisons go through ``benchmarks.reports.stats`` (the leaderboard's own tests, Holm's
adjustment within a claim), means' intervals through the leaderboard's bootstrap. A rule
that cannot decide (a cell failed or was not applicable, too few images) raises
``Undecidable`` with the reason: the claim "could not run", which is not "did not hold".

>>> CLAIMS.names()[:3]
['adebayo2018', 'arun2021', 'chattopadhyay2018']
>>> CLAIMS.get("selvaraju2017").info.suite
'selvaraju2017.toml'
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cambench.benchmarks.core.registry import Registry
from cambench.benchmarks.reports.stats import ALPHA, Paired, holm, paired_test

CLAIMS_DIR = Path(__file__).parent / "claims"


@dataclass(frozen=True)
class ClaimInfo:
    """A claim's record: ``source`` (authors, year, title, venue), ``claim`` (one sentence,
    as tested here), ``protocol`` (how this test differs from the paper's: models, data,
    image size, measure), ``suite`` (its file in ``benchmarks/claims/``) and ``fallback``
    (the suite run instead when the suite's real data is missing; "" for none)."""

    source: str
    claim: str
    protocol: str
    suite: str
    fallback: str = ""


CLAIMS: Registry[ClaimInfo] = Registry("claim", ClaimInfo)


class Undecidable(Exception):
    """The results cannot decide the claim; the message says why."""


@dataclass(frozen=True)
class Verdict:
    """A rule's decision: whether the claim held, and the figures it rests on."""

    held: bool
    figures: str


@dataclass(frozen=True)
class Evidence:
    """What a rule reads of a run: ``rows`` and ``cells`` (the store's tables),
    ``metrics`` (label -> the resolved suite entry: ``use`` and options), ``methods``
    (label -> metadata: ``use``, ``family``), ``examples`` (group key -> the arrays of its
    ``examples.npz``), ``reports`` (group key -> its ``model.json``) and the run's seed."""

    rows: pd.DataFrame
    cells: pd.DataFrame
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    examples: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    seed: int = 0

    @classmethod
    def from_run(cls, root: str | Path) -> Evidence:
        """The evidence of the run folder ``root`` (through ``benchmarks.engine.store``)."""
        from cambench.benchmarks.engine.store import RunStore, read_run

        run = read_run(root)
        keys = list(run.manifest.groups)
        store = RunStore(root)
        examples = {}
        for key in keys:
            path = store.group_dir(key) / "examples.npz"
            if path.is_file():
                with np.load(path) as data:
                    examples[key] = {name: data[name] for name in data.files}
        empty = {name: pd.DataFrame() for name in ("rows", "cells")}
        return cls(
            rows=run.rows if run.rows is not None else empty["rows"],
            cells=run.cells if run.cells is not None else empty["cells"],
            metrics=dict(run.manifest.suite.get("metrics") or {}),
            methods=dict(run.manifest.methods),
            examples=examples,
            reports=store.reports(keys),
            seed=run.manifest.seed,
        )

    def groups(self) -> list[tuple[str, str]]:
        """The (model, dataset) groups of the run, in the run's order."""
        if not len(self.cells):
            raise Undecidable("the run holds no results")
        pairs = self.cells[["model", "dataset"]].drop_duplicates()
        return [(str(m), str(d)) for m, d in pairs.itertuples(index=False)]

    def labels(self, use: str) -> list[str]:
        """The labels of the metric entries that use the registered metric ``use``."""
        found = [label for label, entry in self.metrics.items() if entry.get("use", label) == use]
        if not found:
            raise Undecidable(f"the suite has no {use} entry")
        return found

    def option(self, metric: str, name: str, default: Any = None) -> Any:
        return (self.metrics.get(metric) or {}).get(name, default)

    def require(self, model: str, dataset: str, method: str, metric: str) -> int:
        """The number of images the cell scored; ``Undecidable`` unless the cell is ok."""
        c = self.cells
        hit = c[
            (c["model"] == model)
            & (c["dataset"] == dataset)
            & (c["method"] == method)
            & (c["metric"] == metric)
        ]
        if not len(hit):
            raise Undecidable(f"{method} x {metric} on {model}/{dataset} is not in the results")
        cell = hit.iloc[0]
        if cell["status"] != "ok":
            why = f": {cell['reason']}" if cell.get("reason") else ""
            raise Undecidable(f"{method} x {metric} on {model}/{dataset} is {cell['status']}{why}")
        return int(cell["n"])

    def scores(
        self, model: str, dataset: str, method: str, metric: str, output: str = "value"
    ) -> pd.Series:
        """Per-image scores of a cell (index: sample id), after checking the cell is ok."""
        self.require(model, dataset, method, metric)
        r = self.rows
        hit = r[
            (r["model"] == model)
            & (r["dataset"] == dataset)
            & (r["method"] == method)
            & (r["metric"] == metric)
            & (r["output"] == output)
        ]
        return hit.groupby("sample_id", sort=True)["value"].first().astype(np.float64)

    def compare(
        self,
        model: str,
        dataset: str,
        metric: str,
        a: str,
        b: str,
        *,
        lower_is_better: bool,
        metric_b: str | None = None,
    ) -> Comparison:
        """Method ``a`` against ``b`` on ``metric`` (or ``a``'s ``metric`` against ``b``'s
        ``metric_b``), paired on the images both scored."""
        sa = self.scores(model, dataset, a, metric)
        sb = self.scores(model, dataset, b, metric_b or metric)
        return Comparison.of(sa, sb, lower_is_better=lower_is_better, seed=self.seed)


@dataclass(frozen=True)
class Comparison:
    """A paired comparison of ``a`` and ``b`` (``test``: the harness's paired test of them,
    signed so that a positive mean difference means ``a`` is better) and their means on the
    paired images; ``p_adj`` after Holm's adjustment within the claim (``decide``)."""

    mean_a: float
    mean_b: float
    test: Paired
    p_adj: float | None = None

    @classmethod
    def of(cls, a: pd.Series, b: pd.Series, *, lower_is_better: bool, seed: int) -> Comparison:
        both = a.index.intersection(b.index)
        va, vb = a.loc[both].to_numpy(), b.loc[both].to_numpy()
        sign = -1.0 if lower_is_better else 1.0
        test = paired_test(sign * va, sign * vb, seed=seed)
        mean = lambda v: float(np.mean(v)) if len(v) else math.nan  # noqa: E731
        return cls(mean(va), mean(vb), test)

    @property
    def a_better(self) -> bool:
        """``a`` significantly better than ``b`` (after the adjustment)."""
        p = self.test.p if self.p_adj is None else self.p_adj
        return p is not None and p < ALPHA and self.test.mean > 0

    def p_text(self) -> str:
        p = self.test.p if self.p_adj is None else self.p_adj
        if p is None:
            return f"n={self.test.n}, {self.test.test}"
        holm_ = "Holm " if self.p_adj is not None else ""
        return f"n={self.test.n}, {holm_}p{pvalue(p)}"


def decide(comparisons: list[Comparison]) -> list[Comparison]:
    """The comparisons with their p-values Holm-adjusted together (one claim, one family);
    ``Undecidable`` when one of them has too few images for a test."""
    for c in comparisons:
        if not c.test.decided:
            raise Undecidable(f"a comparison has {c.test.n} paired images: too few for a test")
    adjusted = holm([c.test.p for c in comparisons])
    return [
        Comparison(c.mean_a, c.mean_b, c.test, p)
        for c, p in zip(comparisons, adjusted, strict=True)
    ]


def num(x: float) -> str:
    """A figure with 3 significant digits.

    >>> num(0.123456), num(12.3456), num(-0.000012345)
    ('0.123', '12.3', '-1.23e-05')
    """
    return "nan" if x is None or not math.isfinite(x) else f"{x:.3g}"


def pvalue(p: float) -> str:
    """``<0.001`` or ``=0.012``."""
    return "<0.001" if p < 0.001 else f"={p:.2g}"


def claim(name: str, **info: Any) -> Callable[[Callable[[Evidence], Verdict]], Any]:
    """Register a rule as the claim ``name`` (``ClaimInfo`` fields as keywords)."""
    return CLAIMS.register(name, **info)


# --- the claims ---------------------------------------------------------------------------


@claim(
    "adebayo2018",
    source="Adebayo et al. 2018, Sanity checks for saliency maps (NeurIPS)",
    claim="After cascading randomization of the weights, Grad-CAM's maps change more than "
    "guided backprop's and Guided Grad-CAM's",
    protocol="ResNet-18 (quarter width) trained on BUSI ultrasound at 32 px (the paper: "
    "Inception v3 on ImageNet at 299 px); Spearman similarity of |map| "
    "to the original after every layer is re-initialized (the paper's endpoint), averaged "
    "over 3 random draws of the weights, on 64 test images; lower = changed more",
    suite="adebayo2018.toml",
    fallback="adebayo2018-synth.toml",
)
def adebayo2018(ev: Evidence) -> Verdict:
    """Grad-CAM's similarity after randomization is lower than guided backprop's and Guided
    Grad-CAM's, each by the paired test (Holm over all comparisons)."""
    metric = ev.labels("model_randomization")[0]
    others = ("guided_backprop", "guided_gradcam")
    tests = {
        (g, o): ev.compare(*g, metric, "gradcam", o, lower_is_better=True)
        for g in ev.groups()
        for o in others
    }
    tests = dict(zip(tests, decide(list(tests.values())), strict=True))
    parts = []
    for g in ev.groups():
        vs = ", ".join(
            f"{o} {num(tests[(g, o)].mean_b)} ({tests[(g, o)].p_text()})" for o in others
        )
        parts.append(f"{g[0]}/{g[1]}: Spearman gradcam {num(tests[(g, others[0])].mean_a)}; {vs}")
    return Verdict(all(t.a_better for t in tests.values()), "; ".join(parts))


@claim(
    "samek2017",
    source="Samek et al. 2017, Evaluating the visualization of what a deep neural network "
    "has learned (IEEE TNNLS)",
    claim="Perturbing regions in a good method's MoRF order lowers the score faster than in "
    "random order (AOPC), and ABPC depends on the perturbation, blur giving the smallest",
    protocol="Grad-CAM on a 4-layer GAP CNN and ResNet-18 (quarter width) trained on "
    "synth-lesion at 32 px (the paper: LRP and others on ImageNet, SUN397, Places with "
    "CaffeNet/GoogleNet); 4 x 4 regions (the paper: 9 x 9 at 224 px), uniform noise, 16 "
    "steps for AOPC; ABPC over the whole curve with zero, mean, uniform, Gaussian (std 0.1) "
    "and blur (sigma 5) perturbations; 64 test images",
    suite="samek2017.toml",
)
def samek2017(ev: Evidence) -> Verdict:
    """AOPC-MoRF of Grad-CAM above random's; blur's ABPC the smallest mean and below every
    other perturbation's by the paired test (Holm over all comparisons of the claim)."""
    aopc = ev.labels("aopc_morf")[0]
    abpc = ev.labels("abpc")
    blur = [m for m in abpc if ev.option(m, "perturbation", "gaussian") == "blur"]
    if not blur or len(abpc) < 2:
        raise Undecidable("the suite needs an abpc entry with perturbation blur and another")
    rest = [m for m in abpc if m not in blur]
    tests: dict[tuple, Comparison] = {}
    for g in ev.groups():
        tests[(g, "aopc")] = ev.compare(*g, aopc, "gradcam", "random", lower_is_better=False)
        for m in rest:
            tests[(g, m)] = ev.compare(
                *g, blur[0], "gradcam", "gradcam", lower_is_better=True, metric_b=m
            )
    tests = dict(zip(tests, decide(list(tests.values())), strict=True))
    parts = []
    for g in ev.groups():
        a = tests[(g, "aopc")]
        means = {m: tests[(g, m)].mean_b for m in rest} | {blur[0]: tests[(g, rest[0])].mean_a}
        order = sorted(means, key=means.get)
        abpc_text = ", ".join(
            f"{ev.option(m, 'perturbation', 'gaussian')} {num(means[m])}" for m in order
        )
        if order[0] == blur[0]:
            where = f"blur smallest, below the next by {tests[(g, order[1])].p_text()}"
        else:
            where = f"blur {order.index(blur[0]) + 1} of {len(order)} from the smallest"
        parts.append(
            f"{g[0]}/{g[1]}: AOPC gradcam {num(a.mean_a)} vs random {num(a.mean_b)} "
            f"({a.p_text()}); ABPC {abpc_text} ({where})"
        )
    held = all(t.a_better for t in tests.values())
    return Verdict(held, "; ".join(parts))


def upsampling_matrix(layer: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """The harness's map upsampling (``cams.base.upsample``) from ``layer`` (h, w) to
    ``size`` (H, W) as an (H*W, h*w) matrix (it is linear)."""
    import torch

    from cambench.cams.base import upsample

    h, w = layer
    basis = torch.eye(h * w, dtype=torch.float64).reshape(h * w, h, w)
    return upsample(basis, size).reshape(h * w, -1).T.numpy()


def relu_cam_gap(cam: np.ndarray, gradcam: np.ndarray) -> tuple[float, float, tuple[int, int]]:
    """How far Grad-CAM's maps are from ReLU(CAM) up to one positive factor, from the maps
    at input resolution (B, H, W) of both: CAM's layer map is recovered by least squares
    through the upsampling (the coarsest layer size that reproduces CAM's maps exactly),
    rectified, upsampled again and scaled by the least-squares factor k over all images.
    Returns (max |k ReLU(CAM) - Grad-CAM| / max |Grad-CAM|, k, the layer size).

    >>> rng = np.random.default_rng(0)
    >>> U = upsampling_matrix((4, 4), (32, 32))
    >>> c = rng.normal(size=(3, 16))
    >>> cam = (c @ U.T).reshape(3, 32, 32)
    >>> gap, k, layer = relu_cam_gap(cam, 0.5 * (np.maximum(c, 0) @ U.T).reshape(3, 32, 32))
    >>> gap < 1e-12, round(k, 6), layer
    (True, 0.5, (4, 4))
    >>> relu_cam_gap(cam, 0.5 * (np.abs(c) @ U.T).reshape(3, 32, 32))[0] > 0.1
    True
    """
    cam = np.asarray(cam, dtype=np.float64)
    gradcam = np.asarray(gradcam, dtype=np.float64)
    b, hh, ww = cam.shape
    flat = cam.reshape(b, -1).T
    scale = max(float(np.abs(flat).max()), 1e-300)
    for s in (32, 16, 8, 4, 2, 1):
        if hh % s or ww % s:
            continue
        layer = (hh // s, ww // s)
        u = upsampling_matrix(layer, (hh, ww))
        c = np.linalg.lstsq(u, flat, rcond=None)[0]
        if np.abs(u @ c - flat).max() <= 1e-5 * scale:
            break
    else:
        raise Undecidable("CAM's maps are no bilinear upsampling of a layer map")
    predicted = (u @ np.maximum(c, 0.0)).T.reshape(-1)
    target = gradcam.reshape(-1)
    denominator = float(predicted @ predicted)
    k = float(predicted @ target) / denominator if denominator > 0 else 0.0
    gap = float(np.abs(k * predicted - target).max()) / max(float(np.abs(target).max()), 1e-300)
    return gap, k, layer


@claim(
    "selvaraju2017",
    source="Selvaraju et al. 2017, Grad-CAM (ICCV), with Zhou et al. 2016, CAM (CVPR)",
    claim="On a global-average-pool + linear head, Grad-CAM equals ReLU(CAM) up to a "
    "positive constant (exactly)",
    protocol="A 4-layer GAP CNN and ResNet-18 (quarter width) trained on synth-lesion at "
    "32 px (the paper's derivation is architecture-free; its figures use VGG-16 on "
    "ImageNet); checked on the maps the run stored (examples.npz: 4 evaluation "
    "images per model): CAM's layer map recovered through the bilinear upsampling, "
    "rectified, fitted to Grad-CAM with one positive factor; holds if the largest "
    "difference is below 1e-5 of Grad-CAM's largest value",
    suite="selvaraju2017.toml",
)
def selvaraju2017(ev: Evidence) -> Verdict:
    """max |k ReLU(CAM) - Grad-CAM| / max |Grad-CAM| < 1e-5 with k > 0, in every group."""
    if not ev.metrics:
        raise Undecidable("the suite has no metric")
    metric = next(iter(ev.metrics))  # any: the maps are what is read
    parts, held = [], True
    for model, dataset in ev.groups():
        for method in ("cam", "gradcam"):
            ev.require(model, dataset, method, metric)
        arrays = ev.examples.get(_key(model, dataset), {})
        if "maps__cam" not in arrays or "maps__gradcam" not in arrays:
            raise Undecidable(f"{model}/{dataset}: examples.npz holds no maps of cam and gradcam")
        gap, k, layer = relu_cam_gap(arrays["maps__cam"], arrays["maps__gradcam"])
        held &= gap < 1e-5 and k > 0
        parts.append(
            f"{model}/{dataset}: max relative difference {num(gap)} after scaling by "
            f"{num(k)} = {num(k * layer[0] * layer[1])}/(h*w), {layer[0]}x{layer[1]} layer, "
            f"{len(arrays['maps__cam'])} images"
        )
    return Verdict(held, "; ".join(parts))


@claim(
    "chattopadhyay2018",
    source="Chattopadhyay et al. 2018, Grad-CAM++ (WACV)",
    claim="With several instances of the class in an image, Grad-CAM++'s map covers more of "
    "them than Grad-CAM's",
    protocol="A 4-layer GAP CNN trained on synth-histo (H&E-like patches, 64 px) whose tumour patches carry 2 separate clusters of atypical nuclei (the "
    "paper: VGG-16 on PASCAL VOC images with several objects, judged by people and by "
    "localization error); measured as the IoU of the Otsu-binarized map with the union of "
    "both clusters' masks on the 100 tumour test patches (a map on one cluster scores about "
    "half of one covering both), with the energy pointing game beside it",
    suite="chattopadhyay2018.toml",
)
def chattopadhyay2018(ev: Evidence) -> Verdict:
    """IoU of Grad-CAM++ above Grad-CAM's by the paired test in every group (Holm)."""
    iou = ev.labels("iou")[0]
    groups = ev.groups()
    tests = decide(
        [ev.compare(*g, iou, "gradcampp", "gradcam", lower_is_better=False) for g in groups]
    )
    parts = []
    for g, t in zip(groups, tests, strict=True):
        text = f"{g[0]}/{g[1]}: IoU gradcampp {num(t.mean_a)} vs gradcam {num(t.mean_b)} ({t.p_text()})"
        for label in [m for m in ev.metrics if ev.metrics[m].get("use") == "energy_pointing_game"]:
            e = ev.compare(*g, label, "gradcampp", "gradcam", lower_is_better=False)
            text += f", energy pointing game {num(e.mean_a)} vs {num(e.mean_b)}"
        parts.append(text)
    return Verdict(all(t.a_better for t in tests), "; ".join(parts))


@claim(
    "ghorbani2019",
    source="Ghorbani et al. 2019, Interpretation of neural networks is fragile (AAAI)",
    claim="A bounded input perturbation that keeps the prediction moves the map's top-k "
    "region, far more than random noise of the same size",
    protocol="Grad-CAM on a 4-layer GAP CNN and ResNet-18 (quarter width) trained on "
    "synth-lesion at 32 px (the paper: simple gradient, DeepLIFT and integrated gradients on "
    "SqueezeNet and Inception on ImageNet); PGD on a softplus surrogate of Grad-CAM, L-inf "
    "8/255, 10 steps, the top-10% pixels' intersection with the original map, against "
    "Gaussian noise of std 8/255 (the L2 size of the paper's random sign perturbation); 64 "
    "test images",
    suite="ghorbani2019.toml",
)
def ghorbani2019(ev: Evidence) -> Verdict:
    """The attack's top-k intersection below 1 and below the noise's (paired tests, Holm),
    scored on images whose label the attack kept, in every group."""
    attack = ev.labels("explanation_attack")[0]
    noise = [m for m in ev.labels("stability") if ev.option(m, "similarity") == "topk"]
    if not noise:
        raise Undecidable("the suite needs a stability entry with similarity = 'topk'")
    tests, kept = [], []
    for g in ev.groups():
        values = ev.scores(*g, "gradcam", attack)
        one = pd.Series(1.0, index=values.index)
        tests.append(Comparison.of(values, one, lower_is_better=True, seed=ev.seed))
        tests.append(
            ev.compare(*g, attack, "gradcam", "gradcam", lower_is_better=True, metric_b=noise[0])
        )
        kept.append(ev.scores(*g, "gradcam", attack, output="label_kept"))
    tests = decide(tests)
    parts = []
    for i, g in enumerate(ev.groups()):
        to_one, to_noise = tests[2 * i], tests[2 * i + 1]
        parts.append(
            f"{g[0]}/{g[1]}: top-10% intersection after the attack {num(to_one.mean_a)} "
            f"(vs 1: {to_one.p_text()}), after noise {num(to_noise.mean_b)} "
            f"({to_noise.p_text()}); label kept {int(kept[i].sum())}/{len(kept[i])}"
        )
    return Verdict(all(t.a_better for t in tests), "; ".join(parts))


def _method_means(ev: Evidence, model: str, dataset: str, metric: str) -> pd.Series:
    methods = ev.cells[(ev.cells["model"] == model) & (ev.cells["dataset"] == dataset)][
        "method"
    ].unique()
    return pd.Series({m: float(ev.scores(model, dataset, m, metric).mean()) for m in methods})


def ranking_agreement(morf: pd.Series, lerf: pd.Series) -> float:
    """Spearman correlation of two scorings of the same methods, each signed so that higher
    is better (1: the same ranking; -1: reversed).

    >>> ranking_agreement(pd.Series([3.0, 2, 1]), pd.Series([0.3, 0.2, 0.1]))
    1.0
    """
    from scipy.stats import spearmanr

    return float(spearmanr(morf.to_numpy(), lerf.loc[morf.index].to_numpy()).statistic)


@claim(
    "rong2022",
    source="Rong et al. 2022, A consistent and efficient evaluation strategy for attribution "
    "methods (ROAD, ICML)",
    claim="MoRF and LeRF rank attribution methods inconsistently when removed pixels are set "
    "to a fixed value, and agree better under ROAD's noisy linear imputation",
    protocol="7 methods (Grad-CAM, Grad-CAM++, guided backprop, saliency, integrated "
    "gradients, occlusion, random) on a 4-layer GAP CNN and ResNet-18 (quarter width) "
    "trained on synth-lesion at 32 px (the paper: ResNet-34 on CIFAR-10 at 32 px, more "
    "methods); fixed value: 4 x 4 regions set to 0 over the whole curve (AOPC-MoRF, "
    "AOPC-LeRF; the paper: pixels); ROAD at 10-90% removal; the Spearman correlation across "
    "methods of the MoRF and LeRF rankings (mean over 64 test images) for each",
    suite="rong2022.toml",
)
def rong2022(ev: Evidence) -> Verdict:
    """The MoRF/LeRF ranking correlation under ROAD above the fixed-value one, per group."""
    morf_fixed, lerf_fixed = ev.labels("aopc_morf")[0], ev.labels("aopc_lerf")[0]
    morf_road, lerf_road = ev.labels("road_morf")[0], ev.labels("road_lerf")[0]
    value = ev.option(morf_fixed, "perturbation", "gaussian")
    parts, held = [], True
    for g in ev.groups():
        # each signed so that higher is better: AOPC-MoRF up, AOPC-LeRF down; ROAD the reverse
        fixed = ranking_agreement(
            _method_means(ev, *g, morf_fixed), -_method_means(ev, *g, lerf_fixed)
        )
        road = ranking_agreement(
            -_method_means(ev, *g, morf_road), _method_means(ev, *g, lerf_road)
        )
        n = len(_method_means(ev, *g, morf_road))
        if n < 3:
            raise Undecidable(f"{g[0]}/{g[1]}: {n} methods; a ranking needs at least 3")
        held &= road > fixed
        parts.append(
            f"{g[0]}/{g[1]}: MoRF-LeRF rank correlation, {value} imputation {num(fixed)}, "
            f"ROAD {num(road)} ({n} methods)"
        )
    return Verdict(held, "; ".join(parts))


@claim(
    "arun2021",
    source="Arun et al. 2021, Assessing the trustworthiness of saliency maps for localizing "
    "abnormalities in medical imaging (Radiology: AI); Saporta et al. 2022, Benchmarking "
    "saliency methods for chest X-ray interpretation (Nature Machine Intelligence)",
    claim="On real lesion masks, saliency maps localize far worse than the masks' own extent "
    "allows (a map equal to the mask scores 1)",
    protocol="Grad-CAM, Grad-CAM++, integrated gradients and occlusion on ResNet-18 (quarter "
    "width) trained on BUSI breast ultrasound at 32 px, scored against the radiologists' "
    "tumour masks (the papers: chest X-rays at 224-320 px, DenseNet-121 and "
    "others, pointing game and IoU against radiologists); every test image with a mask "
    "(96); holds if every method's energy pointing game stays below 0.5 (95% bootstrap CI "
    "of the mean); the pointing-game hit rate is reported with its CI",
    suite="arun2021.toml",
    fallback="arun2021-synth.toml",
)
def arun2021(ev: Evidence) -> Verdict:
    """Every non-baseline method's energy pointing game: upper CI bound below 0.5."""
    from cambench.benchmarks.reports.leaderboard import bootstrap_ci

    energy, pointing = ev.labels("energy_pointing_game")[0], ev.labels("pointing_game")[0]
    parts, held = [], True
    for model, dataset in ev.groups():
        methods = ev.cells[(ev.cells["model"] == model) & (ev.cells["dataset"] == dataset)][
            "method"
        ].unique()
        texts = {}
        for metric in (energy, pointing):
            items = []
            for m in methods:
                v = ev.scores(model, dataset, m, metric).to_numpy()
                lo, hi = bootstrap_ci(v, seed=ev.seed)
                items.append(f"{m} {num(float(np.mean(v)))} [{num(lo)}, {num(hi)}]")
                is_baseline = (ev.methods.get(m) or {}).get("family") == "baseline"
                if metric == energy and not is_baseline:
                    held &= hi < 0.5
            texts[metric] = ", ".join(items)
        n = ev.require(model, dataset, methods[0], energy)
        area = (ev.reports.get(_key(model, dataset)) or {}).get("lesion_area", {}).get("mean")
        chance = f"; lesion area (chance) {num(area)}" if area is not None else ""
        parts.append(
            f"{model}/{dataset} (n={n}): energy pointing game {texts[energy]}; pointing game "
            f"{texts[pointing]}{chance}"
        )
    return Verdict(held, "; ".join(parts))


def _key(model: str, dataset: str) -> str:
    from cambench.benchmarks.engine.store import group_key

    return group_key(model, dataset)
