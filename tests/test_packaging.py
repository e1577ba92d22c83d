"""The installed distribution claims one top-level name, ``cambench``: it neither overwrites
nor shadows another distribution's ``datasets`` or ``metrics`` (Hugging Face's ``datasets``
is in every transformers environment), and ``python -m benchmarks.run`` from a checkout
runs that checkout's code."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

pytestmark = pytest.mark.harness

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("benchmarks", "cams", "metrics", "datasets")


def _python(code: str, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_every_package_folder_is_installed_under_cambench():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = {
        "cambench." + ".".join(p.parent.relative_to(ROOT).parts)
        for folder in FOLDERS
        for p in (ROOT / folder).rglob("__init__.py")
    }
    assert listed == on_disk
    assert config["package-dir"] == {f"cambench.{f}": f for f in FOLDERS}


@pytest.mark.slow
def test_the_wheel_holds_nothing_outside_cambench(tmp_path):
    pytest.importorskip("setuptools")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob("cambench-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"cambench"}
    assert "cambench/benchmarks/suites/medical.toml" in names
    # the report's template, styles and script (benchmarks.reports.html reads them)
    for name in ("report.html.j2", "report.css", "report.js"):
        assert f"cambench/benchmarks/reports/templates/{name}" in names
    assert "cambench/benchmarks/baselines/smoke.json" in names
    assert "cambench/benchmarks/run.py" in names


def test_the_installed_distribution_names_only_cambench():
    try:
        dist = importlib.metadata.distribution("cambench")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("cambench is not installed (pip install -e .)")
    assert (dist.read_text("top_level.txt") or "cambench").split() == ["cambench"]
    assert any(ep.name == "cambench" for ep in dist.entry_points)


def test_hugging_face_datasets_and_cambench_import_side_by_side(tmp_path):
    """Outside the checkout (whose folders the current directory would put first), both
    import in one process and each is itself."""
    found = _python(
        "import importlib.util as u; print(u.find_spec('datasets') is not None)", tmp_path
    )
    if found != "True":
        pytest.skip("Hugging Face datasets is not installed (the dev extra installs it)")
    out = _python(
        "import datasets, cambench.datasets, cambench.metrics\n"
        "print(datasets.__file__); print(hasattr(datasets, 'load_dataset'))\n"
        "print(cambench.datasets.__file__); print('csv' in cambench.datasets.DATASETS)",
        tmp_path,
    )
    hf_file, hf_api, ours, registered = out.splitlines()
    assert hf_api == "True" and not Path(hf_file).is_relative_to(ROOT)
    assert Path(ours).is_relative_to(ROOT) or "site-packages" in ours
    assert registered == "True"


def test_a_command_from_the_checkout_runs_the_checkout(tmp_path):
    out = _python(
        "import benchmarks, cambench.cams, cambench.benchmarks.run as run\n"
        "print(cambench.cams.__file__); print(run.__file__)",
        ROOT,
    )
    assert [Path(p).parent.parent for p in out.splitlines()] == [ROOT, ROOT]


def test_the_cambench_command_lists_suites():
    exe = shutil.which("cambench")
    if exe is None:
        pytest.skip("the cambench command is not installed (pip install -e .)")
    done = subprocess.run([exe, "--list", "suites"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "medical" in done.stdout and "smoke" in done.stdout
