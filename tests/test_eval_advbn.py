"""AdvBN's decoder and the "-AdvBN" test set (AdvBN §3, App. B): the decoder inverts a site's
features of any model, AdvBN images are in [0, 1] and move away from the reconstruction with ε
alone, and the written image folder scores through the shift suite like any other domain."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from advfeat.eval import EvalData, evaluate
from advfeat.eval.advbn_decoder import (
    FeatureDecoder,
    advbn_images,
    reconstruction_error,
    train_decoder,
)
from advfeat.eval.folders import ImageFolderDomain

NAMES = ["red", "green", "blue"]


@pytest.mark.parametrize(("feature", "image"), [(8, 32), (16, 32), (8, 8), (5, 32)])
def test_decoder_maps_any_feature_size_to_images_in_unit_range(feature: int, image: int) -> None:
    dec = FeatureDecoder(12, feature, image)
    with torch.no_grad():
        out = dec(100 * torch.randn(2, 12, feature, feature))
    assert out.shape == (2, 3, image, image)
    assert float(out.min()) >= 0 and float(out.max()) <= 1


@pytest.fixture(scope="module")
def decoder(trained_tiny_model: nn.Module, tiny_task: Any) -> FeatureDecoder:
    train = TensorDataset(tiny_task.x_train[:256], tiny_task.y_train[:256])
    before = {k: v.clone() for k, v in trained_tiny_model.state_dict().items()}
    dec, losses = train_decoder(
        trained_tiny_model, "block1", train, epochs=10, batch_size=32, lr=3e-3, seed=0
    )
    assert len(losses) == 10 and losses[-1] < losses[0]
    after = trained_tiny_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the encoder is frozen
    return dec


def test_decoder_reconstructs_held_out_images(
    trained_tiny_model: nn.Module, tiny_task: Any, decoder: FeatureDecoder
) -> None:
    test = TensorDataset(tiny_task.x_test, tiny_task.y_test)  # never seen in training
    err = reconstruction_error(trained_tiny_model, "block1", decoder, test)
    # the stated bound: after 10 short epochs the decoder explains more than half of the pixel
    # variance of held-out images (a constant-colour guess leaves all of the noise: MSE ≈ var)
    variance = float(tiny_task.x_test.var())
    assert err["mse"] < 0.5 * variance
    assert err["psnr_db"] > 20


def test_advbn_images_are_in_range_and_shift_with_eps_only(
    trained_tiny_model: nn.Module, tiny_task: Any, decoder: FeatureDecoder
) -> None:
    x, y = tiny_task.x_test[:32], tiny_task.y_test[:32]
    change = []
    for eps in (0.0, 0.2, 0.5, 1.1):
        recon, adv = advbn_images(
            trained_tiny_model, "block1", decoder, x, y, eps=eps, alpha=0.2, steps=6, seed=0
        )
        assert adv.shape == x.shape and float(adv.min()) >= 0 and float(adv.max()) <= 1
        change.append(float((adv - recon).abs().mean()))
        if eps == 0:  # no perturbation: the AdvBN image is the reconstruction
            torch.testing.assert_close(adv, recon, atol=1e-5, rtol=0)
    assert change[0] < 1e-5 < change[1] < change[2] < change[3]
    # the perturbation is adversarial: the model does worse on the AdvBN images
    with torch.no_grad():
        acc_recon = float((trained_tiny_model(recon).argmax(1) == y).float().mean())
        acc_adv = float((trained_tiny_model(adv).argmax(1) == y).float().mean())
    assert acc_adv < acc_recon


def test_advbn_suite_writes_a_test_set_the_shift_suite_scores(
    trained_tiny_model: nn.Module, tiny_task: Any, tmp_path: Path
) -> None:
    pytest.importorskip("matplotlib", reason="the plot extra is not installed")
    data = EvalData(
        test=TensorDataset(tiny_task.x_test[:40], tiny_task.y_test[:40]),
        num_classes=3,
        class_names=NAMES,
        image_size=8,
        train=TensorDataset(tiny_task.x_train[:256], tiny_task.y_train[:256]),
    )
    out = tmp_path / "eval.json"
    opts: dict[str, Any] = {
        "advbn_train_images": 256, "advbn_decoder_epochs": 4, "advbn_decoder_batch_size": 32,
        "advbn_decoder_lr": 3e-3, "advbn_batch_size": 16, "advbn_show_images": 3,
    }  # fmt: skip
    model = copy.deepcopy(trained_tiny_model)
    res = evaluate(model, data, ["advbn"], out=out, **opts)["suites"]["advbn"]
    assert res["site"] == "block1" and res["n"] == 40
    folder = tmp_path / "eval_advbn"
    assert res["folders"] == {
        "advbn": str(folder / "advbn"),
        "reconstructed": str(folder / "reconstructed"),
    }
    assert (folder / "decoder.pt").is_file()
    lo, hi = res["pixel_range"]
    assert 0 <= lo <= hi <= 1
    assert res["mean_abs_change"]["advbn_vs_reconstructed"] > 0
    assert res["show"]["columns"] == ["original", "reconstructed", "AdvBN ε=0.3",
                                      "AdvBN ε=0.6", "AdvBN ε=1.1"]  # fmt: skip
    # the folders are ordinary shifted domains: same images, same accuracy through `shift`
    domain = ImageFolderDomain(folder / "advbn", NAMES, 8)
    assert len(domain) == 40
    shifted = evaluate(
        model,
        EvalData(data.test, 3, NAMES, 8),
        ["shift"],
        domains={"advbn": str(folder / "advbn"), "rec": str(folder / "reconstructed")},
    )["suites"]["shift"]["domains"]
    assert shifted["advbn"]["top1"] == pytest.approx(res["accuracy"]["advbn"])
    assert shifted["rec"]["top1"] == pytest.approx(res["accuracy"]["reconstructed"])
    assert (tmp_path / "eval_plots" / "advbn_images.png").stat().st_size > 5_000
    md = out.with_suffix(".md").read_text()
    assert "## AdvBN decoder and -AdvBN test set" in md
