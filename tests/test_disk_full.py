"""A full disk during a checkpoint write: one line naming the file and the free space, its own
exit status, the previous checkpoint intact and the run resumable once there is space again."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest
import torch

from advfeat.checkpoint import load_checkpoint, save_checkpoint
from advfeat.cli import DISK_FULL_EXIT, main
from advfeat.errors import DiskFull


def fill_the_disk_after(
    monkeypatch: pytest.MonkeyPatch, saves: int, *, as_torch_says_it: bool = False
) -> None:
    """Let ``saves`` checkpoint writes through; every later one runs out of space half-way.

    ``as_torch_says_it``: the way a real full disk reaches the caller of ``torch.save`` (seen
    on a full tmpfs): closing the zip writer raises a ``RuntimeError`` while the ``OSError`` is
    handled."""
    real_save = torch.save
    done = 0

    def save(obj: Any, fh: Any, *args: Any, **kwargs: Any) -> None:
        nonlocal done
        if done < saves:
            done += 1
            real_save(obj, fh, *args, **kwargs)
            return
        fh.write(b"half a checkpoint")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        finally:
            if as_torch_says_it:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")

    monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize("as_torch_says_it", [False, True])
def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so_in_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    as_torch_says_it: bool,
) -> None:
    run = tmp_path / "run"
    args = [
        "train", "--method", "standard", "--epochs", "2", "--batch-size", "16", "--device", "cpu",
        "--out", str(run), "--quiet", "--set", "dataset_options={n_train: 32, n_test: 16, "
        "image_size: 16}", "--set", "eval_shifted=false", "--set", "max_steps_per_epoch=1",
    ]  # fmt: skip
    # epoch 1 is saved, epoch 2 finds the disk full
    fill_the_disk_after(monkeypatch, saves=1, as_torch_says_it=as_torch_says_it)
    code = main(args)
    err = capsys.readouterr().err
    assert code == DISK_FULL_EXIT != 2, err
    assert err.count("\n") == 1 and err.startswith("advfeat: error: no space left"), err
    assert repr(str(run / "checkpoint.pt")) in err and " free there" in err
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 0  # epoch 1, unharmed
    assert sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp")) == []
    monkeypatch.undo()  # space again: the run continues where it stopped
    assert main([*args, "--resume"]) == 0
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 1


def test_disk_full_is_an_os_error_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state.pt"
    save_checkpoint(path, {"epoch": 0})
    fill_the_disk_after(monkeypatch, saves=0)
    with pytest.raises(DiskFull) as caught:
        save_checkpoint(path, {"epoch": 1})
    assert isinstance(caught.value, OSError) and caught.value.errno == errno.ENOSPC
    assert caught.value.filename == str(path)
    assert str(caught.value).startswith(f"no space left on the device to write {str(path)!r}")
    assert "the previous state.pt is kept" in str(caught.value)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 0
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]
