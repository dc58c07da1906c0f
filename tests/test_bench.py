"""``advfeat bench``: configurations by label, bench settings, FLOP predictions, peak memory.

Nothing here is timed: the assertions are on FLOP counts (which say what ran) and on the
shape of the results.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from advfeat.bench import (
    MethodSpec,
    _cpu_peak_mb,
    _Setup,
    bench_table,
    count_step_flops,
    parse_method_specs,
    run_bench,
)
from advfeat.errors import AdvfeatError


def test_method_specs_by_label() -> None:
    specs = parse_method_specs(
        ["alfa", "bn2=alfa", "before=alfa"],
        {"bn2": {"site": "layer3.2.bn2"}, "before": {"site": "x", "frontier": False}},
    )
    assert [s.label for s in specs] == ["standard", "alfa", "bn2", "before"]
    assert specs[2] == MethodSpec("bn2", "alfa", {"site": "layer3.2.bn2"})
    assert specs[3].frontier is False and specs[3].options == {"site": "x"}
    with pytest.raises(AdvfeatError, match="given twice"):
        parse_method_specs(["alfa", "alfa"])
    with pytest.raises(AdvfeatError, match="not among the benchmarked"):
        parse_method_specs(["alfa"], {"afan": {"k": 3}})
    with pytest.raises(AdvfeatError, match="true or false"):
        parse_method_specs(["alfa"], {"alfa": {"frontier": "no"}})
    with pytest.raises(AdvfeatError, match="unknown method"):
        parse_method_specs(["alfaa"])


def test_flops_show_tail_only_sites_and_one_live_strength() -> None:
    results = run_bench(
        ["bn2=alfa", "bn2_full=alfa", "last=alfa", "one_hot=l-alfa"],
        model_name="resnet20",
        batch_size=2,
        image_size=8,
        iters=1,
        warmup=0,
        memory=False,
        method_options={
            "bn2": {"site": "layer3.2.bn2", "steps": 1},
            "bn2_full": {"site": "layer3.2.bn2", "steps": 1, "frontier": False},
            "last": {"site": "layer3.2", "steps": 1},
            "one_hot": {"steps": 1, "live_site": "layer3.2"},
        },
    )
    rows = {r.label: r for r in results}
    # ALFA inside the last block: the attack and the adversarial pass run only the few layers
    # after the BN (tail-only), not the whole network (the fallback, ~1 + 1 + 2/3 more)
    assert rows["bn2"].flops_ratio_vs_standard < 1.1
    assert rows["bn2_full"].flops_ratio_vs_standard > 1.5
    assert rows["bn2_full"].bench_settings == {"frontier": False}
    # L-ALFA with η one-hot at the last block does ALFA's work at that block
    one_hot, alfa = rows["one_hot"].flops_per_step, rows["last"].flops_per_step
    assert abs(one_hot - alfa) / alfa < 0.01
    table = bench_table(results)
    assert table.count("\n") == len(results) + 1 and "bn2 (alfa)" in table
    assert all(r.peak_mem_mb is None for r in results)


def test_live_site_must_be_one_of_the_strengths() -> None:
    with pytest.raises(AdvfeatError, match="not one of L-ALFA's sites"):
        run_bench(
            ["l-alfa"],
            batch_size=2,
            image_size=8,
            iters=1,
            warmup=0,
            memory=False,
            method_options={"l-alfa": {"live_site": "fc"}},
        )
    with pytest.raises(AdvfeatError, match="has none"):
        run_bench(
            ["alfa"],
            batch_size=2,
            image_size=8,
            iters=1,
            warmup=0,
            memory=False,
            method_options={"alfa": {"live_site": "layer3"}},
        )


def test_cpu_peak_memory_of_a_step() -> None:
    setup = _Setup("resnet20", 8, 16, 10, 0, "cpu", 1)
    peak = _cpu_peak_mb(setup, MethodSpec("standard", "standard"), warmup=1)
    if peak is None:
        pytest.skip("this kernel does not expose VmHWM / clear_refs")
    # ResNet-20's activations for 8 images of 16x16 alone take more than 1 MB
    assert 1.0 < peak < 2000.0


def _conv_step(conv: nn.Module, x: torch.Tensor) -> None:
    conv(x.requires_grad_(True)).square().sum().backward()


def test_flops_of_a_grouped_convolution_count_each_group_once() -> None:
    x = torch.randn(2, 8, 6, 6)
    # depthwise 3x3, 8 channels, 6x6 output: 2·N·H·W·C·k² per pass; backward = input gradient
    # + weight gradient, each the forward's multiply-adds
    depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
    forward = 2 * 2 * 6 * 6 * 8 * 9
    assert count_step_flops(lambda: _conv_step(depthwise, x)) == 3 * forward
    # only the input gradient (frozen weights): forward + one backward term
    depthwise.weight.requires_grad_(False)
    assert count_step_flops(lambda: _conv_step(depthwise, x)) == 2 * forward
    # grouped (4 groups of 2 channels): the same rule
    grouped = nn.Conv2d(8, 16, 3, padding=1, groups=4, bias=False)
    assert count_step_flops(lambda: _conv_step(grouped, x)) == 3 * (2 * 2 * 36 * 16 * 2 * 9)


@pytest.mark.parametrize(
    "conv",
    [nn.Conv2d(8, 16, 3, stride=2, padding=2, dilation=2), nn.ConvTranspose2d(8, 4, 3, stride=2)],
)
def test_flops_of_an_ungrouped_convolution_are_torchs(conv: nn.Module) -> None:
    x = torch.randn(2, 8, 6, 6)
    with FlopCounterMode(display=False) as torch_counter:
        _conv_step(conv, x)
    assert count_step_flops(lambda: _conv_step(conv, x)) == torch_counter.get_total_flops() > 0


def test_sequential_order_reports_each_method_as_it_finishes() -> None:
    seen: list[list[str]] = []
    results = run_bench(
        ["alfa", "afan"],
        batch_size=2,
        image_size=8,
        iters=2,
        warmup=0,
        memory=False,
        order="sequential",
        on_rows=lambda rows: seen.append([r.label for r in rows]),
    )
    assert seen == [["standard"], ["standard", "alfa"], ["standard", "alfa", "afan"]]
    assert [r.label for r in results] == ["standard", "alfa", "afan"]
    assert results[0].ratio_vs_standard == 1.0
    with pytest.raises(AdvfeatError, match="order must be one of"):
        run_bench(["alfa"], batch_size=2, image_size=8, iters=1, order="random")


def test_bench_json_keeps_the_methods_finished_before_a_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``advfeat bench --json`` rewrites its file after each method: a run stopped part-way (here
    the second method fails) leaves the rows it measured, marked incomplete."""
    import advfeat.bench as bench_module
    from advfeat.cli import main

    build = bench_module._build

    def failing_build(setup: Any, spec: MethodSpec) -> Any:
        if spec.label == "afan":
            raise RuntimeError("stopped")
        return build(setup, spec)

    monkeypatch.setattr(bench_module, "_build", failing_build)
    out = tmp_path / "bench.json"
    argv = ["bench", "--methods", "alfa,afan", "--batch-size", "2", "--image-size", "8"]
    argv += ["--iters", "1", "--warmup", "0", "--no-memory", "--order", "sequential"]
    with pytest.raises(RuntimeError, match="stopped"):
        main([*argv, "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["complete"] is False and list(data["methods"]) == ["standard", "alfa"]
    monkeypatch.setattr(bench_module, "_build", build)
    assert main([*argv, "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["complete"] is True and list(data["methods"]) == ["standard", "alfa", "afan"]
