"""AdvProp: adversarial examples as extra training data through an auxiliary BN (Xie et al. 2020).

Algorithm 1, per training step::

    x^a = attack(x^c)                       # generated with the auxiliary BNs
    L = L^c(θ, x^c, y) [main BNs] + L^a(θ, x^a, y) [auxiliary BNs]

i.e. Eq. 3, ``min_θ E[L(θ, x, y) + max_{ε∈S} L(θ, x + ε, y)]``, with the two BN branches of
Sec. 4.2. At test time the auxiliary BNs are dropped (Sec. 4.3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from advfeat.attacks.base import Attack
from advfeat.attacks.pixel import GD, IFGSM, PGD, advprop_pgd_steps
from advfeat.errors import AdvfeatError, unknown_name
from advfeat.methods.auxbn import (
    ADV,
    AUX_NORM_OPTION,
    EXTRA_SOURCES,
    MAIN,
    PIXEL_LEVELS,
    ROUTINGS,
    AuxBNMethod,
    branch_forward,
    require_branches,
)
from advfeat.methods.base import ATTACK_BN_MODE, MethodOutput, cross_entropy
from advfeat.methods.registry import register_method
from advfeat.options import Choice, Flag, Integer, Number, option

__all__ = ["ATTACKERS", "AdvProp"]

ATTACKERS = ("pgd", "ifgsm", "gd")


@register_method
class AdvProp(AuxBNMethod):
    """AdvProp (Algorithm 1): L^c through the main BNs + L^a through the auxiliary BNs.

    Options (defaults: the ResNet setting, Sec. 5.2 "ResNet Results" / Table 8, PGD5 at ε = 4):

    * ``attacker``: ``"pgd"`` (L∞ PGD with a random start, Sec. 5.1), ``"ifgsm"`` (no random
      start) or ``"gd"`` (no projection onto the ε-ball) — Table 7.
    * ``eps``, ``alpha``: ε and the step size in pixel levels of 0-255 (``eps=4`` is 4/255);
      Sec. 5.1 fixes the step size to 1.
    * ``steps``: attack iterations; ``None`` applies Sec. 5.1's rule n = ε + 1 (n = 1 at ε = 1).
    * ``attack_bn_mode``: BN mode of the attack. ``"train"`` (default): the aux BNs normalise
      with the batch statistics of the images being attacked — the attack maximises exactly the
      L^a that the training forward then computes (Algorithm 1 generates x^a "using the
      auxiliary BNs" inside training). ``"eval"``: the aux BNs' running statistics. Either way
      the attack never moves running statistics.
    * ``attack_branch``: the BN branch the attack runs through (``"adv"``, Algorithm 1).
    * ``routing``: ``"split"`` — [clean | adv] in ONE forward pass, each chunk through its own
      BN branch (:func:`advfeat.norm.split_branches`); ``"separate"`` — one pass per branch.
      Same losses, gradients and statistics; ``"auto"`` (default) splits on GPUs and under
      DDP, and runs separate passes on CPUs, where they are faster
      (:func:`advfeat.methods.auxbn.resolve_routing`).
    * ``adv_weight``: weight of L^a (1 in Algorithm 1).
    * ``eval_branch``: BN branch kept for evaluation (``"clean"``: aux BNs dropped, Sec. 4.3;
      ``"adv"``: Table 3's auxiliary-BN evaluation).
    * ``fine_grained`` / ``extra_sources`` / ``adv_source``: fine-grained AdvProp (Sec. 5.4,
      Table 5) — one more aux BN per extra data source, each with its own loss term. The
      paper's extra source is AutoAugment images; the implemented source ``"strong_aug"`` is a
      strongly augmented copy of the batch (:func:`advfeat.methods.auxbn.strong_augment`). The
      main BN then sees the loader's images only. ``adv_source`` says which images are attacked:
      ``"auto"`` = the first extra source when fine-grained (our reading: in the paper the
      adversarial examples come from the AutoAugment-ed training images, as in its default
      AdvProp, and the new main branch gets un-augmented images), else ``"clean"``.
    """

    name = "advprop"
    capturable_step = True  # the attack and the branch passes draw and read nothing on the host
    paper = "Xie et al. 2020, Adversarial Examples Improve Image Recognition (CVPR)"

    @dataclass
    class Options:
        # Sec. 5.1 default attacker; Table 7: "ifgsm", "gd"
        attacker: str = option("pgd", Choice(*ATTACKERS))
        # 0-255 units; Table 8 (ResNets): PGD5, ε = 4
        eps: float = option(4.0, Number(low=0, high=255, low_open=True, hint=PIXEL_LEVELS))
        # Sec. 5.1: n = ε + 1 (n = 1 at ε = 1)
        steps: int | None = option(None, Integer(low=1, optional=True))
        # 0-255 units; Sec. 5.1: step size fixed to 1
        alpha: float = option(1.0, Number(low=0, low_open=True, hint=PIXEL_LEVELS))
        attack_bn_mode: str = option("train", ATTACK_BN_MODE)
        attack_branch: str = ADV  # Algorithm 1: attack through the auxiliary BNs
        routing: str = option("auto", Choice(*ROUTINGS))
        # papers: BN only; per-sample norms (LayerNorm...): "separate" or "shared" affine
        aux_norm: str = option("separate", AUX_NORM_OPTION)
        adv_weight: float = option(1.0, Number(low=0))  # Algorithm 1: L^a + L^c
        eval_branch: str = MAIN  # Sec. 4.3: aux BNs dropped at test time
        fine_grained: bool = option(False, Flag())  # Sec. 5.4, Table 5
        extra_sources: tuple[str, ...] = ("strong_aug",)
        adv_source: str = "auto"

    # ---------------------------------------------------------------------------- options
    def extra_source_names(self) -> tuple[str, ...]:
        """The extra data sources in use (empty unless ``fine_grained``)."""
        return tuple(self.opts.extra_sources) if self.opts.fine_grained else ()

    def branches(self) -> tuple[str, ...]:
        """``("clean", *extra sources, "adv")``: one aux BN per extra source (Sec. 4.2)."""
        return (MAIN, *self.extra_source_names(), ADV)

    def attacked_source(self) -> str:
        """The images the attack perturbs: ``"clean"`` or one extra source."""
        if self.opts.adv_source != "auto":
            return str(self.opts.adv_source)
        extras = self.extra_source_names()
        return extras[0] if extras else MAIN

    @property
    def attack_steps(self) -> int:
        """n: the ``steps`` option, or Sec. 5.1's rule n = ε + 1 (n = 1 at ε = 1)."""
        if self.opts.steps is not None:
            return int(self.opts.steps)
        return advprop_pgd_steps(self.opts.eps)

    def validate_options(self) -> None:
        o, name = self.opts, self.name
        if o.steps is None and (o.eps < 1 or o.eps != int(o.eps)):
            raise AdvfeatError(
                f"{name}: the rule n = ε + 1 (Sec. 5.1) needs a whole number of pixel levels "
                f"eps >= 1 (eps=4 means 4/255), got eps={o.eps!r}; give steps explicitly"
            )
        self._validate_sources()
        Choice(*self.branches())(name, "attack_branch", o.attack_branch)
        super().validate_options()

    def _validate_sources(self) -> None:
        o, name = self.opts, self.name
        if isinstance(o.extra_sources, str) or not isinstance(o.extra_sources, list | tuple):
            raise AdvfeatError(
                f"{name}: extra_sources must be a list of source names, e.g. ['strong_aug'], "
                f"got {o.extra_sources!r}"
            )
        o.extra_sources = tuple(o.extra_sources)
        for source in o.extra_sources:
            if source not in EXTRA_SOURCES:
                raise unknown_name(f"{name} extra source", str(source), EXTRA_SOURCES)
        if len(set(o.extra_sources)) != len(o.extra_sources):
            raise AdvfeatError(f"{name}: extra_sources names a source twice: {o.extra_sources}")
        if o.fine_grained and not o.extra_sources:
            raise AdvfeatError(f"{name}: fine_grained=true needs at least one extra source")
        Choice("auto", MAIN, *self.extra_source_names())(name, "adv_source", o.adv_source)

    def capture_refusal(self) -> str | None:
        if self.opts.fine_grained:  # its strong augmentation draws its parameters on the CPU
            return "fine-grained AdvProp draws its strong augmentation on the CPU"
        return super().capture_refusal()

    # ----------------------------------------------------------------------------- attack
    def make_attack(self, net: nn.Module) -> Attack:
        """The attacker of ``attacker``, ε = eps/255, step alpha/255, through ``attack_branch``."""
        o = self.opts
        eps, alpha, steps = o.eps / 255, o.alpha / 255, self.attack_steps
        common = {"bn_mode": o.attack_bn_mode, "branch": o.attack_branch}
        if o.attacker == "pgd":
            return PGD(net, eps=eps, alpha=alpha, steps=steps, norm="linf", **common)
        if o.attacker == "ifgsm":
            return IFGSM(net, eps=eps, alpha=alpha, steps=steps, norm="linf", **common)
        return GD(net, alpha=alpha, steps=steps, **common)

    def source_batches(self, x: Tensor) -> dict[str, Tensor]:
        """The clean batch and every extra source's version of it, by branch name."""
        batches = {MAIN: x}
        for source in self.extra_source_names():
            batches[source] = EXTRA_SOURCES[source](x)
        return batches

    # ---------------------------------------------------------------------------- forward
    def forward(self, model: nn.Module, x: Tensor, y: Tensor) -> MethodOutput:  # type: ignore[override]
        o = self.opts
        net = require_branches(model, self.name)
        sources = self.source_batches(x)
        attacked = sources[self.attacked_source()]
        x_adv = self.make_attack(net)(attacked, y)
        chunks = [*sources.items(), (ADV, x_adv)]
        outputs = branch_forward(model, chunks, routing=o.routing)
        losses = {
            name: cross_entropy(out, y) for (name, _), out in zip(chunks, outputs, strict=True)
        }
        loss = sum((losses[s] for s in sources), start=o.adv_weight * losses[ADV])
        logs = {"loss_clean": losses[MAIN], "loss_adv": losses[ADV]}
        logs.update({f"loss_{s}": losses[s] for s in self.extra_source_names()})
        with torch.no_grad():
            logs["adv_linf_255"] = (x_adv - attacked).abs().amax() * 255
        return MethodOutput(loss=loss, logits=outputs[0], logs=self.detach_logs(**logs))
