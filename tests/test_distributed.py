"""DDP: two CPU processes under torchrun (gloo) train the same model as one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from advfeat.train import load_checkpoint
from advfeat.train.distributed import DistInfo, EpochSampler

# A model without batch norm: per-process BN statistics legitimately differ from one-process ones
# (that is what SyncBatchNorm is for), everything else must agree.
ARGS = [
    "train",
    "--method",
    "standard",
    "--model",
    "torchvision:squeezenet1_1",
    "--dataset",
    "shapes",
    "--epochs",
    "2",
    "--batch-size",
    "32",
    "--seed",
    "3",
    "--device",
    "cpu",
    "--quiet",
    "--set",
    "model_options={dropout: 0.0}",
    "--set",
    "dataset_options={n_train: 128, n_test: 32, image_size: 32}",
    "--set",
    "eval_shifted=false",
    "--set",
    "augment=false",
    "--set",
    "lr=0.02",
]


def _worker_logs(folder: Path) -> str:
    """The end of every torchrun worker's log under ``folder``: the launcher's own summary only
    says that a worker failed, its log says why."""
    logs = sorted(folder.rglob("*.log")) if folder.is_dir() else []
    return "".join(f"\n--- {log.relative_to(folder)}:\n{log.read_text()[-1500:]}" for log in logs)


def test_sampler_ranks_partition_the_single_process_batches() -> None:
    single = list(EpochSampler(100, seed=1))
    ranks = [list(EpochSampler(100, seed=1, info=DistInfo(r, 2, r))) for r in range(2)]
    for step in range(len(single) // 10):
        batch = set(single[step * 10 : (step + 1) * 10])
        assert batch == set(ranks[0][step * 5 : (step + 1) * 5]) | set(
            ranks[1][step * 5 : (step + 1) * 5]
        )
    other_epoch = EpochSampler(100, seed=1)
    other_epoch.set_epoch(1)
    assert list(other_epoch) != single


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [[], ["--set", "device_data=true", "--set", "augment=true"]],
    ids=["dataloader", "device-data-augmented"],  # crops drawn by epoch position: the same in both
)
def test_two_gloo_processes_train_the_same_model_as_one(tmp_path: Path, extra: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    one = subprocess.run(
        [sys.executable, "-m", "advfeat.cli", *ARGS, *extra, "--out", str(tmp_path / "one")],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "--log-dir",
            str(tmp_path / "workers"),
            "--redirects",
            "3",  # each worker's stdout and stderr into a file, shown if the run fails
            "-m",
            "advfeat.cli",
            *ARGS,
            *extra,
            "--out",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert two.returncode == 0, two.stderr[-1000:] + _worker_logs(tmp_path / "workers")
    a = load_checkpoint(tmp_path / "one" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "two" / "checkpoint.pt")
    assert a["epoch"] == b["epoch"] == 1
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    losses = [r["train_loss"] for r in a["history"]]
    assert losses[0] != losses[1]  # the model trained
    assert [r["train_loss"] for r in a["history"]] == pytest.approx(
        [r["train_loss"] for r in b["history"]], rel=1e-4
    )
