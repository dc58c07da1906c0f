"""Suites on a user's own module: clean, shift (image folders), bn branches, features, resume,
and the clear errors of bad input."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from advfeat.errors import AdvfeatError
from advfeat.eval import EvalConfig, EvalData, evaluate
from advfeat.eval.folders import ImageFolderDomain, parse_domain
from advfeat.eval.runner import partial_path


def _data(task: Any, n: int = 48, **kw: Any) -> EvalData:
    return EvalData(
        test=TensorDataset(task.x_test[:n], task.y_test[:n]),
        num_classes=3,
        class_names=["red", "green", "blue"],
        image_size=8,
        **kw,
    )


def test_clean_accuracy_matches_a_direct_count(
    trained_tiny_model: nn.Module, tiny_task: Any
) -> None:
    model = copy.deepcopy(trained_tiny_model)
    x, y = tiny_task.x_test, tiny_task.y_test
    res = evaluate(model, TensorDataset(x, y), ["clean"], batch_size=50)["suites"]["clean"]
    with torch.no_grad():
        expected = float((model(x).argmax(1) == y).float().mean())
    assert res == {"top1": pytest.approx(expected), "n": 128}  # 3 classes: no top-5


def test_shift_suite_reads_image_folder_domains(
    trained_tiny_model: nn.Module, tiny_task: Any, tmp_path: Path
) -> None:
    from PIL import Image

    for i, (img, label) in enumerate(zip(tiny_task.x_test[:6], tiny_task.y_test[:6], strict=True)):
        folder = tmp_path / "dom" / ["red", "green", "blue"][int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        array = (img.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        Image.fromarray(array).resize((16, 16)).save(folder / f"{i}.png")  # resized back to 8
    data = _data(
        tiny_task, shifted={"same": TensorDataset(tiny_task.x_test[:6], tiny_task.y_test[:6])}
    )
    res = evaluate(
        copy.deepcopy(trained_tiny_model), data, ["shift"], domains={"disk": str(tmp_path / "dom")}
    )["suites"]["shift"]
    assert set(res["domains"]) == {"same", "disk"} and res["domains"]["disk"]["n"] == 6
    assert res["metric"] == "top1" and res["mean_top1"] == pytest.approx(
        (res["domains"]["same"]["top1"] + res["domains"]["disk"]["top1"]) / 2
    )
    domain = ImageFolderDomain(tmp_path / "dom", ["red", "green", "blue"], 8)
    image, _ = domain[0]
    assert image.shape == (3, 8, 8) and float(image.min()) >= 0 and float(image.max()) <= 1
    assert parse_domain("a=/x/y") == ("a", "/x/y") and parse_domain("/x/y") == ("y", "/x/y")
    (tmp_path / "dom" / "purple").mkdir()
    with pytest.raises(AdvfeatError, match="class folder"):
        ImageFolderDomain(tmp_path / "dom", ["red", "green", "blue"], 8)
    with pytest.raises(AdvfeatError, match="does not exist"):
        evaluate(trained_tiny_model, data, ["shift"], domains={"x": str(tmp_path / "nowhere")})
    assert "skipped" in evaluate(trained_tiny_model, _data(tiny_task), ["shift"])["suites"]["shift"]


def test_bn_suite_evaluates_every_branch(trained_tiny_model: nn.Module, tiny_task: Any) -> None:
    from advfeat.norm import MultiBatchNorm, convert_multibn

    model = convert_multibn(copy.deepcopy(trained_tiny_model), branches=("clean", "adv"))
    for m in model.modules():  # give the aux branch other statistics
        if isinstance(m, MultiBatchNorm):
            for bn in m.aux.values():
                bn.running_mean.add_(0.5)  # type: ignore[operator]
    res = evaluate(model, _data(tiny_task), ["clean", "bn"], bn_suites=["clean"])["suites"]
    branches = res["bn"]["branches"]
    assert set(branches) == {"clean", "adv"}
    assert branches["clean"]["clean"]["top1"] == pytest.approx(res["clean"]["top1"])
    assert branches["adv"]["clean"]["top1"] != branches["clean"]["clean"]["top1"]
    plain = evaluate(trained_tiny_model, _data(tiny_task), ["bn"])["suites"]["bn"]
    assert "skipped" in plain


def test_features_suite_maps_and_normalization(
    trained_tiny_model: nn.Module, tiny_task: Any
) -> None:
    from advfeat.methods.feature_aug import adversarial_feature_normalization

    res = evaluate(
        copy.deepcopy(trained_tiny_model), _data(tiny_task), ["features"], feature_images=3
    )
    feat = res["suites"]["features"]
    assert feat["site"] == "block1" and len(feat["images"]) == 3
    assert feat["columns"][0] == "clean" and len(feat["columns"]) == 5
    clean = torch.tensor(feat["maps"]["clean"])
    assert clean.shape == (3, 8, 8)
    assert not torch.allclose(clean, torch.tensor(feat["maps"]["perturbed ×1"]))
    # A-FAN Eq. 6: the result has the adversarial features' per-channel mean and std
    g = torch.Generator().manual_seed(0)
    f_clean, f_adv = (
        torch.randn(4, 2, 5, 5, generator=g),
        3 + 2 * torch.randn(4, 2, 5, 5, generator=g),
    )
    mixed = adversarial_feature_normalization(f_clean, f_adv)
    dims = (0, 2, 3)
    assert torch.allclose(mixed.mean(dims), f_adv.mean(dims), atol=1e-5)
    assert torch.allclose(mixed.std(dims), f_adv.std(dims), rtol=1e-3)


def test_interrupted_evaluation_resumes_from_partial_results(
    trained_tiny_model: nn.Module, tiny_task: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import advfeat.eval.suites.attacks as attacks_suite

    model = copy.deepcopy(trained_tiny_model)
    out = tmp_path / "eval.json"
    opts: dict[str, Any] = {"attacks": ["pgd", "fgsm"], "pgd_steps": 2, "plots": False}
    full = evaluate(model, _data(tiny_task), ["clean", "attacks"], **opts)

    def broken(*_a: Any, **_k: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(attacks_suite, "FGSM", broken)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, _data(tiny_task), ["clean", "attacks"], out=out, **opts)
    saved = json.loads(partial_path(out).read_text())
    assert set(saved["units"]) == {"clean", "attacks/pgd"} and not out.exists()
    monkeypatch.undo()
    with pytest.raises(AdvfeatError, match="other settings"):
        evaluate(model, _data(tiny_task), ["attacks"], out=out, resume=True, pgd_steps=3)
    resumed = evaluate(model, _data(tiny_task), ["clean", "attacks"], out=out, resume=True, **opts)
    assert resumed["reused_units"] == 2
    assert resumed["suites"] == full["suites"]
    assert out.is_file() and out.with_suffix(".md").is_file() and not partial_path(out).exists()


def test_bad_input_is_a_clear_error(trained_tiny_model: nn.Module, tiny_task: Any) -> None:
    data = _data(tiny_task, 8)
    with pytest.raises(AdvfeatError, match="did you mean 'corruptions'"):
        evaluate(trained_tiny_model, data, ["corruption"])
    with pytest.raises(AdvfeatError, match="did you mean 'max_images'"):
        evaluate(trained_tiny_model, data, ["clean"], max_image=3)
    with pytest.raises(AdvfeatError, match="at least one suite"):
        evaluate(trained_tiny_model, data, [])
    with pytest.raises(AdvfeatError, match="empty"):
        evaluate(
            trained_tiny_model, TensorDataset(torch.zeros(0, 3, 8, 8), torch.zeros(0)), ["clean"]
        )
    with pytest.raises(AdvfeatError, match="either config"):
        evaluate(trained_tiny_model, data, ["clean"], config=EvalConfig(), seed=1)
    with pytest.raises(AdvfeatError, match="DatasetBundle"):
        evaluate(trained_tiny_model, [1, 2, 3], ["clean"])  # type: ignore[arg-type]


def test_top_k_accuracy_of_evaluation_and_task_is_one_count() -> None:
    """``evaluate_accuracy`` and the classification task count top-k hits with one function."""
    from torch.utils.data import TensorDataset

    from advfeat.eval import evaluate_accuracy
    from advfeat.tasks.classification import topk_counts, topk_hits

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 7, generator=g), torch.randint(0, 7, (50,), generator=g)
    ranks = (x > x.gather(1, y[:, None])).sum(1)  # how many logits beat the label's
    expected = {k: int((ranks < k).sum()) for k in (1, 3, 9)}  # k = 9 > 7 classes: all
    assert topk_hits(x, y, (1, 3, 9)) == expected and expected[9] == 50
    assert topk_counts(x, y, (1, 3)).tolist() == [expected[1], expected[3]]
    acc = evaluate_accuracy(nn.Identity(), TensorDataset(x, y), batch_size=16, topk=(1, 3))
    assert acc == {"top1": expected[1] / 50, "top3": expected[3] / 50}
    # the task's evaluation (the trainer's) runs the same loop: top-1 and, detailed, top-5
    from torch.utils.data import DataLoader

    from advfeat.tasks import ClassificationTask

    model = nn.Sequential(nn.Identity()).train()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    top5 = int((ranks < 5).sum()) / 50
    detailed = ClassificationTask(7).evaluate(model, loader, detailed=True)
    assert detailed == {"acc": expected[1] / 50, "top5": top5} and model.training
    assert ClassificationTask(7).evaluate(model, loader) == {"acc": expected[1] / 50}
