"""The trainer: resume equivalence, NaN guard, atomic checkpoints, history and metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from advfeat.errors import AdvfeatError
from advfeat.train import TrainConfig, Trainer, TrainingDiverged, load_checkpoint, save_checkpoint
from advfeat.train.schedule import lr_factor
from helpers import interrupt_after_epoch, tiny_train_config


def tiny_config(**overrides: object) -> TrainConfig:
    """3 epochs in batches of 32 on 192 images."""
    schedule = dict(epochs=3, batch_size=32, eval_batch_size=64, lr=0.05)
    return tiny_train_config(n_train=192, n_test=64, **(schedule | overrides))


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def test_run_folder_contents(tmp_path: Path) -> None:
    metrics = Trainer(tiny_config(epochs=2), tmp_path / "run").fit()
    run = tmp_path / "run"
    for name in ("config.yaml", "checkpoint.pt", "history.csv", "metrics.json"):
        assert (run / name).is_file(), name
    saved = json.loads((run / "metrics.json").read_text())
    for key in (
        "method",
        "model",
        "dataset",
        "epochs",
        "seed",
        "clean_acc",
        "train_time_s",
        "history",
    ):
        assert key in saved
    assert saved == json.loads(json.dumps(metrics))
    assert [row["epoch"] for row in saved["history"]] == [1, 2]
    assert 0.0 <= saved["clean_acc"] <= 1.0
    assert (run / "history.csv").read_text().splitlines()[0].startswith("epoch,")


def test_resume_after_a_crash_ends_with_the_same_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Trainer(tiny_config(), tmp_path / "straight").fit()

    interrupt_after_epoch(monkeypatch, 2)  # killed as epoch three starts
    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_config(), tmp_path / "killed").fit()
    assert load_checkpoint(tmp_path / "killed" / "checkpoint.pt")["epoch"] == 1
    assert not (tmp_path / "killed" / "metrics.json").exists()
    monkeypatch.undo()  # no longer killed

    Trainer(tiny_config(), tmp_path / "killed", resume=True).fit()
    a, b = (
        weights(tmp_path / "straight" / "checkpoint.pt"),
        weights(tmp_path / "killed" / "checkpoint.pt"),
    )
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    h1 = json.loads((tmp_path / "straight" / "metrics.json").read_text())["history"]
    h2 = json.loads((tmp_path / "killed" / "metrics.json").read_text())["history"]
    assert [r["train_loss"] for r in h1] == [r["train_loss"] for r in h2]


def test_same_seed_same_weights_other_seed_other_weights(tmp_path: Path) -> None:
    Trainer(tiny_config(epochs=1), tmp_path / "a").fit()
    Trainer(tiny_config(epochs=1), tmp_path / "b").fit()
    Trainer(tiny_config(epochs=1, seed=1), tmp_path / "c").fit()
    a, b, c = (weights(tmp_path / n / "checkpoint.pt") for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = Trainer(tiny_config(), tmp_path / "run")
    original = Trainer.train_epoch

    def poison(self: Trainer, epoch: int) -> dict:
        if epoch == 1:
            self.model.fc.weight.data.fill_(float("nan"))
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", poison)
    with pytest.raises(TrainingDiverged, match="last good checkpoint is kept"):
        trainer.fit()
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["epoch"] == 0
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_checkpoint_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"epoch": 1, "w": torch.ones(3)})

    def broken_save(obj: object, fh: object) -> None:
        fh.write(b"half a checkpoint")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"epoch": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_foreign_and_corrupt_checkpoints_are_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(AdvfeatError, match="not an advfeat checkpoint"):
        load_checkpoint(foreign)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage")
    with pytest.raises(AdvfeatError, match="could not be read"):
        load_checkpoint(corrupt)
    with pytest.raises(AdvfeatError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_finished_run_is_not_overwritten_without_force(tmp_path: Path) -> None:
    Trainer(tiny_config(epochs=1), tmp_path / "run").fit()
    with pytest.raises(AdvfeatError, match="--force"):
        Trainer(tiny_config(epochs=1), tmp_path / "run")
    Trainer(tiny_config(epochs=1), tmp_path / "run", force=True)


def test_best_validation_checkpoint(tmp_path: Path) -> None:
    metrics = Trainer(
        tiny_config(epochs=2, val_fraction=0.25, select_best=True), tmp_path / "run"
    ).fit()
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    vals = [row["val_acc"] for row in metrics["history"]]
    assert best["best_val"] == max(vals) == metrics["best_val_acc"]
    assert best["epoch"] == vals.index(max(vals))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("epochs", 0, "epochs must be an integer >= 1"),
        ("batch_size", -1, "batch_size must be an integer >= 1"),
        ("val_fraction", 1.0, r"val_fraction must be a number in \[0, 1\)"),
        ("schedule", "cosin", "did you mean 'cosine'"),
    ],
)
def test_bad_config_values(field: str, value: object, message: str) -> None:
    cfg = tiny_config()
    setattr(cfg, field, value)
    with pytest.raises(AdvfeatError, match=message):
        cfg.validate()


def test_schedules() -> None:
    kw = {"total_epochs": 200, "milestones": [0.5, 0.75], "gamma": 0.1}
    assert lr_factor(0, schedule="multistep", **kw) == 1.0
    assert lr_factor(100, schedule="multistep", **kw) == pytest.approx(0.1)
    assert lr_factor(150, schedule="multistep", **kw) == pytest.approx(0.01)
    assert lr_factor(0, schedule="cosine", **kw) == 1.0
    assert lr_factor(100, schedule="cosine", **kw) == pytest.approx(0.5)
    assert lr_factor(200, schedule="cosine", **kw) == pytest.approx(0.0)
    warm = [lr_factor(e, schedule="cosine", warmup_epochs=5, **kw) for e in (0, 2.5, 4.9)]
    assert warm == sorted(warm) and warm[0] < 0.01 and warm[-1] < 1
    assert lr_factor(5, schedule="cosine", warmup_epochs=5, **kw) == pytest.approx(1.0)
