"""A run folder moves between machines: its checkpoint loads without the data it was trained on
(``advfeat export``), and ``advfeat eval --data-dir`` reads the run's dataset where it lies now."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from advfeat.cli import main
from advfeat.eval.loading import load_run, rebuild_model
from advfeat.tasks import ClassificationTask


def _image_folder(root: Path) -> None:
    """Two classes of 16×16 images (red-ish vs blue-ish), ImageNet layout."""
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 8), ("val", 4)):
        for k, name in enumerate(("red", "blue")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = torch.rand(16, 16, 3, generator=g) * 0.5
                pixels[..., 2 * k] += 0.5
                array = (pixels * 255).to(torch.uint8).numpy()
                Image.fromarray(array).save(folder / f"{i}.png")


@pytest.fixture(scope="module")
def moved_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Train on machine A, move run folder and data to machine B, delete A's copies."""
    a, b = tmp_path_factory.mktemp("machine_a"), tmp_path_factory.mktemp("machine_b")
    _image_folder(a / "data")
    args = ["train", "--method", "standard", "--model", "resnet20", "--dataset", "imagefolder"]
    args += ["--data-dir", str(a / "data"), "--epochs", "1", "--batch-size", "8", "--device", "cpu"]
    args += ["--quiet", "--out", str(a / "run"), "--set", "eval_shifted=false"]
    args += ["--set", "dataset_options={image_size: 16}"]
    assert main(args) == 0
    shutil.move(str(a / "run"), str(b / "run"))
    shutil.move(str(a / "data"), str(b / "data"))
    assert not (a / "data").exists()
    return b / "run", b / "data"


def test_moved_checkpoint_rebuilds_without_its_data(moved_run: tuple[Path, Path]) -> None:
    run, _ = moved_run
    rebuilt = rebuild_model(run / "checkpoint.pt")
    assert not rebuilt.data_read
    assert rebuilt.data.num_classes == 2 and rebuilt.data.image_size == 16
    assert isinstance(rebuilt.task, ClassificationTask) and rebuilt.task.num_classes == 2
    assert main(["export", str(run)]) == 0
    assert (run / "export" / "model.pt").is_file()


def test_eval_reads_the_moved_data_with_data_dir(
    moved_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, data = moved_run
    out = tmp_path / "eval.json"
    base = ["eval", "--checkpoint", str(run / "checkpoint.pt"), "--quiet", "--no-plots"]
    base += ["--suite", "clean"]
    assert main([*base, "--out", str(out)]) == 2  # the saved path is gone
    err = capsys.readouterr().err
    assert "--data-dir" in err
    assert main([*base, "--out", str(out), "--data-dir", str(data)]) == 0
    results = json.loads(out.read_text())
    loaded = load_run(run / "checkpoint.pt", data_dir=str(data))
    assert len(loaded.data.test) == 8  # type: ignore[arg-type]
    assert isinstance(loaded.task, ClassificationTask) and "task" not in loaded.info
    assert 0.0 <= results["suites"]["clean"]["top1"] <= 1.0
    assert results["suites"]["clean"]["n"] == 8
