"""``benchmarks/gpu_check.sh`` in its tiny mode (CPU, a few steps per part, `shapes` data): the
summary has the three parts and the parity rows, and OUT holds at most 8 files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.timeout(480)  # the script's own time box (TOTAL_S) is 280 s in its tiny mode
def test_tiny_gpu_check_writes_the_three_parts(tmp_path: Path) -> None:
    out, scratch = tmp_path / "out", tmp_path / "scratch"
    env = dict(
        os.environ,
        TINY="1",
        DEVICE="cpu",
        OUT=str(out),
        SCRATCH=str(scratch),
        PY=sys.executable,
        PYTHONPATH=str(ROOT / "src"),
        DATA=str(tmp_path / "no-data"),
        OMP_NUM_THREADS="1",
    )
    done = subprocess.run(
        ["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert 0 < len(files) <= 8, files
    summary = (out / "summary.md").read_text()
    for heading in ("## a. Environment and parity", "## b. Speed", "## c. The papers' protocol"):
        assert heading in summary
    rows = [json.loads(line) for line in (out / "parity.jsonl").read_text().splitlines()]
    measured = {r["method"] for r in rows if "delta_cosine" in r and "gap" in r}
    assert {"alfa", "afan", "l-alfa", "advbn", "pgd-at"} <= measured, rows
    for method in ("alfa", "afan", "l-alfa", "advbn", "pgd-at"):
        assert f"| {method} | bf16 |" in summary
    # ALFA and A-FAN keep their δ under bf16 (float32 perturbations)
    by_method = {r["method"]: r for r in rows}
    assert by_method["alfa"]["delta_cosine"] > 0.99 and by_method["afan"]["delta_cosine"] > 0.99
    # part b wrote its rows; part c trained the three arms and tabulated them
    bench = json.loads((out / "bench_resnet20.json").read_text())
    assert "standard" in bench["methods"] and len(bench["methods"]) >= 2
    assert "| standard |" in (out / "compare.md").read_text()
    with tarfile.open(out / "results.tar.gz") as tar:
        names = tar.getnames()
    assert not [n for n in names if n.endswith(".pt")]
    assert any(n.endswith("paper.json") for n in names)
    # the short table comes last
    tail = done.stdout.strip().splitlines()[-6:]
    assert tail[0].startswith("| part |") and tail[-1].startswith("| d |")
    assert "## d. A small ViT" in summary
    # part b also packed two seeds into one model, the same training as two separate models
    assert "### Several seeds in one process" in summary
    assert "| 2 | pass |" in summary
