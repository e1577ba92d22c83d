"""The claims command (``python -m benchmarks.claims``) and its registry: every claim is
registered with its source and a suite that loads; each rule decides right on results built
here where the answer is known (clearly separated paired values hold, identical ones do not);
a cell that failed makes a claim undecidable, never "did not hold"; the CLI lists, refuses
unknown claims, and runs one claim end to end at a tiny size."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cambench.benchmarks import claims as cli
from cambench.benchmarks.claims_registry import (
    CLAIMS,
    CLAIMS_DIR,
    Evidence,
    Undecidable,
    relu_cam_gap,
    upsampling_matrix,
)
from cambench.benchmarks.engine.store import CELL_COLUMNS, ROW_COLUMNS, group_key
from cambench.benchmarks.engine.suite import load_suite

pytestmark = pytest.mark.harness

SEVEN = [
    "adebayo2018",
    "arun2021",
    "chattopadhyay2018",
    "ghorbani2019",
    "rong2022",
    "samek2017",
    "selvaraju2017",
]
N = 32  # images per cell of the built results
GROUPS = [("gapcnn", "synth-lesion"), ("resnet18", "synth-lesion")]


def evidence(scores, metrics, *, status=None, examples=None, reports=None, methods=None):
    """An ``Evidence`` from ``scores``: (model, dataset, method, metric[, output]) -> values
    per image; every cell ok unless ``status`` names it (cell -> (status, reason))."""
    rows, cells = [], {}
    for key, values in scores.items():
        model, dataset, method, metric, *rest = key
        output = rest[0] if rest else "value"
        for i, v in enumerate(values):
            rows.append(
                dict(
                    model=model,
                    dataset=dataset,
                    method=method,
                    metric=metric,
                    output=output,
                    sample_id=f"img{i:03d}",
                    label=0,
                    target=0,
                    correct=True,
                    value=float(v),
                )
            )
        cells.setdefault((model, dataset, method, metric), len(values))
    cell_rows = []
    for (model, dataset, method, metric), n in cells.items():
        state, reason = (status or {}).get((model, dataset, method, metric), ("ok", ""))
        cell_rows.append(dict(model=model, dataset=dataset, method=method, metric=metric))
        cell_rows[-1].update(status=state, reason=reason, n=n, n_excluded=0)
    return Evidence(
        rows=pd.DataFrame(rows, columns=ROW_COLUMNS),
        cells=pd.DataFrame(cell_rows, columns=CELL_COLUMNS),
        metrics=metrics,
        methods=methods or {},
        examples=examples or {},
        reports=reports or {},
    )


def spread(center: float, width: float = 0.05, seed: int = 0) -> np.ndarray:
    """N distinct values around ``center`` (no ties: the paired tests' clean case)."""
    return center + width * np.random.default_rng(seed).uniform(-1, 1, N)


def decide(name: str, ev: Evidence) -> bool:
    return CLAIMS.get(name).obj(ev).held


# --- the registry --------------------------------------------------------------------------


def test_registry_holds_the_seven_claims_with_sources_and_suites():
    assert set(SEVEN) <= set(CLAIMS.names())
    for entry in CLAIMS:
        info = entry.info
        assert any(str(year) in info.source for year in range(2010, 2030)), entry.name
        assert info.claim and info.protocol, entry.name
        for suite in filter(None, (info.suite, info.fallback)):
            assert (CLAIMS_DIR / suite).is_file(), suite


@pytest.mark.parametrize("name", SEVEN)
def test_every_claim_suite_loads(name):
    info = CLAIMS.get(name).info
    for suite in filter(None, (info.suite, info.fallback)):
        loaded = load_suite(str(CLAIMS_DIR / suite))
        assert loaded.models and loaded.methods and loaded.metrics


# --- the rules on built results ------------------------------------------------------------


def test_adebayo_holds_when_gradcam_changes_clearly_more():
    metrics = {"randomization": {"use": "model_randomization"}}
    g = GROUPS[0]

    def ev(gradcam):
        return evidence(
            {
                (*g, "gradcam", "randomization"): gradcam,
                (*g, "guided_backprop", "randomization"): spread(0.6, seed=1),
                (*g, "guided_gradcam", "randomization"): spread(0.55, seed=2),
            },
            metrics,
        )

    assert decide("adebayo2018", ev(spread(0.05, seed=3)))
    assert not decide("adebayo2018", ev(spread(0.6, seed=1)))  # as guided backprop's
    assert not decide("adebayo2018", ev(spread(0.9, seed=3)))  # changed less


def test_samek_needs_both_aopc_above_random_and_blur_smallest():
    perturbations = ["zero", "mean", "blur"]
    metrics = {"aopc": {"use": "aopc_morf", "perturbation": "uniform"}}
    metrics |= {f"abpc-{p}": {"use": "abpc", "perturbation": p} for p in perturbations}

    def ev(aopc_gradcam, blur):
        scores = {}
        for g in GROUPS:
            scores[(*g, "gradcam", "aopc")] = aopc_gradcam
            scores[(*g, "random", "aopc")] = spread(1.0, seed=5)
            scores[(*g, "gradcam", "abpc-zero")] = spread(1.0, seed=6)
            scores[(*g, "gradcam", "abpc-mean")] = spread(1.5, seed=7)
            scores[(*g, "gradcam", "abpc-blur")] = blur
        return evidence(scores, metrics)

    assert decide("samek2017", ev(spread(3.0), spread(0.2, seed=8)))
    assert not decide("samek2017", ev(spread(1.0, seed=5), spread(0.2, seed=8)))
    assert not decide("samek2017", ev(spread(3.0), spread(2.0, seed=8)))  # blur the largest


def test_selvaraju_exact_equivalence_from_the_stored_maps():
    rng = np.random.default_rng(0)
    u = upsampling_matrix((4, 4), (32, 32))
    layer = rng.normal(size=(4, 16))
    cam = (layer @ u.T).reshape(4, 32, 32).astype(np.float32)
    relu_cam = (np.maximum(layer, 0) @ u.T).reshape(4, 32, 32)
    metrics = {"sparseness": {"use": "sparseness"}}
    g = GROUPS[1]

    def ev(gradcam, status=None):
        scores = {(*g, m, "sparseness"): spread(0.5) for m in ("cam", "gradcam")}
        arrays = {"maps__cam": cam, "maps__gradcam": gradcam.astype(np.float32)}
        return evidence(scores, metrics, examples={group_key(*g): arrays}, status=status)

    verdict = CLAIMS.get("selvaraju2017").obj(ev(relu_cam / 16))
    assert verdict.held and "4x4 layer" in verdict.figures and "= 1/(h*w)" in verdict.figures
    assert not decide("selvaraju2017", ev(np.abs(cam)))  # |CAM|, not ReLU(CAM)
    assert not decide("selvaraju2017", ev(-relu_cam))  # a negative factor
    assert not decide("selvaraju2017", ev(relu_cam * (1 + 1e-3 * rng.normal(size=cam.shape))))
    not_gap = {(*g, "cam", "sparseness"): ("not_applicable", "CAM needs a GAP head")}
    with pytest.raises(Undecidable, match="not_applicable: CAM needs a GAP head"):
        CLAIMS.get("selvaraju2017").obj(ev(relu_cam, status=not_gap))


def test_relu_cam_gap_finds_the_layer_size():
    rng = np.random.default_rng(1)
    for layer in [(8, 8), (2, 2)]:
        u = upsampling_matrix(layer, (32, 32))
        c = rng.normal(size=(2, layer[0] * layer[1]))
        cam = (c @ u.T).reshape(2, 32, 32)
        gap, k, found = relu_cam_gap(cam, 3.0 * (np.maximum(c, 0) @ u.T).reshape(2, 32, 32))
        assert found == layer and gap < 1e-10 and k == pytest.approx(3.0)


def test_chattopadhyay_compares_iou_of_gradcampp_and_gradcam():
    metrics = {"iou": {"use": "iou"}, "energy_pointing_game": {"use": "energy_pointing_game"}}
    g = ("gapcnn", "synth-histo")

    def ev(pp):
        return evidence(
            {
                (*g, "gradcampp", "iou"): pp,
                (*g, "gradcam", "iou"): spread(0.2, seed=1),
                (*g, "gradcampp", "energy_pointing_game"): spread(0.5),
                (*g, "gradcam", "energy_pointing_game"): spread(0.5, seed=1),
            },
            metrics,
        )

    assert decide("chattopadhyay2018", ev(spread(0.4, seed=2)))
    assert not decide("chattopadhyay2018", ev(spread(0.2, seed=1)))  # identical
    assert not decide("chattopadhyay2018", ev(spread(0.1, seed=2)))  # worse


def test_ghorbani_needs_the_attack_below_one_and_below_noise():
    metrics = {
        "attack": {"use": "explanation_attack"},
        "noise": {"use": "stability", "similarity": "topk"},
    }
    g = GROUPS[0]

    def ev(attack, noise):
        return evidence(
            {
                (*g, "gradcam", "attack"): attack,
                (*g, "gradcam", "attack", "label_kept"): np.ones(N),
                (*g, "gradcam", "noise"): noise,
            },
            metrics,
        )

    verdict = CLAIMS.get("ghorbani2019").obj(ev(spread(0.3), spread(0.9, seed=1)))
    assert verdict.held and f"label kept {N}/{N}" in verdict.figures
    assert not decide("ghorbani2019", ev(np.ones(N), spread(0.9, seed=1)))  # nothing moved
    assert not decide("ghorbani2019", ev(spread(0.3), spread(0.3)))  # no more than noise
    missing = {"attack": metrics["attack"], "noise": {"use": "stability"}}  # spearman
    with pytest.raises(Undecidable, match="similarity"):
        CLAIMS.get("ghorbani2019").obj(evidence({}, missing))


def test_rong_compares_the_ranking_agreement_of_the_two_imputations():
    metrics = {
        "morf-zero": {"use": "aopc_morf", "perturbation": "zero"},
        "lerf-zero": {"use": "aopc_lerf", "perturbation": "zero"},
        "road_morf": {"use": "road_morf"},
        "road_lerf": {"use": "road_lerf"},
    }
    methods = ["a", "b", "c", "d", "e"]
    quality = np.arange(5.0)  # e is the best method

    def ev(zero_lerf_sign, road_lerf_sign):
        scores = {}
        for i, m in enumerate(methods):
            q = quality[i]
            g = GROUPS[0]
            scores[(*g, m, "morf-zero")] = spread(q, seed=i)  # higher is better
            scores[(*g, m, "lerf-zero")] = spread(-zero_lerf_sign * q, seed=i)  # lower
            scores[(*g, m, "road_morf")] = spread(-q, seed=i)  # lower is better
            scores[(*g, m, "road_lerf")] = spread(road_lerf_sign * q, seed=i)  # higher
        return evidence(scores, metrics)

    verdict = CLAIMS.get("rong2022").obj(ev(-1, +1))  # zero: reversed; ROAD: agrees
    assert verdict.held and "zero imputation -1, ROAD 1 (5 methods)" in verdict.figures
    assert not decide("rong2022", ev(+1, +1))  # both agree: not better under ROAD
    assert not decide("rong2022", ev(+1, -1))


def test_arun_holds_when_every_method_localizes_far_below_the_mask():
    metrics = {
        "energy_pointing_game": {"use": "energy_pointing_game"},
        "pointing_game": {"use": "pointing_game"},
    }
    families = {"gradcam": {"family": "cam"}, "random": {"family": "baseline"}}
    g = ("resnet18", "busi")
    report = {group_key(*g): {"lesion_area": {"mean": 0.12, "n": N}}}

    def ev(gradcam_energy):
        hits = (np.arange(N) % 3 == 0).astype(float)
        return evidence(
            {
                (*g, "gradcam", "energy_pointing_game"): gradcam_energy,
                (*g, "random", "energy_pointing_game"): spread(0.9, seed=1),  # a baseline
                (*g, "gradcam", "pointing_game"): hits,
                (*g, "random", "pointing_game"): hits,
            },
            metrics,
            methods=families,
            reports=report,
        )

    verdict = CLAIMS.get("arun2021").obj(ev(spread(0.2)))
    assert verdict.held and "lesion area (chance) 0.12" in verdict.figures
    assert "pointing game gradcam 0.344 [" in verdict.figures
    assert not decide("arun2021", ev(spread(0.9)))
    assert not decide("arun2021", ev(spread(0.47, width=0.3)))  # its interval reaches 0.5


def test_a_failed_cell_makes_the_claim_undecidable_not_failed():
    metrics = {"iou": {"use": "iou"}}
    g = ("gapcnn", "synth-histo")
    ev = evidence(
        {(*g, "gradcampp", "iou"): spread(0.4), (*g, "gradcam", "iou"): spread(0.2)},
        metrics,
        status={(*g, "gradcampp", "iou"): ("error", "RuntimeError: boom")},
    )
    with pytest.raises(Undecidable, match="gradcampp x iou on gapcnn/synth-histo is error"):
        CLAIMS.get("chattopadhyay2018").obj(ev)
    with pytest.raises(Undecidable, match="no results"):
        CLAIMS.get("chattopadhyay2018").obj(evidence({}, metrics))


# --- the command ---------------------------------------------------------------------------


def test_cli_lists_the_claims(capsys):
    assert cli.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in SEVEN:
        assert name in out
    assert "source: Adebayo et al. 2018" in out


def test_cli_refuses_an_unknown_claim(capsys, tmp_path):
    assert cli.main(["--only", "adebayo", "--out", str(tmp_path)]) == 2
    assert "Unknown claim 'adebayo'. Did you mean: adebayo2018?" in capsys.readouterr().err


def test_missing_real_data_runs_the_synthetic_stand_in(tmp_path):
    suite, note = cli.choose_suite(CLAIMS.get("arun2021"), None)
    assert suite.name == "arun2021-synth.toml" and "busi" in note
    suite, note = cli.choose_suite(CLAIMS.get("adebayo2018"), str(tmp_path))  # no BUSI there
    assert suite.name == "adebayo2018-synth.toml" and "synthetic stand-in" in note
    assert cli.choose_suite(CLAIMS.get("samek2017"), None) == (CLAIMS_DIR / "samek2017.toml", "")


@pytest.mark.slow
def test_one_claim_end_to_end(tmp_path, capsys):
    out = tmp_path / "claims"
    argv = ["--only", "selvaraju*", "--tiny", "--out", str(out), "--cache", str(tmp_path / "c")]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| selvaraju2017: " in printed and printed.rstrip().endswith("| held |")
    record = json.loads((out / "claims.json").read_text())
    (only,) = record["claims"]
    assert only["id"] == "selvaraju2017" and only["result"] == "held"
    assert "gapcnn/synth-lesion: max relative difference" in only["figures"]
    assert (out / "selvaraju2017" / "manifest.json").is_file()
    assert "| selvaraju2017: " in (out / "claims.md").read_text()
    # rerun: the stored group is reused, the verdict is the same
    assert cli.main(argv) == 0
    assert json.loads((out / "claims.json").read_text())["claims"][0]["figures"] == only["figures"]


def test_too_few_images_for_a_paired_test_is_undecidable():
    metrics = {"iou": {"use": "iou"}}
    g = ("gapcnn", "synth-histo")
    few = {(*g, "gradcampp", "iou"): [0.4, 0.5, 0.6], (*g, "gradcam", "iou"): [0.1, 0.2, 0.3]}
    with pytest.raises(Undecidable, match="3 paired images: too few"):
        CLAIMS.get("chattopadhyay2018").obj(evidence(few, metrics))
