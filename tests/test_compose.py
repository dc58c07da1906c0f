"""A run's configuration is composed once, below the command line (``advfeat.train.compose``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from advfeat.cli import build_parser
from advfeat.data import DATASETS
from advfeat.data.bundle import fetches_into
from advfeat.errors import AdvfeatError
from advfeat.presets import load_preset
from advfeat.train.compose import ConfigSources, compose, compose_comparison, plan_training


def test_layers_apply_in_order_preset_file_flags_overrides_arm_method(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("lr: 0.2\nepochs: 3\nbatch_size: 16\nweight_decay: 0.001\n")
    sources = ConfigSources.read(
        "default", config, {"epochs": 4, "batch_size": 8}, ["batch_size=4", "seed=5"]
    )
    cfg = compose(sources, "afan", arm={"seed": 6, "method": "alfa"})
    assert cfg.dataset_options == load_preset("default")["dataset_options"]  # the preset
    assert (cfg.lr, cfg.weight_decay) == (0.2, 0.001)  # the file over the preset
    assert cfg.epochs == 4  # a flag over the file
    assert cfg.batch_size == 4  # an override over a flag
    assert cfg.seed == 6  # the arm over an override
    assert cfg.method == "afan"  # the method last


def test_the_default_preset_only_without_a_method_a_file_or_a_dataset() -> None:
    preset_lr = load_preset("default")["lr"]
    assert compose(ConfigSources()).lr == preset_lr
    assert compose(ConfigSources(flags={"method": "afan"})).lr == 0.1
    assert compose(ConfigSources(flags={"dataset": "shapes"})).lr == 0.1
    assert compose(ConfigSources(), "afan").lr == preset_lr  # a method argument is not a flag


def test_configurations_share_no_list_with_their_sources() -> None:
    sources = ConfigSources.read("default")
    first, second = compose(sources), compose(sources)
    first.milestones.append(0.9)
    first.dataset_options["n_train"] = 1
    assert second.milestones == [0.5, 0.75]
    assert sources.preset is not None and sources.preset["dataset_options"]["n_train"] == 1500


def test_a_missing_data_dir_is_refused_unless_the_dataset_downloads_into_it(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "not-here"
    downloading = {name for name in DATASETS.names() if fetches_into(name, missing)}
    assert downloading == {"cifar10", "cifar100", "svhn", "voc-det", "voc-seg"}
    with pytest.raises(AdvfeatError, match="does not exist"):
        compose(ConfigSources(flags={"dataset": "shapes", "data_dir": str(missing)}))
    cfg = compose(ConfigSources(flags={"dataset": "cifar10", "data_dir": str(missing)}))
    assert cfg.data_dir == str(missing)


def test_the_dataset_help_lists_the_registry(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    flat = "".join(capsys.readouterr().out.split())  # the help wraps its lines
    assert ",".join(DATASETS.names()) in flat


def test_no_method_plans_the_default_comparison_with_the_protocol_flags() -> None:
    sources = ConfigSources(flags={"epochs": 1, "seed": 4, "lr": 0.05}, quiet=True)
    plan = plan_training(sources, out="cmp")
    assert plan.runs == [] and plan.comparison == ["standard", "afan"]
    assert plan.seeds == [4] and plan.folder == Path("cmp")
    assert plan.sources.flags == {"epochs": 1, "lr": 0.05} and not plan.sources.quiet


def test_a_comparison_checks_arm_by_arm_and_lists_seed_by_seed() -> None:
    class Arm:
        def __init__(self, label: str, method: str) -> None:
            self.label, self.method = label, method

        def for_seed(self, seed: int) -> dict[str, object]:
            return {"method": self.method}

    arms = [Arm("a", "standard"), Arm("b", "afan")]
    configs = compose_comparison(ConfigSources(flags={"epochs": 1}), arms, [0, 1])
    assert list(configs) == [("a", 0), ("b", 0), ("a", 1), ("b", 1)]
    assert all(not c.progress and c.seed == s for (_, s), c in configs.items())
    with pytest.raises(AdvfeatError, match="seeds must be distinct"):
        compose_comparison(ConfigSources(), arms, [0, 0])
