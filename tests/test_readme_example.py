"""The README's worked example, "Explain your own model on your own data", runs as written:
its one bash block, in an empty folder, through the installed ``cambench`` command. What it
must show is checked against what the example's data makes true (a bright disc on every
lesion image, none elsewhere), not against a recorded output."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

pytestmark = [pytest.mark.harness, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Explain your own model on your own data"


def _example() -> str:
    readme = (ROOT / "README.md").read_text()
    assert SECTION in readme, "the README lost its worked example"
    section = readme[readme.index(SECTION) :]
    return re.search(r"```bash\n(.*?)```", section, re.S)[1]


def test_the_readme_example_runs_as_written(tmp_path):
    bindir = Path(sys.executable).parent
    if shutil.which("cambench", path=str(bindir)) is None and shutil.which("cambench") is None:
        pytest.skip("the cambench command is not installed (pip install -e .)")
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("CAMBENCH_DATA_ROOT", None)
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", _example()],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "# Leaderboard: my-study" in done.stdout  # the example ends by showing it
    rows = pd.read_parquet(tmp_path / "results/my-study/rows.parquet")
    assert set(rows["method"]) == {"gradcam", "gradcampp", "random"}
    assert set(rows["metric"]) == {"deletion", "pointing_game"}
    hits = rows[rows["metric"] == "pointing_game"].groupby("method")["value"].mean()
    # the lesion is the only thing that tells the classes apart: a faithful CAM points at it
    assert hits["gradcam"] > 0.8 and hits["random"] < 0.5
    board = (tmp_path / "results/my-study/leaderboard.md").read_text()
    assert "gradcam" in board and "(n=" in board
