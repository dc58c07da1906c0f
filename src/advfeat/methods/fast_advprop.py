"""Fast AdvProp (Mei et al., ICLR 2022): AdvProp at nearly the cost of standard training.

Fast AdvProp keeps AdvProp's disentangled learning (adversarial examples through an auxiliary
BN, Xie et al. 2020 Sec. 4.2) and cuts its cost three ways:

1. *decoupled, shrunk adversarial part* — the batch of N images is split into a clean part
   ``x_c`` (N − n_a images) and a small attacked part ``x_a`` (n_a ≈ ``adv_fraction``·N; the
   authors' released ImageNet script splits clean : attacked = 4 : 1, i.e. 0.2), instead of
   attacking a copy of every image;
2. *PGD-1* — one L∞ sign step, ε = 1/255, step 1/255, from a uniform random start;
3. *gradient re-use* — the forward/backward pass that gives the attack its input gradient also
   gives the gradient of the weights, which is kept for the update instead of thrown away.

What this module computes per step (``reuse_attack_grad=True``, the default)::

    x_s   = clip(x_a + δ₀)                                   δ₀ ~ U[−ε, ε] (or 0)
    L₁    = (w_c·Σ_{x_c} ℓ(f_main(x_c)) + w_att·Σ_{x_a} ℓ(f_B(x_s))) / Z   one joint forward
    (g_δ, g_θ) = ∇_{δ₀, θ} L₁                                  ONE backward (both gradients)
    x_adv = clip(x_a + Π_ε(δ₀ + α·sign(g_δ)))                  the PGD-1 step
    L     = L₁ + w_adv·Σ_{x_a} ℓ(f_aux(x_adv)) / Z,           Z = w_c·(N − n_a) + (w_att + w_adv)·n_a

``B`` is ``attack_branch`` (the aux BN by default, in train mode, as the released code's
``--attack_in_train``); ℓ is the per-sample cross-entropy; the weights default to the released
``loss_strategy`` clean : attack : adv = 1 : 0.5 : 0.5. The returned loss has the value of L and,
when back-propagated, gives exactly ∇_θ L: the g_θ of the attack's backward enters through the
linear term ``Σ_p ⟨p, g_p⟩`` (value cancelled), so the joint pass is never back-propagated
twice; only the adversarial part is. One step costs ≈ (1 + adv_fraction) standard steps.

Differences from the released recipe, stated precisely:

* the released code divides each parameter's gradient by the weighted number of samples that
  used it (shared weights by Z, main-BN weights by w_c·(N − n_a), aux-BN weights by
  (w_att + w_adv)·n_a); here every parameter uses the single normaliser Z (one scalar loss, so
  it fits any optimiser loop). The BN parameters of one branch thus get gradients smaller by
  that branch's share of Z; shared weights — nearly all of the network — get the same gradient.
* its PGD start is the clean image with some probability (``prob_start_from_clean``); here the
  start is always random (``random_start=True``) or always clean (``False``).

Other reading (an option): ``attack_branch="clean"`` runs the attacked part through the *main*
BN in the joint pass, so with ``random_start=False`` and ``attack_weight=1`` the re-used
gradient is simply the clean loss of those images (L₁ is the clean loss of the whole batch);
``reuse_attack_grad=False`` discards the attack's weight gradient (an ordinary attack that
leaves the weights alone); the clean pass then covers the whole batch and
L = (w_c·Σ_{x} ℓ(f_main(x)) + w_adv·Σ_{x_a} ℓ(f_aux(x_adv))) / (w_c·N + w_adv·n_a).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advfeat.attacks.pixel import PGD
from advfeat.errors import AdvfeatError
from advfeat.methods.auxbn import (
    ADV,
    AUX_NORM_OPTION,
    MAIN,
    PIXEL_LEVELS,
    ROUTINGS,
    AuxBNMethod,
    branch_forward,
    require_branches,
)
from advfeat.methods.base import MethodOutput, unwrap
from advfeat.methods.registry import register_method
from advfeat.options import Choice, Flag, Number, option

__all__ = ["FastAdvProp", "attacked_count"]


def attacked_count(batch: int, fraction: float) -> int:
    """n_a: the number of attacked images, round(fraction·batch), at least 1 and at most batch − 1."""
    if batch < 2:
        raise AdvfeatError(
            f"fast-advprop splits each batch into a clean and an attacked part; it needs at least "
            f"2 images per batch, got {batch}"
        )
    return min(max(1, round(fraction * batch)), batch - 1)


def _sum_ce(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits.float(), y, reduction="sum")


@register_method
class FastAdvProp(AuxBNMethod):
    """Fast AdvProp: a small attacked fraction, PGD-1, the attack's weight gradient re-used.

    Options (defaults: the authors' released ImageNet recipe, ``scripts/run_fastadvprop.sh``:
    4 : 1 split, PGD-1 at ε = 1, step 1, loss weights clean 1 / attack 0.5 / adv 0.5):

    * ``adv_fraction``: share of each batch that is attacked (n_a, see :func:`attacked_count`).
    * ``eps``, ``alpha``: ε and step size in 0-255 pixel levels; one step (PGD-1).
    * ``random_start``: δ₀ uniform in the ε-ball (True) or 0.
    * ``attack_branch``: BN branch of the attacked part in the joint pass (``"adv"``: aux BN,
      the released recipe; ``"clean"``: main BN, the other reading).
    * ``reuse_attack_grad``: keep the attack pass's weight gradient (True) or discard it.
    * ``clean_weight``, ``attack_weight``, ``adv_weight``: w_c, w_att, w_adv above.
    * ``routing``: ``"split"`` (one forward for the joint pass), ``"separate"``, or ``"auto"``
      (split on GPUs and under DDP, separate on CPUs).
    * ``eval_branch``: BN branch kept for evaluation (main: aux BNs dropped, as in AdvProp).
    """

    name = "fast-advprop"
    capturable_step = True  # the joint pass, its gradients and the PGD-1 step stay on the device
    paper = "Mei et al. 2022, Fast AdvProp (ICLR)"

    last_start: Tensor | None = None
    """The attacked images at their start point x_s of the last step (detached)."""
    last_adv: Tensor | None = None
    """The adversarial examples x_adv of the last step (detached)."""

    @dataclass
    class Options:
        # released script: multi_clean_strategy 4:1 (a clean part is needed: below 1)
        adv_fraction: float = option(
            0.2, Number(low=0, high=1, low_open=True, high_open=True, hint="below 1")
        )
        # 0-255 units; PGD-1 at ε = 1 (released script, AdvProp's PGD1)
        eps: float = option(1.0, Number(low=0, high=255, low_open=True, hint=PIXEL_LEVELS))
        # 0-255 units; step size 1
        alpha: float = option(1.0, Number(low=0, low_open=True, hint=PIXEL_LEVELS))
        random_start: bool = option(True, Flag())
        # released script: --attack_in_train with the aux BN
        attack_branch: str = option(ADV, Choice(MAIN, ADV))
        reuse_attack_grad: bool = option(True, Flag())  # released script: --reuse_mid_grad
        clean_weight: float = option(1.0, Number(low=0))  # loss_strategy clean:1
        attack_weight: float = option(0.5, Number(low=0))  # loss_strategy attack:0.5
        adv_weight: float = option(0.5, Number(low=0))  # loss_strategy adv:0.5
        routing: str = option("auto", Choice(*ROUTINGS))
        # papers: BN only; per-sample norms (LayerNorm...): "separate" or "shared" affine
        aux_norm: str = option("separate", AUX_NORM_OPTION)
        eval_branch: str = MAIN

    def validate_options(self) -> None:
        o, name = self.opts, self.name
        if o.reuse_attack_grad and o.attack_weight == 0:
            raise AdvfeatError(
                f"{name}: attack_weight must be > 0 when reuse_attack_grad is true, got 0"
            )
        super().validate_options()

    # ----------------------------------------------------------------------------- pieces
    def normaliser(self, n_clean: int, n_attacked: int) -> float:
        """Z = w_c·n_c + (w_att + w_adv)·n_a (w_att counted only when its gradient is re-used)."""
        o = self.opts
        w_att = o.attack_weight if o.reuse_attack_grad else 0.0
        return o.clean_weight * n_clean + (w_att + o.adv_weight) * n_attacked

    def start_delta(self, x: Tensor) -> Tensor:
        """δ₀: uniform in the ε-ball (or 0), shrunk so that x + δ₀ stays in [0, 1]."""
        eps = self.opts.eps / 255
        if self.opts.random_start:
            delta = (torch.rand_like(x) * 2 - 1) * eps
        else:
            delta = torch.zeros_like(x)
        return (x + delta).clamp(0, 1) - x

    def pgd_step(self, x: Tensor, delta: Tensor, grad: Tensor) -> Tensor:
        """x + Π_ε(δ + α·sign(g)), clipped to [0, 1] (one L∞ PGD step, Madry et al. Eq. 2.1)."""
        eps, alpha = self.opts.eps / 255, self.opts.alpha / 255
        step = (delta.detach() + alpha * grad.sign()).clamp(-eps, eps)
        return (x + step).clamp(0, 1).detach()

    def joint_logits(self, model: nn.Module, x_c: Tensor, x_s: Tensor) -> tuple[Tensor, Tensor]:
        """Clean part through the main BN, attacked part through ``attack_branch``."""
        if self.opts.attack_branch == MAIN:
            out = branch_forward(model, [(MAIN, torch.cat([x_c, x_s]))], routing=self.opts.routing)
            return out[0][: x_c.shape[0]], out[0][x_c.shape[0] :]
        logits_c, logits_s = branch_forward(
            model, [(MAIN, x_c), (ADV, x_s)], routing=self.opts.routing
        )
        return logits_c, logits_s

    # ---------------------------------------------------------------------------- forward
    def forward(self, model: nn.Module, x: Tensor, y: Tensor) -> MethodOutput:  # type: ignore[override]
        o = self.opts
        net = require_branches(model, self.name)
        n_a = attacked_count(x.shape[0], o.adv_fraction)
        n_c = x.shape[0] - n_a
        x_c, y_c, x_a, y_a = x[:n_c], y[:n_c], x[n_c:], y[n_c:]
        logs: dict[str, Tensor | float]
        if o.reuse_attack_grad:
            z = self.normaliser(n_c, n_a)
            first, logits, x_adv, logs = self._attack_and_clean(model, net, x_c, y_c, x_a, y_a, z)
        else:  # the attack's backward is thrown away: the clean pass covers the whole batch
            z = self.normaliser(x.shape[0], n_a)
            x_adv = PGD(
                net, eps=o.eps / 255, alpha=o.alpha / 255, steps=1, norm="linf",
                random_start=o.random_start, bn_mode="train", branch=o.attack_branch,
            )(x_a, y_a)  # fmt: skip
            (logits,) = branch_forward(model, [(MAIN, x)], routing=o.routing)
            clean_sum = _sum_ce(logits, y)
            first = o.clean_weight * clean_sum / z
            logs = {"loss_clean": clean_sum.detach() / x.shape[0]}
        (logits_adv,) = branch_forward(model, [(ADV, x_adv)], routing=o.routing)
        adv_sum = _sum_ce(logits_adv, y_a)
        loss = first + o.adv_weight * adv_sum / z
        self.last_adv = x_adv
        logs.update(loss_adv=adv_sum.detach() / n_a, adv_fraction=n_a / x.shape[0])
        return MethodOutput(loss=loss, logits=logits, logs=self.detach_logs(**logs))

    def _attack_and_clean(
        self, model: nn.Module, net: nn.Module, x_c: Tensor, y_c: Tensor, x_a: Tensor,
        y_a: Tensor, z: float,
    ) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor | float]]:  # fmt: skip
        """The joint pass, its single backward (g_δ and g_θ), the PGD-1 step (Mei et al. 2022)."""
        o = self.opts
        delta = self.start_delta(x_a).requires_grad_(True)
        x_s = x_a + delta
        self.last_start = x_s.detach()
        logits_c, logits_s = self.joint_logits(model, x_c, x_s)
        clean_sum, attack_sum = _sum_ce(logits_c, y_c), _sum_ce(logits_s, y_a)
        first = (o.clean_weight * clean_sum + o.attack_weight * attack_sum) / z
        params = [p for p in unwrap(net).parameters() if p.requires_grad]
        grads = torch.autograd.grad(first, [delta, *params], allow_unused=True)
        if grads[0] is None:
            raise AdvfeatError("fast-advprop: the loss does not depend on the attacked images")
        x_adv = self.pgd_step(x_a, delta, grads[0])
        # ⟨p, g_p⟩ back-propagates g_p into p; its value is cancelled (Fast AdvProp gradient re-use)
        reuse = sum(
            (
                (p * g.to(p.dtype)).sum()
                for p, g in zip(params, grads[1:], strict=True)
                if g is not None
            ),
            start=first.new_zeros(()),
        )
        first_reused = first.detach() + reuse - reuse.detach()
        logits = torch.cat([logits_c, logits_s]).detach()
        logs: dict[str, Tensor | float] = {
            "loss_clean": clean_sum.detach() / x_c.shape[0],
            "loss_attack": attack_sum.detach() / x_a.shape[0],
        }
        return first_reused, logits, x_adv, logs
