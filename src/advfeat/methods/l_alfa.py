"""L-ALFA: learnable adversarial feature augmentation (Qin et al., "ALFA: Adversarial Feature
Augmentation for Enhanced Image Recognition", §3.3, Eq. 5, Algorithm 1).

Objective (Eq. 5)::

    min_{Θ, η ∈ P}  L_std + λ · Σ_{i=1..r} max_{δ_i} L_at(tail_i(f_i(x) + η_i·δ_i), y) + γ·‖η‖₁

with learnable strengths η, one per site, projected onto P after every SGD step (Algorithm 1,
line 5). The paper writes P = {η | 1ᵀη = 1}: by default η is projected onto that hyperplane as
written (η shifted to sum to one, negative entries kept: also what the authors' released code
does). It projects "via the bisection method" of Wang et al. (2019b), a method for the
probability simplex {η ≥ 0, 1ᵀη = 1}: ``projection="simplex"`` is that other reading
(:func:`project_simplex`, sort-based, same point as bisection).

Note on γ: on the simplex ‖η‖₁ = 1ᵀη = 1, so γ‖η‖₁ adds a constant to the loss. Its gradient
must then be γ·1, which is normal to the simplex: the projection removes it and γ does not change
the iterates; sparsity of η comes from the projection, which sets coordinates to exactly zero.
(Differentiating ``|η|`` instead gives the subgradient 0 at the coordinates that are exactly 0,
so SGD-then-project would *raise* them: γ would make η denser, against Eq. 5's purpose.) Under
``projection="simplex"`` the term is therefore computed as ``1ᵀη`` (equal to ‖η‖₁ on the set).
On the hyperplane ‖η‖₁ is not constant: γ‖η‖₁ pulls negative strengths back towards zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from advfeat.errors import AdvfeatError
from advfeat.methods.base import unwrap
from advfeat.methods.feature_aug import (
    MULTI_SITE,
    FeatureAugmentation,
    FeatureAugOptions,
    spread_blocks,
)
from advfeat.methods.registry import register_method
from advfeat.options import Choice, option
from advfeat.tasks.base import TaskPass

__all__ = ["LALFA", "project_simplex"]

PROJECTIONS = ("simplex", "hyperplane")


def _positive(name: str, value: Any, *, allow_zero: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        need = ">= 0" if allow_zero else "> 0"
        raise AdvfeatError(f"{name} must be a number {need}, got {value!r}")


def project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of ``v`` (last dimension) onto ``{η : η ≥ 0, 1ᵀη = 1}``.

    L-ALFA projects its strengths η after every SGD step (ALFA Algorithm 1, line 5). The paper
    finds the threshold τ of ``η = max(v − τ, 0)`` by bisection (Wang et al. 2019b); here τ is
    computed exactly by sorting (Held et al. 1974; Duchi et al. 2008), which gives the same
    point: the projection is unique. (The authors' released code only shifts η so that it sums
    to one and never clips negative entries.)
    """
    if v.ndim == 0 or v.shape[-1] == 0:
        raise AdvfeatError(f"cannot project a tensor of shape {tuple(v.shape)} onto a simplex")
    u, _ = torch.sort(v, dim=-1, descending=True)
    cumulative = u.cumsum(dim=-1) - 1
    ks = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    support = (u - cumulative / ks) > 0
    # the largest k with u_k > (Σ_{j≤k} u_j − 1) / k; k = 1 always qualifies
    rho = (support * ks).argmax(dim=-1, keepdim=True)
    tau = cumulative.gather(-1, rho) / (rho + 1).to(v.dtype)
    return (v - tau).clamp_min(0)


@register_method
class LALFA(FeatureAugmentation):
    """L-ALFA (Eq. 5, Algorithm 1): ALFA at r sites with learnable strengths η on the simplex.

    Options (defaults: ALFA's CIFAR attack of Table 2 and γ of Table 10; the paper reports no
    separate attack setting for L-ALFA):

    * ``sites``: the r perturbed sites; ``None`` is ``num_sites`` blocks spread over the stages
      (:func:`spread_blocks`, the last of each group: all 9 blocks of ResNet-20, every third
      block of ResNet-56, "after each skip connection"), the dim(η) = 9 of Tables 8-9;
      ``num_sites: null`` takes every block. A model that declares its sites
      (``feature_sites``, :func:`advfeat.sites.declared_sites`) gives all of them.
    * ``alpha``, ``steps``: PGD step size and steps (ε unbounded), δ_i ascended on
      ``L(f_i + η_i·δ_i)`` at the current η (Algorithm 1, line 3).
    * ``lam`` (λ), ``gamma`` (γ, Table 10: 1.0 best, "chosen from {0.5, 1.0, 2.0}").
    * ``eta_init``: η_0 = (1, …, 1) (Algorithm 1, line 1); the first step uses it as is.
    * ``eta_lr_scale``, ``eta_weight_decay``: η is optimised by the same SGD as the network
      (Algorithm 1, line 4; the paper gives no separate learning rate) in its own parameter group,
      whose lr is the network's times ``eta_lr_scale`` and whose weight decay is 0 by default (the
      only regulariser of η in Eq. 5 is γ‖η‖₁).
    * ``eta_momentum``: ``None`` (default) gives η the network's SGD momentum (§4.1: 0.9); a
      number sets η's own, ``0`` being Algorithm 1's plain projected SGD step. The paper does not
      say which. Measured (``docs/results.md`` §4, 3 seeds): without momentum η stays dense,
      with it η concentrates on 2-3 sites (rarely exactly zero); accuracy does not separate
      them. Needs ``optimizer=sgd`` (AdamW has no momentum to set; it is refused there).
    * ``multi_site``: ``"joint"`` (default, Algorithm 1 line 3: *one* PGD generates the tuple
      δ = (δ¹…δʳ), one adversarial pass with all sites perturbed) or ``"separate"`` (Eq. 5 term
      by term: r attacks and r adversarial tail passes, r times the cost).
    * ``loss_weighting``, ``adv_grad``: as ALFA (default ``"sum"``, Eq. 5 as written: at the
      papers' learning rate per batch size the convex combination is not ahead of it,
      ``docs/results.md`` §10 and §13). Sites
      whose η is exactly 0 are skipped with the same loss and gradients
      (:meth:`FeatureAugmentation.site_losses`).
    * ``projection``: ``"hyperplane"`` (default: onto {1ᵀη = 1}, Eq. 5's P as written; η may
      turn negative) or ``"simplex"`` (the Euclidean projection onto {η ≥ 0, 1ᵀη = 1}, the
      reading of "bisection"). ``docs/results.md`` §4: accuracy does not separate them, and the
      simplex's sparsity appears only with η momentum, which Algorithm 1 does not specify; with
      no measurement against it, the paper's written set is the default.
    * ``random_noise``, ``noise_std``, ``attack_bn_mode``, ``adv_bn_stats``: as in ALFA.

    The projection. The trainer (and a user's loop) call ``loss.backward(); optimizer.step()``
    without the method seeing the optimizer, so η is projected at the start of the next forward
    whenever it changed since the last projection, and in :meth:`on_epoch_end` (before the
    checkpoint is written) — the same iterates as projecting right after each step. Call
    :meth:`project_strengths_` to project explicitly. ``on_epoch_end`` also returns η as
    ``{"eta_<site>": value}`` so that its trajectory lands in the training history (Fig. 4).
    """

    name = "l-alfa"
    paper = "Qin et al., ALFA: Adversarial Feature Augmentation for Enhanced Image Recognition"

    eta: nn.Parameter | None
    eta_seen: Tensor | None

    tasks = ("classification",)
    capturable_step = False  # η is projected when it changed: a per-step decision on the host

    @dataclass
    class Options(FeatureAugOptions):
        # the shared fields' defaults are ALFA's Table 2 attack (PGD-5, α = 0.5/255, ε
        # unbounded), λ = 1 and Eq. 5's sum and gradient path (docs/results.md §10)
        num_sites: int | None = 9  # Tables 8-9 (sites None: dim η = 9); null: every block
        gamma: float = 1.0  # Table 10 (CIFAR-100, ResNet-56s)
        eta_init: float = 1.0  # Algorithm 1: η_0 = (1, ..., 1)
        eta_lr_scale: float = 1.0
        eta_weight_decay: float = 0.0
        eta_momentum: float | None = None  # None: the network's momentum
        # Algorithm 1, line 3: one PGD for the tuple δ
        multi_site: str = option("joint", MULTI_SITE)
        # Alg. 1 line 5, Eq. 5: P = {1ᵀη = 1} as written; "simplex": the bisection reading
        projection: str = option("hyperplane", Choice(*PROJECTIONS))

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.register_parameter("eta", None)
        self.register_buffer("eta_seen", None, persistent=False)
        self.eta_sites: list[str] | None = None
        requested = self.requested_sites()
        if requested is not None:
            self._create_eta(requested, torch.device("cpu"))

    def validate_options(self) -> None:
        opts = self.opts
        _positive("gamma", opts.gamma, allow_zero=True)
        _positive("eta_init", opts.eta_init)
        _positive("eta_lr_scale", opts.eta_lr_scale)
        _positive("eta_weight_decay", opts.eta_weight_decay, allow_zero=True)
        if opts.eta_momentum is not None:
            _positive("eta_momentum", opts.eta_momentum, allow_zero=True)
        n = opts.num_sites
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise AdvfeatError(
                f"num_sites must be an integer >= 1 or null (every block), got {n!r}"
            )
        super().validate_options()

    # ------------------------------------------------------------------------------ sites
    def default_sites(self, model: nn.Module) -> list[str]:
        """``num_sites`` blocks spread over the stages (:func:`spread_blocks`), or every block."""
        n = self.opts.num_sites
        return spread_blocks(model, n if n is not None else 10**9)

    # -------------------------------------------------------------------------------- η
    def _create_eta(self, sites: list[str], device: torch.device) -> None:
        eta = torch.full((len(sites),), float(self.opts.eta_init), device=device)
        self.eta = nn.Parameter(eta)
        self.eta_seen = eta.detach().clone()
        self.eta_sites = list(sites)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            world = dist.get_world_size()

            def average(grad: Tensor) -> Tensor:  # η is not inside the DDP wrapper
                grad = grad.clone()
                dist.all_reduce(grad)
                return grad / world

            self.eta.register_hook(average)

    def _ensure_eta(self, model: nn.Module) -> nn.Parameter:
        """Create η for ``model``'s sites (default rule) or check the given sites exist in it."""
        inner = unwrap(model)
        sites = self.resolve_sites(inner)  # validates the names against the model
        if self.eta is None or self.eta_sites is None:
            device = next(inner.parameters(), torch.empty(0)).device
            self._create_eta(self.default_sites(inner), device)
        elif set(sites) != set(self.eta_sites):
            raise AdvfeatError(
                f"this L-ALFA instance learns strengths for sites {self.eta_sites}, but the "
                f"model's sites are {sites}; build a new method for this model"
            )
        eta: nn.Parameter = self.eta  # type: ignore[assignment]
        return eta

    def prepare(self, model: nn.Module) -> nn.Module:
        """Create the strengths η (one per site of ``model``)."""
        self._ensure_eta(model)
        return model

    def parameter_groups(self, model: nn.Module, **group: Any) -> list[dict[str, Any]]:
        """The model's parameters, and η in its own group (lr × ``eta_lr_scale``, own decay)."""
        eta = self._ensure_eta(model)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise AdvfeatError(f"method {self.name!r} left no trainable parameter in the model")
        eta_group: dict[str, Any] = {
            **group,
            "params": [eta],
            "weight_decay": self.opts.eta_weight_decay,
            "lr_scale": self.opts.eta_lr_scale,
        }
        if "lr" in group:
            eta_group["lr"] = group["lr"] * self.opts.eta_lr_scale
        if self.opts.eta_momentum is not None:
            eta_group["momentum"] = self.opts.eta_momentum
        return [{"params": params, **group}, eta_group]

    @torch.no_grad()
    def project_strengths_(self) -> None:
        """Project η onto P if it changed since the last projection (Alg. 1, line 5)."""
        if self.eta is None or self.eta_seen is None:
            return
        if self.eta_seen.shape == self.eta.shape and torch.equal(self.eta_seen, self.eta):
            return
        if self.opts.projection == "simplex":
            self.eta.copy_(project_simplex(self.eta))
        else:
            self.eta.sub_((self.eta.sum() - 1) / self.eta.numel())
        self.eta_seen = self.eta.detach().clone()

    @property
    def strengths(self) -> dict[str, float]:
        """The current η per site (after projection)."""
        self.project_strengths_()
        if self.eta is None or self.eta_sites is None:
            return {}
        return {s: float(v) for s, v in zip(self.eta_sites, self.eta.detach(), strict=True)}

    # -------------------------------------------------------------------------- training
    def training_sites(self, model: nn.Module) -> list[str]:
        """The sites η is learned for, after projecting η (Algorithm 1, line 5)."""
        if self.eta is None or self.eta_sites is None:
            raise AdvfeatError(
                "L-ALFA's strengths η depend on the model's sites and do not exist yet: call "
                "method.prepare(model) or method.parameter_groups(model) before training, so "
                "that the optimizer updates η"
            )
        self._ensure_eta(model)
        self.project_strengths_()
        return self.eta_sites

    def adversarial_losses(
        self, model: nn.Module, clean: TaskPass, x: Any, y: Any, sites: list[str]
    ) -> tuple[list[Tensor], Tensor]:
        """``L(tail(f_i + η_i·δ_i))`` at the current η (Eq. 5), jointly or site by site."""
        return self.site_losses(model, clean, x, y, sites, strengths=self.eta)

    def penalties(self) -> dict[str, tuple[float, Tensor]]:
        """γ‖η‖₁ (Eq. 5); on the simplex it is computed as 1ᵀη, whose gradient the projection
        removes (module doc)."""
        eta: Tensor = self.eta  # type: ignore[assignment]
        loss_l1 = eta.sum() if self.opts.projection == "simplex" else eta.abs().sum()
        return {"loss_l1": (self.opts.gamma, loss_l1)}

    def on_epoch_end(self, model: nn.Module, epoch: int) -> dict[str, float]:
        """Project η and report it: ``{"eta_<site>": value}`` (its trajectory, Fig. 4)."""
        return {f"eta_{site}": value for site, value in self.strengths.items()}
