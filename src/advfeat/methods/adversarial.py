"""Pixel adversarial training: the attacks and the losses of PGD-AT, TRADES and MART.

Shared by the methods ``pgd-at``, ``trades``, ``mart`` and ``afa`` (which trains each of its BN
branches with one of them). The losses are plain functions of logits, so they apply to a whole
batch or to one BN branch's chunk of it:

* :func:`pgd_at_loss` — Madry et al. 2018, Eq. (2.1): the outer minimisation of
  E[max_{δ∈S} L(θ, x + δ, y)], i.e. the cross-entropy of the adversarial example x′.
* :func:`trades_loss` — Zhang et al. 2019, the TRADES objective (§4, Alg. 1, multi-class form):
  CE(f(x), y) + β · (1/n) Σ_i KL(f(x_i) ‖ f(x′_i)), with β = 1/λ.
* :func:`mart_loss` — Wang et al. 2020, the MART objective L^MART (§3.3):
  (1/n) Σ_i [BCE(p(x′_i), y_i) + λ · KL(p(x_i) ‖ p(x′_i)) · (1 − p_{y_i}(x_i))], with the
  boosted cross-entropy BCE(p(x′), y) = −log p_y(x′) − log(1 − max_{k≠y} p_k(x′)).
* :func:`adversarial_term` — the part of each objective that involves x′ (AFA Eq. 3's L_adv).

Nothing is detached inside the losses: as in both papers' objectives (and their reference code),
gradients flow through f(x) in the KL term and through the weight (1 − p_y(x)) of MART.

The attack, :func:`pixel_attack`, is the L∞ :class:`~advfeat.attacks.pixel.PGD` of
``advfeat.attacks.pixel``; what differs between the papers is collected in :data:`PAPER_ATTACKS`:

========  ====================  ===============================  =====================
base      attack maximises      start                            BN mode of the attack
========  ====================  ===============================  =====================
pgd-at    CE(f(x′), y)          uniform in the ε-ball            train (batch stats)
trades    KL(f(x) ‖ f(x′))      x + 0.001·N(0, I)                eval (running stats)
mart      CE(f(x′), y)          x + 0.001·N(0, I)                eval (running stats)
========  ====================  ===============================  =====================

The BN modes follow the reference implementations (Madry's model runs its attack in the training
graph; TRADES and MART call ``model.eval()`` before attacking). Unlike those implementations the
attack never moves BN running statistics (guaranteed by :class:`~advfeat.attacks.base.Attack`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advfeat.attacks.base import BNMode, attack_guard
from advfeat.attacks.pixel import PGD
from advfeat.errors import AdvfeatError, unknown_name
from advfeat.methods.base import ATTACK_BN_MODE, Method
from advfeat.options import Choice, Integer, Number, option

__all__ = [
    "BASES",
    "EPS",
    "INIT_STD",
    "PAPER_ATTACKS",
    "RANDOM_START",
    "STEP",
    "STEPS",
    "AttackLoss",
    "Base",
    "PaperAttack",
    "PixelAdversarialTraining",
    "RandomStart",
    "ReferenceAttackOptions",
    "adversarial_term",
    "boosted_cross_entropy",
    "clean_reference_logits",
    "mart_loss",
    "pgd_at_loss",
    "pixel_attack",
    "trades_kl",
    "trades_loss",
]

Base = Literal["pgd-at", "trades", "mart"]
BASES: tuple[str, ...] = get_args(Base)
AttackLoss = Literal["ce", "kl"]
RandomStart = Literal["uniform", "normal", "none"]
RANDOM_STARTS: tuple[str, ...] = get_args(RandomStart)


@dataclass(frozen=True)
class PaperAttack:
    """How one paper generates its training attack (see the module table)."""

    loss: AttackLoss
    random_start: RandomStart
    bn_mode: Literal["train", "eval"]


PAPER_ATTACKS: dict[str, PaperAttack] = {
    "pgd-at": PaperAttack(loss="ce", random_start="uniform", bn_mode="train"),
    "trades": PaperAttack(loss="kl", random_start="normal", bn_mode="eval"),
    "mart": PaperAttack(loss="ce", random_start="normal", bn_mode="eval"),
}


# --------------------------------------------------------------------------------- losses
def pgd_at_loss(logits_adv: Tensor, y: Tensor) -> Tensor:
    """Madry et al. 2018, Eq. (2.1): mean cross-entropy of the adversarial examples."""
    return F.cross_entropy(logits_adv, y)


def trades_kl(logits_clean: Tensor, logits_adv: Tensor) -> Tensor:
    """Per-sample KL(f(x) ‖ f(x′)) = Σ_k p_k(x) (log p_k(x) − log p_k(x′)), shape ``(B,)``.

    The TRADES surrogate of the boundary error (Zhang et al. 2019, §4) and MART's KL term.
    """
    log_p = F.log_softmax(logits_clean, dim=1)
    log_q = F.log_softmax(logits_adv, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def trades_loss(logits_clean: Tensor, logits_adv: Tensor, y: Tensor, beta: float) -> Tensor:
    """TRADES objective (Zhang et al. 2019, §4, Alg. 1): CE(f(x), y) + β·mean KL(f(x) ‖ f(x′))."""
    return F.cross_entropy(logits_clean, y) + adversarial_term(
        "trades", logits_clean, logits_adv, y, weight=beta
    )


def boosted_cross_entropy(logits_adv: Tensor, y: Tensor) -> Tensor:
    """MART's BCE (Wang et al. 2020, §3.3), per sample: −log p_y(x′) − log(1 − max_{k≠y} p_k(x′)).

    Computed in log space: log(1 − p_j) = logsumexp_{i≠j} z_i − logsumexp_i z_i, exact and finite
    where the reference code adds offsets (``log(1.0001 − p + 1e-12)``).
    """
    log_p = F.log_softmax(logits_adv, dim=1)
    true = y.view(-1, 1)
    ce = -log_p.gather(1, true).squeeze(1)
    runner_up = log_p.scatter(1, true, float("-inf")).argmax(dim=1, keepdim=True)
    without_runner_up = logits_adv.scatter(1, runner_up, float("-inf"))
    log_one_minus = torch.logsumexp(without_runner_up, dim=1) - torch.logsumexp(logits_adv, dim=1)
    return ce - log_one_minus


def mart_loss(logits_clean: Tensor, logits_adv: Tensor, y: Tensor, lam: float) -> Tensor:
    """MART objective (Wang et al. 2020, §3.3), averaged over the batch:

    (1/n) Σ_i [BCE(p(x′_i), y_i) + λ · KL(p(x_i) ‖ p(x′_i)) · (1 − p_{y_i}(x_i))].
    """
    return adversarial_term("mart", logits_clean, logits_adv, y, weight=lam)


def adversarial_term(
    base: str, logits_clean: Tensor, logits_adv: Tensor, y: Tensor, *, weight: float
) -> Tensor:
    """The part of ``base``'s objective that involves the adversarial logits (AFA Eq. 3's L_adv).

    * ``pgd-at``: CE(f(x′), y) (Madry Eq. 2.1; ``logits_clean`` and ``weight`` unused);
    * ``trades``: β · mean KL(f(x) ‖ f(x′)) (TRADES' natural term CE(f(x), y) is not included);
    * ``mart``: the whole MART objective (it has no separate clean term), λ = ``weight``.
    """
    if base == "pgd-at":
        return pgd_at_loss(logits_adv, y)
    if base == "trades":
        return weight * trades_kl(logits_clean, logits_adv).mean()
    if base == "mart":
        p_true = F.softmax(logits_clean, dim=1).gather(1, y.view(-1, 1)).squeeze(1)
        kl = trades_kl(logits_clean, logits_adv)
        return (boosted_cross_entropy(logits_adv, y) + weight * kl * (1 - p_true)).mean()
    raise unknown_name("adversarial-training base", str(base), BASES)


# --------------------------------------------------------------------------------- attack
def clean_reference_logits(
    model: nn.Module,
    x: Tensor,
    *,
    bn_mode: BNMode,
    train_logits: Tensor | None = None,
    branch: str | None = None,
) -> Tensor:
    """f(x) as the attack sees it: the target of TRADES' KL attack, detached.

    In ``"train"`` BN mode the training forward's clean logits are the same values (batch
    statistics of the same batch), so ``train_logits`` is reused when given; otherwise one
    gradient-free pass runs in ``bn_mode`` (running statistics untouched).
    """
    if bn_mode == "train" and train_logits is not None:
        return train_logits.detach()
    with attack_guard(model, bn_mode=bn_mode, branch=branch), torch.no_grad():
        return model(x).detach()


def _kl_objective(clean_logits: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    log_p = F.log_softmax(clean_logits.detach().float(), dim=1)
    p = log_p.exp()

    def loss_fn(output: Tensor, _target: Tensor) -> Tensor:
        log_q = F.log_softmax(output.float(), dim=1)
        return (p * (log_p - log_q)).sum()

    return loss_fn


def pixel_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float | Tensor,
    alpha: float | Tensor,
    steps: int,
    loss: AttackLoss = "ce",
    clean_logits: Tensor | None = None,
    random_start: RandomStart = "uniform",
    init_std: float = 0.001,
    bn_mode: BNMode = "eval",
    branch: str | None = None,
) -> Tensor:
    """L∞ PGD on the images ``x`` (in [0, 1]) with one paper's loss and random start.

    ``loss="ce"`` maximises the summed cross-entropy (Madry; MART); ``loss="kl"`` maximises
    Σ_i KL(f(x_i) ‖ f(x_i + δ_i)) towards ``clean_logits`` (TRADES Alg. 1).
    ``random_start``: ``"uniform"`` in the ε-ball (Madry), ``"normal"`` = δ₀ ~ ``init_std``·N(0, I)
    (TRADES, MART), ``"none"``. ``eps``/``alpha`` may be per-sample tensors of shape ``(B,)``.
    ``model`` is the unwrapped network; BN routing set by the caller (``split_branches``) applies.
    """
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None
    if loss == "kl":
        if clean_logits is None:
            raise AdvfeatError("the KL attack of TRADES needs the clean logits f(x) as its target")
        loss_fn = _kl_objective(clean_logits)
    elif loss != "ce":
        raise unknown_name("attack loss", str(loss), ("ce", "kl"))
    if random_start not in RANDOM_STARTS:
        raise unknown_name("random start", str(random_start), RANDOM_STARTS)
    attack = PGD(
        model,
        eps=eps,
        alpha=alpha,
        steps=steps,
        norm="linf",
        random_start=random_start == "uniform",
        loss_fn=loss_fn,
        bn_mode=bn_mode,
        branch=branch,
    )
    if random_start == "normal":
        return attack(x, y, init=init_std * torch.randn_like(x))
    return attack(x, y)


EPS = Number(low=0, high=1, low_open=True, hint="images lie in [0, 1]; 8/255 ≈ 0.0314")
"""The L∞ budget of a pixel attack on [0, 1] images."""
STEP = Number(low=0, low_open=True, hint="the attack step")
STEPS = Integer(low=1)
RANDOM_START = Choice(*RANDOM_STARTS)
INIT_STD = Number(low=0)


@dataclass
class ReferenceAttackOptions:
    """The training attack of the TRADES reference code on CIFAR-10 (train_trades_cifar10.py;
    MART's train_wideresnet.py reuses it): ε = 0.031 (≈ 8/255), step 0.007, 10 steps from
    x + 0.001·N(0, I), with BN in eval mode. The options of ``trades`` and ``mart`` extend it."""

    eps: float = option(0.031, EPS)
    alpha: float = option(0.007, STEP)
    steps: int = option(10, STEPS)
    random_start: str = option("normal", RANDOM_START)
    init_std: float = option(0.001, INIT_STD)
    attack_bn_mode: str = option("eval", ATTACK_BN_MODE)


class PixelAdversarialTraining(Method):
    """Common part of ``pgd-at``, ``trades`` and ``mart``: option checks and the attack.

    Subclasses set ``paper_attack`` (a key of :data:`PAPER_ATTACKS`) and declare ``Options`` with the fields
    ``eps``, ``alpha``, ``steps``, ``random_start``, ``init_std`` and ``attack_bn_mode``, each with
    its constraint (:data:`EPS`, :data:`STEP`, :data:`STEPS`, :data:`RANDOM_START`,
    :data:`INIT_STD`, :data:`~advfeat.methods.base.ATTACK_BN_MODE`); ``trades`` and ``mart``
    inherit them from :class:`ReferenceAttackOptions`.
    """

    paper_attack: ClassVar[str] = ""

    capturable_step = True
    """The attack reads nothing from the device (the images' range is noted on it for the
    trainer, :func:`~advfeat.attacks.base.deferred_image_checks`) and draws its random start
    from the device's generator."""

    def adversarial_examples(
        self, net: nn.Module, x: Tensor, y: Tensor, clean_logits: Tensor | None = None
    ) -> Tensor:
        """x′ by this paper's attack on the unwrapped network ``net`` (weights and BN untouched)."""
        o = self.opts
        return pixel_attack(
            net,
            x,
            y,
            eps=o.eps,
            alpha=o.alpha,
            steps=o.steps,
            loss=PAPER_ATTACKS[self.paper_attack].loss,
            clean_logits=clean_logits,
            random_start=o.random_start,
            init_std=o.init_std,
            bn_mode=o.attack_bn_mode,
        )
