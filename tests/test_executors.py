"""The Ray executor gives the local executor's results; bad options are one-line UserErrors.

The oracle for the Ray executor is the local one: the same groups run in this process, in
turn, with each model trained into its own cache, must give equal rows and cells.
"""

import dataclasses
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from pandas.testing import assert_frame_equal

from cambench.benchmarks.core.errors import UserError
from cambench.benchmarks.engine.executors import _task_cpus, run_groups
from cambench.benchmarks.engine.group import group_specs
from cambench.benchmarks.engine.plan import make_plan
from cambench.benchmarks.engine.suite import Component, filter_suite, load_suite

pytestmark = pytest.mark.harness
ROOT = Path(__file__).resolve().parents[1]


def small_smoke_suite():
    """The smoke suite, small: 16 images, a short training on 128 images, and without the
    time metric, whose values are not deterministic."""
    suite = load_suite("smoke")
    suite = filter_suite(suite, metrics=["aopc_morf", "pointing_game", "energy_pointing_game"])
    (dataset,) = suite.datasets
    return dataclasses.replace(
        suite,
        eval=dataclasses.replace(suite.eval, max_images=16, batch_size=8),
        train=dataclasses.replace(suite.train, epochs=2),
        datasets=(dataclasses.replace(dataset, options={**dataset.options, "n": 128}),),
    )


def specs_for(suite, cache):
    plan = make_plan(suite, data_root=None)
    return group_specs(plan.groups, device="cpu", cache_dir=str(cache), progress=False)


@pytest.mark.slow
def test_ray_executor_equals_local_executor(tmp_path):
    pytest.importorskip("ray")
    suite = small_smoke_suite()
    # a second entry of the same model makes two groups that share one cache entry
    (model,) = suite.models
    suite = dataclasses.replace(
        suite, models=(model, Component("gapcnn-b", model.use, layer="features"))
    )
    local = dict(
        ((s.model.label, s.dataset.label), r)
        for s, r in run_groups(specs_for(suite, tmp_path / "local"))
    )
    remote = dict(
        ((s.model.label, s.dataset.label), r)
        for s, r in run_groups(specs_for(suite, tmp_path / "ray"), executor="ray", num_cpus=2)
    )
    assert set(remote) == set(local) == {("gapcnn", "synth-lesion"), ("gapcnn-b", "synth-lesion")}
    for key, expected in local.items():
        assert (expected.cells["status"] == "ok").all(), expected.cells
        assert len(expected.rows) > 0
        # exact: with one thread in the tasks instead of the driver's two, half the values
        # differ in the last bits, which the default tolerance would let pass
        assert_frame_equal(remote[key].rows, expected.rows, check_exact=True)
        assert_frame_equal(remote[key].cells, expected.cells, check_exact=True)
        assert_frame_equal(remote[key].curves, expected.curves, check_exact=True)
    # both groups use the same trained model (same cache key): one whole checkpoint
    assert len(list((tmp_path / "ray" / "models").glob("*.pt"))) == 1
    assert not list((tmp_path / "ray" / "models").glob(".*.tmp"))
    import ray

    assert not ray.is_initialized()  # the Ray it started is shut down


@pytest.mark.slow
def test_ray_task_errors_reach_the_driver_as_the_local_executor_gives_them(tmp_path):
    """A UserError keeps its type and message; any other error becomes the same error
    cells, naming the group, as with the local executor; a Ray the caller started is used
    and left running."""
    ray = pytest.importorskip("ray")
    suite = small_smoke_suite()
    missing = str(tmp_path / "missing.pt")
    bad_checkpoint = Component("gapcnn", "gapcnn", checkpoint=missing)
    # torch rejects a conv with -1 channels while the model is built, outside any cell
    broken = Component("broken", "gapcnn", {"width": -1})
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        specs = specs_for(dataclasses.replace(suite, models=(bad_checkpoint,)), tmp_path)
        with pytest.raises(UserError) as local:
            list(run_groups(specs))
        with pytest.raises(UserError) as remote:
            list(run_groups(specs, executor="ray"))
        assert str(remote.value) == str(local.value)
        assert str(local.value).startswith("model gapcnn")
        specs = specs_for(dataclasses.replace(suite, models=(broken,)), tmp_path)
        ((_, here),) = list(run_groups(specs))
        ((_, there),) = list(run_groups(specs, executor="ray"))
        assert here.error.startswith("group broken x synth-lesion failed: ")
        assert there.error == here.error
        assert_frame_equal(there.cells, here.cells)
        assert set(here.cells["status"]) == {"error"}
        assert ray.is_initialized()
    finally:
        ray.shutdown()


class FakeRay:
    """Just enough of ``ray`` for the CPU request: the alive nodes and their CPUs."""

    def __init__(self, *cpus):
        self.cpus = cpus

    def nodes(self):
        return [{"Alive": True, "Resources": {"CPU": c}} for c in self.cpus] + [
            {"Alive": False, "Resources": {"CPU": 64.0}}
        ]


@pytest.mark.parametrize(
    "threads, nodes, expected",
    [(2, (8.0,), 2), (4, (2.0, 1.0), 2), (2, (1.0,), 1), (2, (), 1)],
)
def test_a_task_asks_for_its_threads_but_never_more_than_the_largest_node(threads, nodes, expected):
    assert _task_cpus(FakeRay(*nodes), threads) == expected


def test_unknown_executor_names_the_choices():
    with pytest.raises(UserError, match=r"'dask' .*choose one of: local, ray"):
        run_groups([], executor="dask")


def test_unreachable_address_is_a_one_line_user_error():
    pytest.importorskip("ray")
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    specs = specs_for(small_smoke_suite(), "unused")
    with pytest.raises(UserError, match=rf"--ray-address 127.0.0.1:{port}: no Ray cluster") as info:
        next(run_groups(specs, executor="ray", ray_address=f"127.0.0.1:{port}"))
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="is not an address"):
        next(run_groups(specs, executor="ray", ray_address="head-node"))


def test_ray_options_with_the_local_executor_are_an_error():
    with pytest.raises(UserError, match="apply to --executor ray only"):
        run_groups([], ray_address="10.0.0.5:6379")


def test_user_error_keeps_its_type_and_other_errors_become_error_cells(
    tmp_path, monkeypatch, capsys
):
    suite = small_smoke_suite()
    (spec,) = specs_for(suite, tmp_path)

    def bad_checkpoint(spec):
        raise UserError("model gapcnn: checkpoint 'x.pt' does not exist")

    monkeypatch.setattr("cambench.benchmarks.engine.executors.run_group", bad_checkpoint)
    with pytest.raises(UserError, match=r"^model gapcnn: checkpoint 'x.pt' does not exist$"):
        list(run_groups([spec]))

    def broken(spec):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr("cambench.benchmarks.engine.executors.run_group", broken)
    ((_, result),) = list(run_groups([spec]))
    why = "group gapcnn x synth-lesion failed: ZeroDivisionError: division by zero"
    assert result.error == why and len(result.rows) == 0
    cells = result.cells
    assert set(cells["status"]) == {"error"} and set(cells["reason"]) == {why}
    assert len(cells) == len(suite.methods) * len(suite.metrics)
    assert "Traceback" in capsys.readouterr().err  # the traceback goes to the log


def test_importing_the_executors_does_not_import_ray():
    code = (
        "import sys, benchmarks.engine.executors; assert 'ray' not in sys.modules, 'ray imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
