"""AutoAttack (Croce & Hein 2020) through a maintained third-party implementation, with checks.

Optional: install the extra ``advfeat[autoattack]`` (``torchattacks``, whose ``AutoAttack``
runs APGD-CE, APGD-T, FAB-T and Square), or the authors' package ``autoattack`` (installed from
its repository; preferred when both are present). Nothing here re-implements AutoAttack.

Sanity checks recorded with every run (a failed check does not stop the evaluation, it is
reported): the model is deterministic in eval mode (AutoAttack's standard version assumes no
randomness), it returns logits rather than probabilities, the adversarial images lie in the
ε-ball and in [0, 1], and AutoAttack is not weaker than PGD on the same images (a sign of a
broken set-up or of gradient masking the other way round).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from torch import Tensor, nn

from advfeat.errors import AdvfeatError

__all__ = ["autoattack_backend", "make_autoattack", "model_checks", "perturbation_check"]


def autoattack_backend() -> str | None:
    """``"autoattack"`` (the authors' package), ``"torchattacks"``, or ``None`` if neither."""
    for name in ("autoattack", "torchattacks"):
        if importlib.util.find_spec(name) is not None:
            return name
    return None


def make_autoattack(
    model: nn.Module, *, eps: float, version: str, seed: int, num_classes: int, device: torch.device
) -> Any:
    """``attack(x, y) -> x_adv`` running AutoAttack (L∞, ``eps``) with the installed backend."""
    backend = autoattack_backend()
    if backend is None:
        raise AdvfeatError(
            "AutoAttack needs an optional package: pip install 'advfeat[autoattack]' "
            "(torchattacks) or the authors' autoattack package"
        )
    if backend == "autoattack":
        from autoattack import AutoAttack  # type: ignore[import-not-found]

        adversary = AutoAttack(
            model,
            norm="Linf",
            eps=eps,
            version=version,
            seed=seed,
            device=str(device),
            verbose=False,
        )

        def run_authors(x: Tensor, y: Tensor) -> Tensor:
            return adversary.run_standard_evaluation(x, y, bs=x.shape[0])  # type: ignore[no-any-return]

        return run_authors
    import torchattacks  # type: ignore[import-not-found]

    attack = torchattacks.AutoAttack(
        model, norm="Linf", eps=eps, version=version, n_classes=num_classes, seed=seed
    )

    def run_torchattacks(x: Tensor, y: Tensor) -> Tensor:
        return attack(x, y)  # type: ignore[no-any-return]

    return run_torchattacks


@torch.no_grad()
def model_checks(model: nn.Module, x: Tensor) -> dict[str, dict[str, Any]]:
    """Deterministic output and logits (not probabilities) on a batch ``x``."""
    first, second = model(x), model(x)
    deterministic = bool(torch.equal(first, second))
    rows = first.sum(dim=1)
    probabilities = bool(
        (first.min() >= 0) and (first.max() <= 1) and torch.allclose(rows, torch.ones_like(rows))
    )
    return {
        "deterministic": {
            "passed": deterministic,
            "detail": "two forward passes agree"
            if deterministic
            else "outputs differ between two identical forward passes (randomised model: use "
            "version='rand')",
        },
        "logits": {
            "passed": not probabilities,
            "detail": "outputs are logits"
            if not probabilities
            else "outputs look like probabilities (rows sum to 1): give AutoAttack logits",
        },
    }


def perturbation_check(max_linf: float, eps: float, lo: float, hi: float) -> dict[str, Any]:
    """The adversarial images lie in the ε-ball and in [0, 1]."""
    ok = max_linf <= eps + 1e-5 and lo >= -1e-6 and hi <= 1 + 1e-6
    return {
        "passed": ok,
        "detail": f"max |δ|∞ = {max_linf:.6f} (ε = {eps:.6f}), values in [{lo:.4f}, {hi:.4f}]",
    }
