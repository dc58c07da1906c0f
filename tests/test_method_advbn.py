"""AdvBN: CLI fine-tuning, frozen prefix, aux-BN routing, statistic bounds, checkpoints, errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from advfeat.checkpoint import save_checkpoint
from advfeat.cli import main
from advfeat.errors import AdvfeatError
from advfeat.methods import build_method
from advfeat.methods.advbn import advbn_eps
from advfeat.norm import convert_multibn
from helpers import random_batch


def _save(model: nn.Module, path: Path) -> str:
    save_checkpoint(path, {"model": model.state_dict(), "config": {"model": "tiny"}, "epoch": 1})
    return str(path)


@pytest.fixture
def init_ckpt(tmp_path: Path, make_tiny_bn_cnn) -> str:
    return _save(make_tiny_bn_cnn(seed=5), tmp_path / "init.pt")


def test_cli_fine_tunes_a_trained_checkpoint(tmp_path: Path) -> None:
    common = ["--model", "resnet20", "--dataset", "shapes", "--epochs", "1", "--batch-size", "16"]
    common += ["--device", "cpu", "--quiet", "--set", "eval_shifted=false"]
    common += ["--set", "dataset_options={n_train: 32, n_test: 16, image_size: 16}"]
    assert main(["train", "--method", "standard", "--out", str(tmp_path / "base"), *common]) == 0
    ckpt = tmp_path / "base" / "checkpoint.pt"
    options = f"method_options={{init_checkpoint: '{ckpt}', steps: 1, eval_branch: adv}}"
    out = tmp_path / "advbn"
    assert main(["train", "--method", "advbn", "--out", str(out), *common, "--set", options]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "advbn" and 0.0 <= metrics["clean_acc"] <= 1.0
    assert {"loss_clean", "loss_adv"} <= set(metrics["history"][-1])


def test_plain_loop_updates_only_the_tail(make_tiny_bn_cnn, init_ckpt: str) -> None:
    """Algorithm 1: θ of g^{l+1,L} only; BN statistics before the site never move."""
    method = build_method("advbn", init_checkpoint=init_ckpt, site="block1", steps=2)
    model = method.prepare(make_tiny_bn_cnn(seed=0)).train()
    # prepare loaded the checkpoint (not the seed-0 weights)
    assert torch.equal(model.fc.weight, make_tiny_bn_cnn(seed=5).fc.weight)
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(method.parameter_groups(model, lr=0.1), lr=0.1, momentum=0.9)
    for seed in range(2):
        out = method(model, *random_batch(16, seed=seed))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        assert torch.isfinite(out.loss)
    after = model.state_dict()
    prefix = [k for k in after if k.startswith("block1.")]
    tail = [k for k in after if not k.startswith("block1.")]
    assert prefix and all(torch.equal(after[k], before[k]) for k in prefix)
    assert all(not p.requires_grad for p in model.block1.parameters())
    for key in ("block2.1.running_mean", "block2.1.aux.adv.running_mean", "fc.weight"):
        assert key in tail and not torch.equal(after[key], before[key]), key
    assert model.training and model.block1.training  # flags restored


def test_clean_through_main_adversarial_through_aux(make_tiny_bn_cnn, init_ckpt: str) -> None:
    method = build_method(
        "advbn", init_checkpoint=init_ckpt, site="block1", steps=1, tau=0.3, routing="split"
    )
    model = method.prepare(make_tiny_bn_cnn()).train()
    x, y = random_batch(16)
    main_bn, aux_bn = model.block2[1], model.block2[1].aux["adv"]
    seen: dict[str, torch.Tensor] = {}
    main_bn.register_forward_pre_hook(lambda m, a: seen.__setitem__("main", a[0]))
    aux_bn.register_forward_pre_hook(lambda m, a: seen.__setitem__("aux", a[0]))
    main_stats, aux_stats = main_bn.running_mean.clone(), aux_bn.running_mean.clone()
    method(model, x, y)
    clean, adv = seen["main"].chunk(2)  # the layer receives [clean | adv] and splits it
    assert torch.equal(seen["aux"], adv) and not torch.allclose(clean, adv)
    # one running-average update each (momentum 0.1): the attack steps moved nothing
    assert torch.allclose(main_bn.running_mean, 0.9 * main_stats + 0.1 * clean.mean((0, 2, 3)))
    assert torch.allclose(aux_bn.running_mean, 0.9 * aux_stats + 0.1 * adv.mean((0, 2, 3)))


def test_perturbed_statistics_stay_within_bounds(make_tiny_bn_cnn, init_ckpt: str) -> None:
    """Eq. 1-2: the adversarial feature's channel mean/std are δ·(clean), δ ∈ [1 − ε, 1 + ε]."""
    method = build_method(
        "advbn", init_checkpoint=init_ckpt, site="block1", steps=3, tau=0.2, routing="split"
    )
    eps = method.bound
    assert eps == pytest.approx(3 * 0.2 - 0.1) and advbn_eps(6, 0.2) == pytest.approx(1.1)
    model = method.prepare(make_tiny_bn_cnn()).train()
    feats: list[torch.Tensor] = []
    model.block2.register_forward_pre_hook(lambda m, a: feats.append(a[0].detach()))
    method(model, *random_batch(16))
    clean, adv = feats[-1].chunk(2)  # split routing: [clean | adv] in one tail pass
    dims = (0, 2, 3)
    mean_ratio = adv.mean(dims) / clean.mean(dims)
    std_ratio = adv.std(dims) / clean.std(dims)
    live = clean.std(dims) > 1e-6
    assert live.sum() >= 4
    for ratio in (mean_ratio, std_ratio):
        assert bool((ratio[live] >= 1 - eps - 1e-4).all() and (ratio[live] <= 1 + eps + 1e-4).all())
    d_mu, d_sigma = method.last_multipliers
    assert torch.allclose(std_ratio[live], d_sigma[live], atol=1e-4)
    moved = clean.mean(dims).abs() > 1e-3
    assert torch.allclose(mean_ratio[moved], d_mu[moved], atol=1e-3)
    assert (d_sigma - 1).abs().max() == pytest.approx(eps)  # 3 sign steps of 0.2 reach the bound


def test_eval_branch_and_checkpoint_with_aux_keys(tmp_path: Path, make_tiny_bn_cnn) -> None:
    source = convert_multibn(make_tiny_bn_cnn(seed=7))  # e.g. an AdvProp run
    path = _save(source, tmp_path / "advprop.pt")
    method = build_method("advbn", init_checkpoint=path, site="block1", eval_branch="adv")
    model = method.prepare(make_tiny_bn_cnn())
    assert torch.equal(model.block2[0].weight, source.block2[0].weight)
    model.block2[1].aux["adv"].running_mean.add_(1.0)
    plain = method.eval_model(model)
    assert torch.equal(plain.block2[1].running_mean, model.block2[1].aux["adv"].running_mean)
    assert "block2.1.aux.adv.weight" not in plain.state_dict()


def test_bad_input_raises_clear_errors(tmp_path: Path, make_tiny_bn_cnn, init_ckpt: str) -> None:
    with pytest.raises(AdvfeatError, match="set init_checkpoint=PATH"):
        build_method("advbn", site="block1").prepare(make_tiny_bn_cnn())
    with pytest.raises(AdvfeatError, match="does not exist"):
        build_method("advbn", init_checkpoint=str(tmp_path / "missing.pt"))
    with pytest.raises(AdvfeatError, match="block1"):
        build_method("advbn", init_checkpoint=init_ckpt, site="blok1").prepare(make_tiny_bn_cnn())
    no_bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    no_bn(torch.zeros(1, 3, 8, 8))
    path = _save(no_bn, tmp_path / "nobn.pt")
    with pytest.raises(AdvfeatError, match="no batch-norm"):
        build_method("advbn", init_checkpoint=path, site="0").prepare(no_bn)
    other = _save(nn.Linear(2, 2), tmp_path / "other.pt")
    with pytest.raises(AdvfeatError, match="does not fit"):
        build_method("advbn", init_checkpoint=other, site="block1").prepare(make_tiny_bn_cnn())
    for options, match in [
        ({"steps": 0}, "steps"),
        ({"tau": -0.2}, "tau"),
        ({"prefix_bn_mode": "evl"}, "eval"),
        ({"eval_branch": "aux"}, "adv"),
        ({"stps": 2}, "steps"),
    ]:
        with pytest.raises(AdvfeatError, match=match):
            build_method("advbn", init_checkpoint=init_ckpt, **options)


def test_preset_show_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--preset", "advbn-finetune-cifar", "--show-config"]) == 0
    text = capsys.readouterr().out
    assert "method: advbn" in text and "epochs: 20" in text and "lr: 0.001" in text


def test_default_site_is_the_first_stage_of_each_model_family(tmp_path: Path) -> None:
    """``site="auto"``: a ResNet's ``layer1`` (the paper's conv2_3), a ViT's first block, a
    ConvNeXt's first stage; a model whose only stage is its whole feature extractor is refused
    in one line (its first stage would be its last), and a named site is kept as given."""
    from advfeat.models import build_model

    method = build_method("advbn")
    assert method.opts.site == "auto"
    vit = {"patch_size": 4, "num_layers": 2, "num_heads": 2, "hidden_dim": 16, "mlp_dim": 32}
    convnext = {"patch_size": 2, "depths": [1, 1, 1, 1], "dims": [8, 8, 16, 16]}
    expected = [
        ("resnet20", {}, "layer1"),
        ("torchvision:vit_b_16", vit, "encoder.layers.encoder_layer_0"),
        ("torchvision:convnext_tiny", convnext, "features.1"),
        ("timm:vit_tiny_patch16_224", {"depth": 2, "patch_size": 4}, "blocks.0"),
    ]
    for name, options, site in expected:
        model = build_model(name, num_classes=10, **options)
        assert method.site_of(model) == site, name
    assert build_method("advbn", site="layer2").site_of(build_model("resnet20")) == "layer2"
    with pytest.raises(AdvfeatError, match=r"no early stage.*method_options.site"):
        method.site_of(build_model("torchvision:mobilenet_v3_small", num_classes=10))


def test_fine_tunes_a_vit_at_its_default_site(tmp_path: Path) -> None:
    """The default site on a ViT: the prefix up to the first block stays frozen, the rest trains."""
    import timm

    torch.manual_seed(0)
    stock = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, depth=2, num_classes=3
    )
    path = tmp_path / "vit.pt"
    save_checkpoint(path, {"model": stock.state_dict(), "config": {"model": "vit"}, "epoch": 1})
    method = build_method("advbn", init_checkpoint=str(path), steps=1)
    model = method.prepare(copy.deepcopy(stock))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, y = torch.rand(4, 3, 16, 16), torch.randint(0, 3, (4,))
    model.train()
    out = method(model, x, y)
    optimizer.zero_grad()
    out.loss.backward()
    optimizer.step()
    after = model.state_dict()
    frozen = [
        k for k in after if k.startswith(("patch_embed.", "cls_token", "pos_embed", "blocks.0."))
    ]
    trained = [k for k in after if k.startswith(("blocks.1.attn", "head."))]
    assert frozen and trained
    assert all(torch.equal(after[k], before[k]) for k in frozen)
    assert all(not torch.equal(after[k], before[k]) for k in trained)


def test_a_run_without_its_checkpoint_is_refused_before_it_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``advfeat train`` and every arm of ``advfeat compare`` check that AdvBN has the model
    it fine-tunes before any run starts (one line, nothing written)."""
    tiny = ["--epochs", "1", "--set", "dataset_options={n_train: 16, n_test: 8, image_size: 8}"]
    out = tmp_path / "advbn"
    assert main(["train", "--method", "advbn", "--out", str(out), *tiny]) == 2
    cmp = tmp_path / "cmp"
    arms = ["--methods", "standard", "--arm", "advbn: method=advbn", "--seeds", "0"]
    assert main(["compare", *arms, "--out", str(cmp), *tiny]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and err.count("set init_checkpoint=PATH") == 2
    assert "training" not in err and not out.exists() and not cmp.exists()
