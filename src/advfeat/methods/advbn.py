"""AdvBN: fine-tuning on adversarial feature statistics (Shu et al., NeurIPS 2021).

A pre-trained network g = g^{l+1,L} ∘ g^{1,l} is split at a feature site l. Per step
(Algorithm 1, Eq. 1-3)::

    f     = g^{1,l}(x)                                  frozen prefix: no update, no BN statistics
    (δ_μ, δ_σ) = PGD, m sign steps of size τ, clip to [1 − ε, 1 + ε]   (Eq. 2)
    f_adv = δ_σ·(f − μ(f)) + δ_μ·μ(f)                   per-channel batch mean μ (Eq. 1)
    L     = L(g^{l+1,L}_aux(f_adv), y) + L(g^{l+1,L}_main(f), y)        (Eq. 3)

Only θ of g^{l+1,L} is updated ("we only modify the parameters of later layers", Sec. 4); the
adversarial features go through an auxiliary BN in the sub-network, the clean ones through the
main BN (Sec. 4, after Xie et al. 2020). At test time either BN may be used (Appendix A.3).
The attack is :class:`advfeat.attacks.feature.BNStatsAttack` on the clean feature captured once,
so neither the attack nor the training passes re-run the prefix.

Readings of the paper (the other reading is an option):

* **Prefix BN mode** — the paper keeps g^{1,l} fixed but does not say in which BN mode it runs.
  Default ``prefix_bn_mode="eval"``: the pre-trained running statistics, so the training
  features are the features seen at test time. ``"train"``: batch statistics (running
  statistics still never move).
* **Strength** — ε = m·τ − 0.1 (Sec. 5.1, Sec. 5.2 "Adversarial strength"); ``eps`` overrides.
  ResNet-50 on ImageNet uses m = 6, τ = 0.2 (ε = 1.1); no CIFAR setting is given, so the
  defaults keep it. The multipliers start at 1 (Algorithm 1 leaves the start open;
  ``random_start`` draws them uniformly in [1 − ε, 1 + ε]).
* **Site** — conv2_3, the end of ResNet-50's first residual stage (Sec. 5.1); the CIFAR ResNets'
  first stage is ``layer1``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from weakref import WeakKeyDictionary

import torch
from torch import Tensor, nn

from advfeat.attacks.feature import BNStatsAttack
from advfeat.checkpoint import InitialWeights
from advfeat.errors import AdvfeatError
from advfeat.layouts import AUTO_LAYOUT, LayoutSpec, site_layout
from advfeat.methods.auxbn import (
    ADV,
    AUX_NORM_OPTION,
    MAIN,
    ROUTINGS,
    AuxBNMethod,
    prepare_branches,
    require_branches,
    resolve_routing,
)
from advfeat.methods.base import ATTACK_BN_MODE, MethodOutput, cross_entropy, unwrap
from advfeat.methods.registry import register_method
from advfeat.modes import restored_train_flags
from advfeat.norm import split_branches, use_branch
from advfeat.norm.stats import frozen_bn_statistics, has_running_statistics
from advfeat.options import Choice, Flag, Integer, Number, Text, option
from advfeat.sites import SiteSplit, first_stage, last_stage, resolve_site, stages

__all__ = ["AdvBN", "advbn_eps", "load_initial_weights", "prefix_module_names"]

AUTO_SITE = "auto"
"""The ``site`` option's default: the model's first stage (:func:`advfeat.sites.first_stage`)."""

_FIRST_STAGES: WeakKeyDictionary[nn.Module, str] = WeakKeyDictionary()
"""The first stage of each model AdvBN trained (looked up once per model, not at every step)."""

_PREFIXES: WeakKeyDictionary[nn.Module, dict[str, tuple[str, ...]]] = WeakKeyDictionary()


def advbn_eps(steps: int, tau: float) -> float:
    """AdvBN's bound ε = m·τ − 0.1 (Sec. 5.1 and 5.2)."""
    return steps * tau - 0.1


def load_initial_weights(
    model: nn.Module, initial: InitialWeights, *, method: str = "advbn"
) -> None:
    """Load ``initial`` (the weights of an ``advfeat train`` run) into the plain ``model``.

    Auxiliary BN branches in the weights (``....aux.<branch>....`` keys, e.g. of an AdvProp
    run) are dropped: the main branch keeps the original keys (AdvBN Table 1, "AdvProp + AdvBN").
    """
    kept = {k: v for k, v in initial.weights.items() if ".aux." not in f".{k}"}
    result = unwrap(model).load_state_dict(kept, strict=False)
    missing = [k for k in result.missing_keys if ".aux." not in f".{k}"]
    if missing or result.unexpected_keys:
        first = (missing or result.unexpected_keys)[:3]
        raise AdvfeatError(
            f"{method}: init_checkpoint {initial.source!r} (model {initial.config.get('model')!r}) "
            f"does not fit this model: {len(missing)} missing and {len(result.unexpected_keys)} "
            f"unexpected keys, e.g. {first}; give the checkpoint of a run with the same --model"
        )


def prefix_module_names(model: nn.Module, split: SiteSplit, x: Tensor) -> tuple[str, ...]:
    """Names of the modules of g^{1,l}: those whose forward completes before the site's does.

    Found by running the head on ``x`` once with forward hooks (no gradients, BN statistics
    frozen, flags restored). Containers of the site never complete during the head and are not
    part of the prefix; the site itself and all of its submodules are.
    """
    inner = unwrap(model)
    done: list[str] = []
    handles = []
    for name, module in inner.named_modules():
        if name:
            handles.append(module.register_forward_hook(lambda *_, n=name: done.append(n)))
    try:
        with torch.no_grad(), frozen_bn_statistics(inner):
            split.head(x)
    finally:
        for handle in handles:
            handle.remove()
    return tuple(dict.fromkeys(done))


@register_method
class AdvBN(AuxBNMethod):
    """AdvBN fine-tuning (Algorithm 1): clean features through the main BN, adversarial ones
    (PGD on per-channel mean/std multipliers) through the aux BN; the prefix stays frozen.

    Options (defaults: Sec. 5.1, ResNet-50: m = 6, τ = 0.2, ε = m·τ − 0.1):

    * ``init_checkpoint``: the pre-trained model (an ``advfeat train`` checkpoint; required).
    * ``site``: dotted module name of layer l; ``"auto"`` (default): the model's first stage
      (:func:`advfeat.sites.first_stage`: ``layer1`` of a ResNet, as the paper's conv2_3; a
      ViT's first block; a ConvNeXt's first stage).
    * ``steps`` (m), ``tau`` (τ), ``eps`` (ε; ``None`` → m·τ − 0.1), ``random_start``.
    * ``stats``: ``"batch"`` per-channel batch mean (the paper) or ``"instance"`` (per sample).
    * ``layout``: where the site's channels are (:mod:`advfeat.layouts`; ``"auto"``: the
      model's ``feature_layouts``, else inferred): one multiplier per channel of an
      (N, C, H, W), (N, H, W, C) or tokens (N, L, C) feature.
    * ``attack_bn_mode``: BN mode of the sub-network during the attack (running statistics are
      never moved by it); ``"train"``: batch statistics of the features being trained on.
    * ``prefix_bn_mode``: ``"eval"`` or ``"train"`` for the frozen prefix (see module docs).
    * ``adv_weight``: weight of the adversarial term of Eq. 3 (1 in the paper).
    * ``routing``: ``"split"`` [clean | adv] in one tail pass, ``"separate"``, or ``"auto"``
      (split on GPUs and under DDP, separate on CPUs).
    * ``eval_branch``: ``"clean"`` (main BN) or ``"adv"`` (aux BN) at test time (Appendix A.3).
    """

    name = "advbn"
    capturable_step = True  # prefix, statistics attack (its start drawn on the device) and tails
    paper = "Shu et al. 2021, Encoding Robustness to Image Style via Adversarial Feature Perturbations (NeurIPS)"

    @dataclass
    class Options:
        # Sec. 4: AdvBN fine-tunes a pre-trained model
        init_checkpoint: str | None = option(None, Text(optional=True, hint="a file path"))
        # Sec. 5.1: conv2_3, the end of the first residual stage ("auto": the first stage)
        site: str = option(AUTO_SITE, Text(hint="a dotted module name, or auto: the first stage"))
        steps: int = option(6, Integer(low=1, hint="m"))  # Sec. 5.1: m = 6
        tau: float = option(0.2, Number(low=0, low_open=True))  # Sec. 5.1: τ = 0.2
        eps: float | None = option(None, Number(low=0, optional=True))  # Sec. 5.1: ε = m·τ − 0.1
        random_start: bool = option(False, Flag())
        # Eq. 1: per-channel batch statistics
        stats: str = option("batch", Choice("batch", "instance"))
        layout: str = option(AUTO_LAYOUT, LayoutSpec())  # where the channels are
        attack_bn_mode: str = option("train", ATTACK_BN_MODE)
        prefix_bn_mode: str = option("eval", ATTACK_BN_MODE)
        adv_weight: float = option(1.0, Number(low=0))  # Eq. 3
        routing: str = option("auto", Choice(*ROUTINGS))
        # papers: BN only; per-sample norms (LayerNorm...): "separate" or "shared" affine
        aux_norm: str = option("separate", AUX_NORM_OPTION)
        eval_branch: str = MAIN  # Appendix A.3: main BN on data close to the training data

    last_multipliers: tuple[Tensor, Tensor] | None = None
    """(δ_μ, δ_σ) of the last step, each of shape (C,)."""

    @property
    def bound(self) -> float:
        """ε: the ``eps`` option, or m·τ − 0.1."""
        o = self.opts
        return float(o.eps) if o.eps is not None else advbn_eps(o.steps, o.tau)

    def validate_options(self) -> None:
        o, name = self.opts, self.name
        if o.init_checkpoint is not None and not Path(o.init_checkpoint).is_file():
            raise AdvfeatError(f"{name}: init_checkpoint {o.init_checkpoint!r} does not exist")
        if o.eps is None and self.bound <= 0:
            raise AdvfeatError(f"{name}: ε = m·τ − 0.1 = {self.bound:g} is not positive; set eps")
        super().validate_options()

    def initial_checkpoint(self) -> str | None:
        return self.opts.init_checkpoint

    def check_run(self) -> None:
        if self.opts.init_checkpoint is None:
            raise self._no_checkpoint()

    def _no_checkpoint(self) -> AdvfeatError:
        return AdvfeatError(
            f"{self.name} fine-tunes a trained model (AdvBN Sec. 4): set init_checkpoint=PATH "
            "to the checkpoint.pt of an `advfeat train` run (e.g. --set "
            "method_options.init_checkpoint=runs/standard/checkpoint.pt)"
        )

    # ------------------------------------------------------------------------------ model
    def site_of(self, model: nn.Module) -> str:
        """Layer l in ``model``: the ``site`` option, or with ``"auto"`` its first stage (refused
        for a model whose only stage is its whole feature extractor, as torchvision's
        EfficientNets and MobileNets: the first stage would be the last)."""
        if self.opts.site != AUTO_SITE:
            return str(self.opts.site)
        inner = unwrap(model)
        found = _FIRST_STAGES.get(inner)
        if found is None:
            found = first_stage(inner)
            if found is None or found == last_stage(inner):  # one stage: no early layer
                raise AdvfeatError(
                    f"{self.name}: {type(inner).__name__} has no early stage to perturb by "
                    f"default (its stages: {', '.join(stages(inner)) or 'none'}); name layer l "
                    "with --set method_options.site=NAME (a dotted module name)"
                )
            _FIRST_STAGES[inner] = found
        return found

    def prepare(self, model: nn.Module) -> nn.Module:
        """Check the site, load ``init_checkpoint``, then give every BN layer an aux branch."""
        resolve_site(model, self.site_of(model))
        initial = self.initial_weights()
        if initial is None:
            raise self._no_checkpoint()
        load_initial_weights(model, initial, method=self.name)
        return prepare_branches(model, self.branches(), method=self.name, aux_norm=self.aux_norm)

    def prefix_modules(self, model: nn.Module, split: SiteSplit, x: Tensor) -> list[nn.Module]:
        """The modules of g^{1,l} (found once per model); their parameters stop requiring grad."""
        inner = unwrap(model)
        known = _PREFIXES.setdefault(inner, {})
        if split.site not in known:
            known[split.site] = prefix_module_names(inner, split, x)
            for name in known[split.site]:
                for p in inner.get_submodule(name).parameters():
                    p.requires_grad_(False)
        return [inner.get_submodule(name) for name in known[split.site]]

    @contextmanager
    def frozen_prefix(self, modules: list[nn.Module]) -> Iterator[None]:
        """g^{1,l} in ``prefix_bn_mode`` with its BN running statistics frozen; flags restored."""
        subs = {m for module in modules for m in module.modules()}
        with restored_train_flags(subs), ExitStack() as stack:
            for m in subs:
                if self.opts.prefix_bn_mode == "eval":
                    m.training = False
                elif has_running_statistics(m):
                    stack.enter_context(frozen_bn_statistics(m))
            yield

    # ---------------------------------------------------------------------------- forward
    def forward(self, model: nn.Module, x: Tensor, y: Tensor) -> MethodOutput:  # type: ignore[override]
        o = self.opts
        net = require_branches(model, self.name)
        site = self.site_of(net)
        split = SiteSplit(net, site)
        with self.frozen_prefix(self.prefix_modules(net, split, x)):
            with torch.no_grad():
                f = split.head(x)
            if not isinstance(f, Tensor):
                raise AdvfeatError(f"{self.name}: site {site!r} must output a tensor")
            attack = BNStatsAttack(
                net, site, eps=self.bound, alpha=o.tau, steps=o.steps,
                random_start=o.random_start, stats=o.stats,  # type: ignore[arg-type]
                layout=site_layout(net, site, f, o.layout),
                bn_mode=o.attack_bn_mode, branch=ADV,  # type: ignore[arg-type]
            )  # fmt: skip
            f_adv = attack(x, y, feature=f.detach())
            self.last_multipliers = attack.last_multipliers
            logits, logits_adv = self.tails(net, split, f.detach(), f_adv, x)
        loss_clean, loss_adv = cross_entropy(logits, y), cross_entropy(logits_adv, y)
        loss = loss_clean + o.adv_weight * loss_adv
        logs = self.detach_logs(loss_clean=loss_clean, loss_adv=loss_adv)
        return MethodOutput(loss=loss, logits=logits, logs=logs)

    def tails(
        self, net: nn.Module, split: SiteSplit, f: Tensor, f_adv: Tensor, x: Tensor
    ) -> tuple[Tensor, Tensor]:
        """g^{l+1,L}: the clean feature through the main BN, the adversarial one through the aux."""
        n = f.shape[0]
        if resolve_routing(self.opts.routing, net, f) == "split":
            with split_branches(net, [(MAIN, n), (ADV, n)]):
                out = split.tail(torch.cat([f, f_adv]), x=torch.cat([x, x]))
            return out[:n], out[n:]
        with use_branch(net, MAIN):
            clean = split.tail(f, x=x)
        with use_branch(net, ADV):
            adv = split.tail(f_adv, x=x)
        return clean, adv
