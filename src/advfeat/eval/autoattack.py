"""AutoAttack (Croce & Hein, ICML 2020) through a maintained implementation, configured as the
*standard* version, with its parameters read back and sanity checks.

Backends, in order of preference (nothing here re-implements AutoAttack):

- ``autoattack``: the authors' package installed from their repository;
- ``pyautoattack``: the authors' code packaged on PyPI (``pip install 'advfeat[autoattack]'``);
- ``torchattacks``: its APGD / APGD-T / FAB / Square, configured here to the standard version's
  parameters (its own ``AutoAttack`` class runs 10 iterations instead of 100).

The standard version (what RobustBench reports): APGD-CE (100 iterations, 1 restart), APGD-T
(100 iterations, 9 target classes, 1 restart), FAB-T (100 iterations, 9 target classes,
1 restart), Square (5,000 queries, p_init 0.8, 1 restart), each run on the points that the
previous ones did not fool. With fewer than 10 classes the number of target classes is
``num_classes − 1``; APGD-T's targeted DLR loss needs at least 4 classes and is left out below
that (recorded in the parameters). ``fast`` (``autoattack-fast`` in the attacks suite) is a
cheaper variant under its own name: APGD-CE and APGD-T with 20 iterations and 3 targets.

The parameters reported with every figure are read back from the backend's attack objects after
configuration, not copied from this module's constants.

Sanity checks recorded with every run (a failed check does not stop the evaluation, it is
reported): the model is deterministic in eval mode (the standard version assumes no
randomness), returns logits rather than probabilities, is not constant (a constant classifier
has no gradient and no boundary: every attack "fails" and robust accuracy is the share of its
class), the adversarial images lie in the ε-ball and in [0, 1], and AutoAttack is not weaker than
PGD on the same images.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from advfeat.errors import AdvfeatError

__all__ = [
    "BACKENDS",
    "FAST",
    "STANDARD",
    "AutoAttackRunner",
    "autoattack_backend",
    "describe_parameters",
    "make_autoattack",
    "model_checks",
    "perturbation_check",
]

BACKENDS = ("autoattack", "pyautoattack", "torchattacks")
MISSING_HINT = (
    "AutoAttack needs an optional package: pip install 'advfeat[autoattack]' (the authors' code, "
    "pyautoattack), or the authors' autoattack package, or torchattacks"
)

STANDARD: dict[str, dict[str, Any]] = {
    "apgd-ce": {"n_iter": 100, "n_restarts": 1},
    "apgd-t": {"n_iter": 100, "n_restarts": 1, "n_target_classes": 9},
    "fab-t": {"n_iter": 100, "n_restarts": 1, "n_target_classes": 9},
    "square": {"n_queries": 5000, "n_restarts": 1, "p_init": 0.8},
}
"""The standard version's parameters (Croce & Hein 2020, Sec. 5; the authors' ``standard``)."""

FAST: dict[str, dict[str, Any]] = {
    "apgd-ce": {"n_iter": 20, "n_restarts": 1},
    "apgd-t": {"n_iter": 20, "n_restarts": 1, "n_target_classes": 3},
}
"""``fast``: a cheaper variant, never reported as AutoAttack's standard version."""

MIN_CLASSES_TARGETED_DLR = 4


def autoattack_backend() -> str | None:
    """The first installed backend of :data:`BACKENDS`, or ``None``."""
    for name in BACKENDS:
        if importlib.util.find_spec(name) is not None:
            return name
    return None


def _backend_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return str(getattr(importlib.import_module(name), "__version__", "unknown"))


@dataclass
class AutoAttackRunner:
    """``runner(x, y) -> x_adv``, with what it runs: backend, its version, the AutoAttack version
    (``standard`` / ``plus`` / ``rand`` / ``fast``) and the parameters read from the backend."""

    backend: str
    backend_version: str
    version: str
    parameters: dict[str, dict[str, Any]]
    run: Callable[[Tensor, Tensor], Tensor] = field(repr=False)

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        return self.run(x, y)

    def describe(self) -> str:
        return f"{self.backend} {self.backend_version}, {self.version}: " + describe_parameters(
            self.parameters
        )


def describe_parameters(parameters: dict[str, dict[str, Any]]) -> str:
    """``APGD-CE 100 it; APGD-T 100 it × 9 targets; ...`` (restarts when not 1)."""
    parts = []
    for name, p in parameters.items():
        if "skipped" in p:
            parts.append(f"{name.upper()} left out ({p['skipped']})")
            continue
        text = name.upper()
        if "n_iter" in p:
            text += f" {p['n_iter']} it"
        if "n_queries" in p:
            text += f" {p['n_queries']} queries"
        if "n_target_classes" in p:
            text += f" × {p['n_target_classes']} targets"
        if p.get("n_restarts", 1) != 1:
            text += f", {p['n_restarts']} restarts"
        parts.append(text)
    return "; ".join(parts)


def _plan(version: str, num_classes: int) -> dict[str, dict[str, Any]]:
    """The attacks to run and their parameters for ``version`` and ``num_classes``."""
    base = FAST if version == "fast" else STANDARD
    plan = {name: dict(p) for name, p in base.items()}
    for p in plan.values():
        if "n_target_classes" in p:
            p["n_target_classes"] = min(p["n_target_classes"], num_classes - 1)
    if num_classes < MIN_CLASSES_TARGETED_DLR and "apgd-t" in plan:
        plan["apgd-t"] = {"skipped": f"targeted DLR needs ≥ {MIN_CLASSES_TARGETED_DLR} classes"}
    return plan


def make_autoattack(
    model: nn.Module, *, eps: float, version: str, seed: int, num_classes: int, device: torch.device
) -> AutoAttackRunner:
    """AutoAttack (L∞, ``eps``) with the installed backend; ``version`` is ``standard``,
    ``fast`` (authors' backends and torchattacks) or ``plus`` / ``rand`` (authors' only)."""
    backend = autoattack_backend()
    if backend is None:
        raise AdvfeatError(MISSING_HINT)
    if backend == "torchattacks":
        if version not in ("standard", "fast"):
            raise AdvfeatError(
                f"AutoAttack version {version!r} needs the authors' code: pip install "
                "'advfeat[autoattack]'; with torchattacks use 'standard' or 'fast'"
            )
        return _torchattacks(model, eps, version, seed, num_classes)
    return _authors(backend, model, eps, version, seed, num_classes, device)


def _authors(
    backend: str,
    model: nn.Module,
    eps: float,
    version: str,
    seed: int,
    num_classes: int,
    device: torch.device,
) -> AutoAttackRunner:
    module = importlib.import_module(backend)
    plan = _plan(version, num_classes)
    if version in ("standard", "fast"):
        attacks = [name for name, p in plan.items() if "skipped" not in p]
        options: dict[str, Any] = (
            {"attacks_to_run": attacks} if backend == "autoattack" else {"attacks": attacks}
        )
        adversary = module.AutoAttack(
            model, norm="Linf", eps=eps, version="custom", seed=seed, device=str(device), **options
        )
        adversary.attacks_to_run = attacks
        adversary.apgd.n_iter = plan["apgd-ce"]["n_iter"]
        adversary.apgd.n_restarts = plan["apgd-ce"]["n_restarts"]
        if "apgd-t" in attacks:
            target = plan["apgd-t"]
            adversary.apgd_targeted.n_iter = target["n_iter"]
            adversary.apgd_targeted.n_restarts = target["n_restarts"]
            adversary.apgd_targeted.n_target_classes = target["n_target_classes"]
        if "fab-t" in attacks:
            adversary.fab.n_iter = plan["fab-t"]["n_iter"]
            adversary.fab.n_restarts = plan["fab-t"]["n_restarts"]
            adversary.fab.n_target_classes = plan["fab-t"]["n_target_classes"]
        if "square" in attacks:
            adversary.square.n_queries = plan["square"]["n_queries"]
            adversary.square.p_init = plan["square"]["p_init"]
            adversary.square.n_restarts = plan["square"]["n_restarts"]
    else:
        adversary = module.AutoAttack(
            model, norm="Linf", eps=eps, version=version, seed=seed, device=str(device)
        )
        attacks = list(adversary.attacks_to_run)
    adversary.verbose = False
    read = {
        "apgd-ce": lambda: _read(adversary.apgd, n_iter="n_iter", n_restarts="n_restarts"),
        "apgd-dlr": lambda: _read(adversary.apgd, n_iter="n_iter", n_restarts="n_restarts"),
        "apgd-t": lambda: _read(
            adversary.apgd_targeted,
            n_iter="n_iter",
            n_restarts="n_restarts",
            n_target_classes="n_target_classes",
        ),
        "fab-t": lambda: _read(
            adversary.fab,
            n_iter="n_iter",
            n_restarts="n_restarts",
            n_target_classes="n_target_classes",
        ),
        "fab": lambda: _read(adversary.fab, n_iter="n_iter", n_restarts="n_restarts"),
        "square": lambda: _read(
            adversary.square, n_queries="n_queries", n_restarts="n_restarts", p_init="p_init"
        ),
    }
    parameters = {name: read[name]() for name in attacks}
    for name, p in plan.items():
        if "skipped" in p and version in ("standard", "fast"):
            parameters[name] = p

    def run(x: Tensor, y: Tensor) -> Tensor:
        if backend == "autoattack":
            return adversary.run_standard_evaluation(x, y, bs=x.shape[0])  # type: ignore[no-any-return]
        x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=x.shape[0])
        return x_adv  # type: ignore[no-any-return]

    return AutoAttackRunner(backend, _backend_version(backend), version, parameters, run)


def _read(obj: Any, **names: str) -> dict[str, Any]:
    return {key: getattr(obj, attr) for key, attr in names.items()}


def _torchattacks(
    model: nn.Module, eps: float, version: str, seed: int, num_classes: int
) -> AutoAttackRunner:
    ta = importlib.import_module("torchattacks")
    plan = _plan(version, num_classes)
    attacks: dict[str, Any] = {}
    ce = plan["apgd-ce"]
    attacks["apgd-ce"] = ta.APGD(
        model, norm="Linf", eps=eps, steps=ce["n_iter"], n_restarts=ce["n_restarts"], loss="ce",
        seed=seed,
    )  # fmt: skip
    if "skipped" not in plan["apgd-t"]:
        t = plan["apgd-t"]
        attacks["apgd-t"] = ta.APGDT(
            model, norm="Linf", eps=eps, steps=t["n_iter"], n_restarts=t["n_restarts"],
            n_classes=num_classes, seed=seed,
        )  # fmt: skip
        attacks["apgd-t"].n_target_classes = t["n_target_classes"]
    if "fab-t" in plan:
        f = plan["fab-t"]
        attacks["fab-t"] = ta.FAB(
            model, norm="Linf", eps=eps, steps=f["n_iter"], n_restarts=f["n_restarts"],
            multi_targeted=True, n_classes=num_classes, seed=seed,
        )  # fmt: skip
        attacks["fab-t"].n_target_classes = f["n_target_classes"]
    if "square" in plan:
        s = plan["square"]
        attacks["square"] = ta.Square(
            model, norm="Linf", eps=eps, n_queries=s["n_queries"], n_restarts=s["n_restarts"],
            p_init=s["p_init"], seed=seed,
        )  # fmt: skip
    chain = ta.MultiAttack(list(attacks.values()))
    parameters: dict[str, dict[str, Any]] = {}
    for name, atk in attacks.items():
        if name == "square":
            parameters[name] = _read(
                atk, n_queries="n_queries", n_restarts="n_restarts", p_init="p_init"
            )
        else:
            parameters[name] = _read(atk, n_iter="steps", n_restarts="n_restarts")
            if name != "apgd-ce":
                parameters[name]["n_target_classes"] = atk.n_target_classes
    for name, p in plan.items():
        if "skipped" in p:
            parameters[name] = p

    def run(x: Tensor, y: Tensor) -> Tensor:
        return chain(x, y)  # type: ignore[no-any-return]

    return AutoAttackRunner(
        "torchattacks", _backend_version("torchattacks"), version, parameters, run
    )


@torch.no_grad()
def model_checks(model: nn.Module, x: Tensor) -> dict[str, dict[str, Any]]:
    """Deterministic output, logits (not probabilities), and not a constant function, on ``x``."""
    first, second = model(x), model(x)
    deterministic = bool(torch.equal(first, second))
    rows = first.sum(dim=1)
    probabilities = bool(
        (first.min() >= 0) and (first.max() <= 1) and torch.allclose(rows, torch.ones_like(rows))
    )
    spread = float((first - first[:1]).abs().max()) if first.shape[0] > 1 else float("nan")
    constant = first.shape[0] > 1 and spread <= 1e-6 * max(1.0, float(first.abs().max()))
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
        "not_constant": {
            "passed": not constant,
            "detail": f"outputs vary across inputs (max spread {spread:.3g})"
            if not constant
            else "the model returns the same logits for every input: no attack can change its "
            "prediction, so 'robust' accuracy is just the share of its one class (a degenerate "
            "classifier, not a robust one)",
        },
    }


def perturbation_check(max_linf: float, eps: float, lo: float, hi: float) -> dict[str, Any]:
    """The adversarial images lie in the ε-ball and in [0, 1]."""
    ok = max_linf <= eps + 1e-5 and lo >= -1e-6 and hi <= 1 + 1e-6
    return {
        "passed": ok,
        "detail": f"max |δ|∞ = {max_linf:.6f} (ε = {eps:.6f}), values in [{lo:.4f}, {hi:.4f}]",
    }
