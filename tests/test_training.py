"""Model training and its cache: deterministic for a seed, keyed by what determines the
weights (including the training data itself), classification report checked against sklearn."""

import numpy as np
import pytest
import torch

from cambench.benchmarks.models.training import (
    TrainConfig,
    classification_report,
    get_trained_model,
)
from cambench.datasets import DATASETS

pytestmark = pytest.mark.harness
CFG = TrainConfig(epochs=1, batch_size=32)


def data(seed=0, n=64):
    make = DATASETS.get("synth-lesion").obj
    return make("train", seed=seed, n=n), make("test", seed=seed, n=32)


def train(tmp_path, seed=0, data_seed=0, cache="c", **kwargs):
    tr, te = data(data_seed)
    return get_trained_model(
        "gapcnn",
        "synth-lesion",
        train_set=tr,
        test_set=te,
        dataset_options={"n": 64},
        config=CFG,
        seed=seed,
        cache_dir=tmp_path / cache,
        **kwargs,
    )


def test_same_seed_same_weights_and_cache_hit(tmp_path):
    first = train(tmp_path, cache="a")
    again = train(tmp_path, cache="b")  # trained from scratch in another cache
    for (k, v), w in zip(
        first.model.state_dict().items(), again.model.state_dict().values(), strict=True
    ):
        assert torch.equal(v, w), k
    assert first.report["accuracy"] == again.report["accuracy"]
    mtime = first.checkpoint.stat().st_mtime_ns
    hit = train(tmp_path, cache="a")
    assert hit.checkpoint == first.checkpoint and hit.checkpoint.stat().st_mtime_ns == mtime
    assert not hit.model.training
    # trained in channels-last, handed back in the default format: the freshly trained model
    # and the cached one compute bit-identical outputs (cold and warm runs agree)
    for p in first.model.parameters():
        assert p.is_contiguous()
    x = data()[1].images[:8]
    with torch.inference_mode():
        assert torch.equal(first.model(x), hit.model(x))


def test_key_changes_with_seed_and_with_the_data(tmp_path):
    base = train(tmp_path).checkpoint
    assert train(tmp_path, seed=1).checkpoint != base
    # same names and options, different training data: a different entry, not a stale hit
    assert train(tmp_path, data_seed=1).checkpoint != base


def test_classification_report_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y_true, y_pred = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
    y_pred[:5] = 2  # class 2 over-predicted
    rep = classification_report(y_true, y_pred, ("a", "b", "c"))
    p, r, f, s = metrics.precision_recall_fscore_support(
        y_true, y_pred, labels=[0, 1, 2], zero_division=0
    )
    assert rep["accuracy"] == pytest.approx(metrics.accuracy_score(y_true, y_pred))
    for i, name in enumerate("abc"):
        c = rep["classes"][name]
        assert (c["precision"], c["recall"], c["f1"], c["support"]) == pytest.approx(
            (p[i], r[i], f[i], s[i])
        )
    empty = classification_report(np.array([0, 0]), np.array([0, 0]), ("a", "b"))
    assert empty["classes"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_user_checkpoint_is_loaded_not_trained(tmp_path):
    trained = train(tmp_path, cache="a")
    path = tmp_path / "mine.pt"
    torch.save(trained.model.state_dict(), path)
    mine = train(tmp_path, cache="b", checkpoint=path)
    for k, v in trained.model.state_dict().items():
        assert torch.equal(mine.model.state_dict()[k], v), k
    assert mine.report["accuracy"] == trained.report["accuracy"]
    assert not (tmp_path / "b").exists()  # nothing trained, nothing cached


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"not a checkpoint", "does not load"),
        (None, "does not exist"),
        ({"features.0.weight": torch.zeros(1)}, "does not load"),
    ],
)
def test_bad_user_checkpoint_is_one_clear_error(tmp_path, content, needle):
    from cambench.benchmarks.core.errors import UserError

    path = tmp_path / "bad.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(UserError, match=needle) as err:
        train(tmp_path, cache="c", checkpoint=path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "c").exists()


def test_damaged_cache_entry_is_retrained(tmp_path, capsys):
    first = train(tmp_path, cache="a")
    reference = {k: v.clone() for k, v in first.model.state_dict().items()}
    first.checkpoint.write_bytes(b"truncated")
    again = train(tmp_path, cache="a")
    assert "retraining" in capsys.readouterr().err
    for k, v in reference.items():
        assert torch.equal(again.model.state_dict()[k], v), k


def test_validation_report_is_recorded_and_added_to_older_cached_reports(tmp_path):
    """The report carries the validation split's accuracy (for choosing settings such as the
    epochs without looking at the test split), checked against the model's own predictions;
    a report cached before it was recorded gets it on its next load, written back."""
    import json

    val = DATASETS.get("synth-lesion").obj("val", seed=0, n=40)
    trained = train(tmp_path, cache="a", val_set=val)
    with torch.inference_mode():
        pred = trained.model(val.images).argmax(1)
    assert trained.report["val"]["split"] == "val" and trained.report["val"]["n"] == 40
    assert trained.report["val"]["accuracy"] == pytest.approx(
        (pred == val.labels).float().mean().item()
    )
    assert trained.report["split"] == "test"  # the top level stays the test report

    path = trained.checkpoint.with_suffix(".report.json")
    older = {k: v for k, v in json.loads(path.read_text()).items() if k != "val"}
    path.write_text(json.dumps(older))
    mtime = trained.checkpoint.stat().st_mtime_ns
    hit = train(tmp_path, cache="a", val_set=val)
    assert hit.checkpoint.stat().st_mtime_ns == mtime  # loaded, not retrained
    assert hit.report["val"] == trained.report["val"]
    assert json.loads(path.read_text())["val"] == trained.report["val"]
    calls = []  # given as a loader, the split is loaded only for a report that lacks it
    path.write_text(json.dumps(older))
    assert (
        train(tmp_path, cache="a", val_set=lambda: calls.append(1) or val).report["val"]
        == (trained.report["val"])
    )
    assert (
        train(tmp_path, cache="a", val_set=lambda: calls.append(1) or val).report["val"]
        == (trained.report["val"])
    )
    assert calls == [1]
    assert "val" not in train(tmp_path, cache="b").report  # no validation set, no entry
