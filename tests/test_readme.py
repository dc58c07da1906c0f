"""The README's Python examples run as written, and its commands name real things."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from advfeat.methods import METHODS
from advfeat.presets import preset_names

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def _namespace() -> dict[str, object]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
    return {"loader": [(x, y), (x, y)], "x": x, "y": y, "x_adv": x.clone()}


def test_own_loop_and_building_block_examples_run() -> None:
    loop = next(b for b in BLOCKS if "for x, y in loader" in b)
    blocks = next(b for b in BLOCKS if "convert_multibn(model" in b)
    ns = _namespace()
    exec(loop, ns)
    before = {k: v.clone() for k, v in ns["model"].state_dict().items()}  # type: ignore[attr-defined]
    exec(blocks, ns)
    assert ns["x_adv"].shape == ns["x"].shape  # type: ignore[attr-defined]
    assert float((ns["x_adv"] - ns["x"]).abs().max()) <= 8 / 255 + 1e-6  # type: ignore[operator]
    after = ns["model"].state_dict()  # type: ignore[attr-defined]
    for key, value in before.items():  # the attack moved no running statistic
        if key in after:
            assert torch.equal(after[key], value), key
    assert ns["split"].is_fast  # type: ignore[attr-defined]


def test_named_methods_and_presets_exist() -> None:
    for name in re.findall(r"--method ([a-z-]+)", README):
        assert name in METHODS, name
    for name in re.findall(r"^\| `([a-z][a-z-]*)` \|", README, flags=re.M):
        assert name in METHODS, name
    for name in re.findall(r"--preset ([a-z0-9-]+)", README):
        assert name in preset_names(), name


@pytest.mark.parametrize("marker", ["main-command", "test-command"])
def test_quick_start_has_exactly_one_command_each(marker: str) -> None:
    block = README.split(f"<!-- {marker} -->")[1].split(f"<!-- /{marker} -->")[0]
    lines = [ln for ln in block.splitlines() if ln.strip() and not ln.startswith("```")]
    assert len(lines) == 1 and lines[0].startswith("python3 -m venv .venv")
