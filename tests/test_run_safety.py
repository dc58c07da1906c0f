"""Fault injection: no command destroys, mixes or silently corrupts a user's runs and results.

Each numbered test reproduces one item of issue #10 ("Run safety"); the rest kill writers with
``kill -9``, preempt with SIGTERM mid-epoch, and run two writers at once. Runs are tiny (64
training images, one or two steps per epoch).
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

import advfeat
from advfeat.checkpoint import FORMAT, remove_stale_temporaries
from advfeat.cli import main
from advfeat.errors import AdvfeatError
from advfeat.eval.context import PARTIAL_FORMAT
from advfeat.train import TrainConfig, Trainer, TrainingDiverged, load_checkpoint, save_checkpoint
from advfeat.train.preemption import PREEMPTED_EXIT, Preempted
from helpers import interrupt_after_epoch, tiny_train_config

SRC = str(Path(advfeat.__file__).resolve().parents[1])  # the advfeat under test, for subprocesses
TINY = ["--set", "dataset_options={n_train: 64, n_test: 32, image_size: 16}"]
TINY += ["--set", "eval_shifted=false", "--set", "max_steps_per_epoch=2"]


def train_args(out: Path, *extra: str, epochs: int = 2) -> list[str]:
    return [
        "train", "--method", "standard", "--model", "resnet20", "--dataset", "shapes",
        "--epochs", str(epochs), "--batch-size", "16", "--seed", "0", "--device", "cpu",
        "--out", str(out), "--quiet", *TINY, *extra,
    ]  # fmt: skip


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


def one_line_error(err: str) -> str:
    assert err.count("\n") == 1 and err.startswith("advfeat: error:"), err
    assert "Traceback" not in err
    return err


def tiny_config(**overrides: object) -> TrainConfig:
    """3 epochs of at most 2 steps of 16 on 64 images."""
    schedule = dict(epochs=3, batch_size=16, eval_batch_size=32, lr=0.05, max_steps_per_epoch=2)
    return tiny_train_config(n_train=64, n_test=32, **(schedule | overrides))


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# ------------------------------------------------------------------------------ item 1
def test_01_forgetting_resume_does_not_destroy_an_interrupted_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert cli(train_args(run, epochs=1), capsys)[0] == 0
    (run / "metrics.json").unlink()  # as if killed after its checkpoint
    before = (run / "checkpoint.pt").read_bytes()
    code, err = cli(train_args(run, epochs=1), capsys)
    assert code == 2 and "--resume" in one_line_error(err) and "interrupted" in err
    assert (run / "checkpoint.pt").read_bytes() == before


# ------------------------------------------------------------------------------ item 2
def test_02_eval_resume_never_reuses_another_models_results(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli(train_args(a, epochs=1), capsys)[0] == 0
    assert cli([*train_args(b, epochs=1), "--seed", "1"], capsys)[0] == 0
    out = tmp_path / "e.json"
    base = ["--suite", "clean", "--max-images", "16", "--no-plots", "--no-report", "--quiet"]
    assert main(["eval", "--checkpoint", str(a / "checkpoint.pt"), "--out", str(out), *base]) == 0
    first = json.loads(out.read_text())
    # an interrupted evaluation of A leaves its partial results; resume it with checkpoint B
    partial = out.with_name("e.json.partial")
    partial.write_text(
        json.dumps(
            {
                "format": PARTIAL_FORMAT,
                "fingerprint": first["resume_key"],
                "units": {"clean": {"top1": 0.123456, "n": 16}},
            }
        )
    )
    out.unlink()
    capsys.readouterr()
    args = ["eval", "--checkpoint", str(b / "checkpoint.pt"), "--out", str(out), *base]
    code, err = cli([*args, "--resume"], capsys)
    assert code == 2 and "another checkpoint" in one_line_error(err)
    # the same checkpoint still resumes
    args_a = ["eval", "--checkpoint", str(a / "checkpoint.pt"), "--out", str(out), *base]
    assert main([*args_a, "--resume"]) == 0
    resumed = json.loads(out.read_text())
    assert resumed["reused_units"] == 1 and resumed["suites"]["clean"]["top1"] == 0.123456
    assert resumed["run"]["checkpoint_digest"] == load_checkpoint(a / "checkpoint.pt")["digest"]


# ------------------------------------------------------------------------------ item 3
def fixed_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation accuracy 0.1, 0.5, 0.2 for epochs 1-3: epoch 2 is the best."""
    original = Trainer.evaluate_into

    def evaluate_into(self: Trainer, row: dict, split: str, dataset: object) -> float:
        if split != "val":
            return original(self, row, split, dataset)
        row["val_acc"] = {1: 0.1, 2: 0.5, 3: 0.2}[row["epoch"]]
        return float(row["val_acc"])

    monkeypatch.setattr(Trainer, "evaluate_into", evaluate_into)


def test_03_kill_between_checkpoint_and_best_never_mixes_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import advfeat.train.trainer as trainer_module

    cfg = tiny_config(val_fraction=0.25, select_best=True, epochs=3)
    fixed_validation(monkeypatch)
    Trainer(tiny_config(val_fraction=0.25, select_best=True, epochs=3), tmp_path / "ref").fit()
    assert load_checkpoint(tmp_path / "ref" / "best.pt")["epoch"] == 1
    real_save = trainer_module.save_checkpoint

    def killed_before_best(path: Path, state: dict) -> str:
        if Path(path).name == "best.pt" and state["epoch"] == 1:
            raise KeyboardInterrupt  # the kill lands between checkpoint.pt and best.pt
        return real_save(path, state)

    monkeypatch.setattr(trainer_module, "save_checkpoint", killed_before_best)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, tmp_path / "run").fit()
    monkeypatch.setattr(trainer_module, "save_checkpoint", real_save)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["best_epoch"] == ckpt["epoch"] == 1
    assert load_checkpoint(tmp_path / "run" / "best.pt")["epoch"] == 0  # stale, as after a kill
    metrics = Trainer(cfg, tmp_path / "run", resume=True).fit()
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best["epoch"] == 1 and metrics["best_val_acc"] == best["best_val"] == 0.5
    assert same_weights(tmp_path / "run" / "best.pt", tmp_path / "ref" / "best.pt")
    ref_metrics = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    assert metrics["clean_acc"] == ref_metrics["clean_acc"]


def test_03_best_pt_disagreeing_with_checkpoint_is_detected_at_the_end(tmp_path: Path) -> None:
    cfg = tiny_config(val_fraction=0.25, select_best=True, epochs=1)
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.fit()
    state = load_checkpoint(tmp_path / "run" / "best.pt")
    state["epoch"] = 7
    save_checkpoint(tmp_path / "run" / "best.pt", state)
    with pytest.raises(AdvfeatError, match="not the best epoch 1"):
        trainer.finish()


# ------------------------------------------------------------------------------ item 4
@pytest.mark.parametrize(
    ("extra", "key"),
    [
        (["--lr", "0.5"], "lr"),
        (["--epochs", "3"], "epochs"),
        (["--set", "dataset_options={n_train: 96, n_test: 32, image_size: 16}"], "dataset_options"),
    ],
)
def test_04_resume_refuses_another_experiment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], key: str
) -> None:
    run = tmp_path / "run"
    assert cli(train_args(run), capsys)[0] == 0  # finished: --epochs 3 would extend it
    before = (run / "metrics.json").read_text()
    code, err = cli([*train_args(run), *extra, "--resume"], capsys)
    assert code == 2 and f"{key}:" in one_line_error(err) and "changes the saved experiment" in err
    assert (run / "metrics.json").read_text() == before


def test_04_library_resume_refuses_another_experiment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    interrupt_after_epoch(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_config(), tmp_path / "run").fit()
    monkeypatch.undo()
    with pytest.raises(AdvfeatError, match=r"lr: 0\.05 → 0\.2.*weight_decay"):
        Trainer(tiny_config(lr=0.2, weight_decay=0.0), tmp_path / "run", resume=True)


def test_04_resume_needs_no_other_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    Trainer(tiny_config(), tmp_path / "straight").fit()
    interrupt_after_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_config(), tmp_path / "run").fit()
    monkeypatch.undo()
    args = ["train", "--out", str(tmp_path / "run"), "--resume", "--quiet"]
    assert main([*args, "--show-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["lr"] == 0.05
    assert main([*args, "--device", "cpu"]) == 0  # device may change
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["config"]["lr"] == 0.05 and metrics["epochs"] == 3
    assert same_weights(tmp_path / "run" / "checkpoint.pt", tmp_path / "straight" / "checkpoint.pt")


def test_auto_resume_for_requeued_jobs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert cli(train_args(run, "--auto-resume"), capsys)[0] == 0  # nothing there: fresh
    assert (run / "metrics.json").is_file()
    stamp = (run / "metrics.json").stat().st_mtime_ns
    code, err = cli(train_args(run, "--auto-resume"), capsys)  # finished: nothing to do
    assert code == 0 and "finished" in err and (run / "metrics.json").stat().st_mtime_ns == stamp
    (run / "metrics.json").unlink()  # interrupted: resumed, not restarted
    code, err = cli(train_args(run, "--auto-resume"), capsys)
    assert code == 0 and (run / "metrics.json").is_file()
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 1


# ------------------------------------------------------------------------------ item 5
def test_05_damaged_checkpoint_is_refused_everywhere(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert cli(train_args(run, epochs=1), capsys)[0] == 0
    path = run / "checkpoint.pt"
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:  # flip 64 bytes inside the largest tensor's record
        info = max(zf.infolist(), key=lambda i: i.file_size)
    offset = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 64
    for i in range(offset, offset + 64):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(AdvfeatError, match="damaged"):
        load_checkpoint(path)
    code, err = cli(["eval", "--checkpoint", str(path), "--out", str(tmp_path / "e.json")], capsys)
    assert code == 2 and "damaged" in one_line_error(err)
    (run / "metrics.json").unlink()
    code, err = cli([*train_args(run, epochs=1), "--resume"], capsys)
    assert code == 2 and "damaged" in one_line_error(err)
    assert load_checkpoint(path, verify=False)["format"] == FORMAT


def test_05_method_checkpoints_are_verified(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert cli(train_args(run, epochs=1), capsys)[0] == 0
    state = load_checkpoint(run / "checkpoint.pt")
    state["model"]["fc.bias"] = state["model"]["fc.bias"] + 1  # content no longer matches
    torch.save(state, run / "tampered.pt")
    args = train_args(tmp_path / "advbn", epochs=1)
    args[args.index("standard")] = "advbn"
    code, err = cli(
        [*args, "--set", f"method_options.init_checkpoint={run / 'tampered.pt'}"], capsys
    )
    assert code == 2 and "damaged" in one_line_error(err)


# ------------------------------------------------------------------------------ item 6
def test_06_force_clears_the_old_run_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert cli(train_args(run), capsys)[0] == 0
    (run / "eval.json").write_text("{}")
    interrupt_after_epoch(monkeypatch, 1)
    assert main([*train_args(run), "--force"]) == 130
    monkeypatch.undo()
    names = sorted(p.name for p in run.iterdir())
    assert "metrics.json" not in names and "eval.json" not in names, names
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 0
    code, err = cli(train_args(run), capsys)  # reads as interrupted, not finished
    assert code == 2 and "--resume" in err


# ------------------------------------------------------------------------------ item 7
def _spawn_train(out: Path, *extra: str, epochs: int = 2) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "advfeat.cli", *train_args(out, *extra, epochs=epochs)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_07_a_second_writer_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from advfeat.train.rundir import RunLock

    run = tmp_path / "run"
    with RunLock(run):  # the first writer, holding the run folder
        code, err = cli(train_args(run, epochs=1), capsys)
        assert code == 2 and "in use by another advfeat process" in one_line_error(err)
        assert str(os.getpid()) in err
    assert not (run / "checkpoint.pt").exists()
    assert cli(train_args(run, epochs=1), capsys)[0] == 0  # released


def test_07_two_concurrent_trainings_one_wins(tmp_path: Path) -> None:
    run = tmp_path / "run"
    procs = [_spawn_train(run, "--set", "max_steps_per_epoch=3", epochs=3) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read() if p.stderr else "") for p in procs]
    codes = sorted(code for code, _ in results)
    # one trains; the other is refused (the lock, or the finished / interrupted run it finds)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "Traceback" not in loser
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 3 and len(metrics["history"]) == 3


# ------------------------------------------------------------------------------ item 8
def test_08_exploded_weights_are_never_checkpointed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = Trainer.train_epoch

    def explode_in_epoch_two(self: Trainer, epoch: int) -> dict:
        if epoch == 1:  # huge but finite weights: the loss stays finite, their norm does not
            with torch.no_grad():
                self.model.fc.weight.mul_(1e25)
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", explode_in_epoch_two)
    with pytest.raises(TrainingDiverged, match=r"too large.*epoch 2, step 1.*last good checkpoint"):
        Trainer(tiny_config(max_steps_per_epoch=1), tmp_path / "run").fit()
    monkeypatch.undo()
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["epoch"] == 0
    for t in state["model"].values():
        if t.is_floating_point():
            assert torch.isfinite(torch.linalg.vector_norm(t.float()))
    metrics = Trainer(tiny_config(max_steps_per_epoch=1), tmp_path / "run", resume=True).fit()
    assert len(metrics["history"]) == 3  # the kept checkpoint resumes


def test_08_a_huge_learning_rate_stops_at_the_first_step(tmp_path: Path) -> None:
    # lr 1e30: one step makes the weights ~1e29 while the loss is still finite
    cfg = tiny_config(lr=1e30, max_steps_per_epoch=1, epochs=3, momentum=0.0)
    with pytest.raises(TrainingDiverged, match=r"too large.*epoch 1, step 1"):
        Trainer(cfg, tmp_path / "run").fit()
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


# ------------------------------------------------------------------------------ item 9
def test_09_nothing_is_written_before_the_run_is_validated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = train_args(tmp_path / "new")
    bad[bad.index("standard")] = "advprp"
    code, err = cli(bad, capsys)
    assert code == 2 and "unknown method" in one_line_error(err)
    assert not (tmp_path / "new").exists()
    run = tmp_path / "run"
    assert cli(train_args(run), capsys)[0] == 0
    before = (run / "config.yaml").read_text()
    code, _ = cli([*train_args(run), "--lr", "0.3", "--resume"], capsys)
    assert code == 2 and (run / "config.yaml").read_text() == before


# ------------------------------------------------------------------------------ item 10
def record_dataset_builds(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, object]]:
    """Record ``(dataset name, root)`` of every dataset built from now on."""
    import advfeat.data.bundle as bundle

    built: list[tuple[str, object]] = []
    real_get = bundle.DATASETS.get

    def get(name: str) -> object:
        factory = real_get(name)

        def recorded(root: object = None, **kw: object) -> object:
            built.append((name, root))
            return factory(None if name == "shapes" else root, **kw)  # shapes is generated

        recorded.__signature__ = inspect.signature(factory)  # type: ignore[attr-defined]
        return recorded

    monkeypatch.setattr(bundle.DATASETS, "get", get)
    return built


def test_10_eval_follows_moved_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    old, new = tmp_path / "old_data", tmp_path / "new_data"
    old.mkdir()
    assert cli([*train_args(run, epochs=1), "--data-dir", str(old)], capsys)[0] == 0
    old.rename(new)
    built = record_dataset_builds(monkeypatch)
    args = ["eval", "--checkpoint", str(run / "checkpoint.pt"), "--out", str(tmp_path / "e.json")]
    assert main([*args, "--data-dir", str(new), "--suite", "clean", "--no-plots", "--quiet"]) == 0
    assert built == [("shapes", str(new))]  # built once, from where the data lies now


def test_10_eval_on_another_dataset_does_not_rebuild_the_training_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    run = tmp_path / "run"
    assert cli(train_args(run, epochs=1), capsys)[0] == 0
    folder = tmp_path / "folder"
    names = load_checkpoint(run / "checkpoint.pt")["class_names"]
    for split in ("train", "val"):
        for k, name in enumerate(names):
            (folder / split / name).mkdir(parents=True)
            Image.new("RGB", (16, 16), (30 * k, 90, 20)).save(folder / split / name / "0.png")
    built = record_dataset_builds(monkeypatch)
    args = ["eval", "--checkpoint", str(run / "checkpoint.pt"), "--out", str(tmp_path / "e.json")]
    args += ["--dataset", "imagefolder", "--data-dir", str(folder), "--suite", "clean"]
    args += ["--dataset-option", "image_size=16", "--no-plots", "--quiet"]
    assert main(args) == 0, capsys.readouterr().err
    assert built == [("imagefolder", str(folder))]  # the training dataset was not rebuilt
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["data"]["test_size"] == len(names) and result["run"]["dataset"] == "imagefolder"


# ------------------------------------------------------------------------------ item 11
def test_11_eval_never_overwrites_results_or_discards_partial_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert cli(train_args(run, epochs=1), capsys)[0] == 0
    out = tmp_path / "e.json"
    args = ["eval", "--checkpoint", str(run / "checkpoint.pt"), "--out", str(out)]
    args += ["--suite", "clean", "--max-images", "8", "--no-plots", "--quiet"]
    assert main(args) == 0
    out.write_text('{"mine": 1}')
    code, err = cli(args, capsys)
    assert code == 2 and "--force" in one_line_error(err)
    assert out.read_text() == '{"mine": 1}'
    out.unlink()
    partial = out.with_name("e.json.partial")
    partial.write_text("{}")
    code, err = cli(args, capsys)
    assert code == 2 and "--resume" in one_line_error(err) and partial.read_text() == "{}"
    assert main([*args, "--force"]) == 0
    assert json.loads(out.read_text())["format"] == "advfeat-eval/1" and not partial.exists()


# ------------------------------------------------------------------------------ item 12
def test_12_stale_temporaries_are_removed_and_files_respect_the_umask(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    stale = run / ".checkpoint.pt.abc123.tmp"
    stale.write_bytes(b"half")
    old = os.umask(0o002)
    try:
        assert cli(train_args(run, epochs=1), capsys)[0] == 0
    finally:
        os.umask(old)
    assert not stale.exists()
    for name in ("checkpoint.pt", "metrics.json", "config.yaml", "history.csv"):
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o664, name
    assert remove_stale_temporaries(run, ["checkpoint.pt"]) == []
    other = run / ".eval.json.xyz.tmp"  # another command's write in progress: not ours to remove
    other.write_text("{}")
    stale.write_bytes(b"half")
    assert remove_stale_temporaries(run, ["checkpoint.pt"]) == [stale] and other.exists()


# ------------------------------------------------------------------------------ item 13
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "epochs=.nan"], "epochs must be an integer, got nan"),
        (["--lr", "1e39"], r"lr must be a number in \(0, 3.40282e\+38\], got 1e\+39"),
        (["--set", "lr=.nan"], r"lr must be a number in \(0, "),
        (["--set", "lr=.inf"], r"lr must be a number in \(0, "),
        (["--set", "weight_decay=-5"], r"weight_decay must be a number in \[0"),
        (["--seed", "-1"], r"seed must be an integer in \[0, 4294967295\], got -1"),
        (["--set", "max_steps_per_epoch=-3"], "max_steps_per_epoch must be an integer >= 1"),
        (["--set", "warmup_epochs=.nan"], "warmup_epochs must be in"),
        (["--set", "momentum=.inf"], r"momentum must be a number in \[0, 1\]"),
        (["--set", "eval_batch_size=0"], "eval_batch_size must be an integer >= 1, got 0"),
    ],
)
def test_13_bad_values_are_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    import re

    code, err = cli(train_args(tmp_path / "run", *extra), capsys)
    assert code == 2 and re.search(message, one_line_error(err)), err
    assert not (tmp_path / "run").exists()


def test_13_unwritable_out_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, err = cli(train_args(afile), capsys)
    assert code == 2 and "is a file, not a folder" in one_line_error(err)
    code, err = cli(train_args(afile / "sub"), capsys)
    assert code == 2 and "is a file, not a folder" in one_line_error(err)
    assert afile.read_text() == "x"


def test_13_bench_json_into_a_folder_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["bench", "--model", "resnet20", "--batch-size", "2", "--methods", "standard"]
    code, err = cli([*args, "--iters", "1", "--json", str(tmp_path)], capsys)
    assert code == 2 and "folder" in one_line_error(err)


def _jpeg_zip(path: Path, *, broken: str | None = None) -> None:
    """A tiny cifar10-jpeg zip (stored, not compressed); ``broken``: the entry to damage."""
    import io

    from PIL import Image

    from advfeat.data.real import CIFAR10_CLASSES

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for split in ("train", "test"):
            for c, name in enumerate(CIFAR10_CLASSES):
                buffer = io.BytesIO()
                Image.new("RGB", (32, 32), (20 * c, 100, 10)).save(buffer, "JPEG")
                entry = f"{split}/{name}/0000.jpg"
                data = b"not a jpeg at all" if entry == broken else buffer.getvalue()
                archive.writestr(entry, data)


def test_13_undecodable_jpeg_names_the_file(tmp_path: Path) -> None:
    from advfeat.data.real import load_cifar10_jpeg

    _jpeg_zip(tmp_path / "cifar10-jpeg.zip", broken="train/cat/0000.jpg")
    with pytest.raises(AdvfeatError, match=r"'train/cat/0000\.jpg' cannot be read"):
        load_cifar10_jpeg(tmp_path, cache_dir=tmp_path / "cache")


def test_13_zip_with_a_bad_crc_names_the_file(tmp_path: Path) -> None:
    from advfeat.data.real import load_cifar10_jpeg

    path = tmp_path / "cifar10-jpeg.zip"
    _jpeg_zip(path)
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("test/dog/0000.jpg")
    data = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + 200] ^= 0xFF  # inside the stored JPEG: the CRC no longer matches
    path.write_bytes(bytes(data))
    with pytest.raises(AdvfeatError, match=r"'test/dog/0000\.jpg' cannot be read.*CRC"):
        load_cifar10_jpeg(tmp_path, cache_dir=tmp_path / "cache")


def test_13_truncated_decoded_cache_is_rebuilt(tmp_path: Path) -> None:
    from advfeat.data.real import load_cifar10_jpeg

    _jpeg_zip(tmp_path / "cifar10-jpeg.zip")
    cache = tmp_path / "cache"
    first = load_cifar10_jpeg(tmp_path, cache_dir=cache)
    images = next(cache.glob("*-train-images.npy"))
    images.write_bytes(images.read_bytes()[:-500])  # truncated, e.g. by a full disk
    with pytest.warns(UserWarning, match="is damaged"):
        again = load_cifar10_jpeg(tmp_path, cache_dir=cache)
    assert torch.equal(again["train"][0], first["train"][0])
    assert load_cifar10_jpeg(tmp_path, cache_dir=cache)["train"][0].shape == (10, 3, 32, 32)


# ------------------------------------------------------------------------------ preemption
@pytest.mark.parametrize("method", ["standard", "l-alfa"])
def test_sigterm_mid_epoch_then_resume_is_bit_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    cfg = tiny_config(max_steps_per_epoch=3, epochs=2, method=method)
    Trainer(
        tiny_config(max_steps_per_epoch=3, epochs=2, method=method), tmp_path / "straight"
    ).fit()
    original = Trainer.set_lr
    sent = {"done": False}

    def signal_in_epoch_two(self: Trainer, progress: float, *rest: int) -> float:
        if progress > 1.0 and not sent["done"]:  # second step of the second epoch
            sent["done"] = True
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, progress, *rest)

    monkeypatch.setattr(Trainer, "set_lr", signal_in_epoch_two)
    with pytest.raises(Preempted, match="SIGTERM"):
        Trainer(cfg, tmp_path / "run").fit()
    monkeypatch.undo()
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert saved["epoch"] == 0 and saved["partial"]["epoch"] == 1
    assert saved["partial"]["step"] == 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored
    Trainer(cfg, tmp_path / "run", resume=True).fit()
    assert same_weights(tmp_path / "run" / "checkpoint.pt", tmp_path / "straight" / "checkpoint.pt")
    h1 = json.loads((tmp_path / "straight" / "metrics.json").read_text())["history"]
    h2 = json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]
    assert [r["train_loss"] for r in h1] == [r["train_loss"] for r in h2]
    assert [r["train_acc"] for r in h1] == [r["train_acc"] for r in h2]
    m1 = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")["method"]
    m2 = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["method"]
    assert m1.keys() == m2.keys()
    for key in m1:  # L-ALFA's learnable strengths η among them
        assert torch.equal(m1[key], m2[key]) if torch.is_tensor(m1[key]) else m1[key] == m2[key]


def test_sigterm_from_outside_exits_75_and_resumes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    extra = ("--set", "max_steps_per_epoch=3")
    proc = _spawn_train(run, *extra, epochs=12)
    deadline = time.monotonic() + 120
    while not (run / "checkpoint.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.01)  # the first epoch is written: the run is training
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=120)
    err = proc.stderr.read() if proc.stderr else ""
    assert code == PREEMPTED_EXIT, err
    assert "SIGTERM received" in err and "--resume" in err and "Traceback" not in err
    assert not (run / "metrics.json").exists()
    stopped_at = load_checkpoint(run / "checkpoint.pt")["epoch"]
    assert stopped_at < 11
    assert main(train_args(run, *extra, "--resume", epochs=12)) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert [r["epoch"] for r in metrics["history"]] == list(range(1, 13))


# ------------------------------------------------------------------------------ kill -9
def test_rapid_kill_9_during_checkpoint_writes_never_leaves_a_bad_file(tmp_path: Path) -> None:
    run = tmp_path / "run"
    extra = ("--set", "max_steps_per_epoch=1", "--auto-resume")
    kills_during_write = 0
    for _ in range(4):
        proc = _spawn_train(run, *extra, epochs=30)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
            if list(run.glob(".*.tmp")):  # a checkpoint (or history) is being written: kill now
                kills_during_write += 1
                break
        proc.kill()
        proc.wait()
        for path in (run / "checkpoint.pt", run / "best.pt"):
            if path.exists():
                assert load_checkpoint(path)["format"] == FORMAT  # loads, digest verified
    assert kills_during_write >= 1
    assert main(train_args(run, *extra, epochs=30)) == 0
    assert not list(run.glob(".*.tmp"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 30 and [r["epoch"] for r in metrics["history"]] == list(
        range(1, 31)
    )


def test_the_preemption_watch_notes_a_signal_and_restores_the_handlers() -> None:
    from advfeat.train.preemption import PreemptionWatch

    before = signal.getsignal(signal.SIGUSR1)
    watch = PreemptionWatch(torch.device("cpu"))
    with watch:
        assert signal.getsignal(signal.SIGUSR1) is not before
        assert not watch.requested() and watch.name("SIGTERM") == "SIGTERM"
        signal.raise_signal(signal.SIGUSR1)
        assert watch.requested() and watch.name() == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before
