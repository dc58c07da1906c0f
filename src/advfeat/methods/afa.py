"""AFA (Wang et al., "Adaptive Feature Alignment for Adversarial Training"): two training stages.

**Stage I** (Sec. 4.1, 4.3, Eq. 3, Algorithm 1). Every BN layer gets K branches
``eps0 … eps{K−1}`` for strengths ε_0 = 0 < ε_1 < … < ε_{K−1}. Per Algorithm 1 the *whole*
batch x_c feeds every branch: branch 0 its clean images, branch k ≥ 1 the PGD examples
x′_k = G(Θ, x_c, y, ε_k) generated through branch k. The loss is

    L = CE(f_0(x), y) + Σ_{k=1}^{K−1} L_adv(x, x′_k, y)                  (Eq. 3, Alg. 1)

with L_adv the adversarial term of the base method (``base``), see
:func:`~advfeat.methods.adversarial.adversarial_term`:

* ``pgd-at``: CE(f_k(x′_k), y);
* ``trades``: β · mean KL(f_ref(x) ‖ f_k(x′_k)) (TRADES' natural CE term is the clean loss);
* ``mart``: mean [BCE(f_k(x′_k), y) + λ · KL(f_ref(x) ‖ f_k(x′_k)) · (1 − p_ref,y(x))].

**Stage II** (Sec. 4.2, 4.3, Fig. 4b, Fig. 5, Eq. 1–2). The stage-I model (``stage1_checkpoint``,
an ``advfeat train`` checkpoint) keeps BN_0 and BN_{K−1} only; every BN layer becomes
x̂ = W_0·BN_0(x) + (1 − W_0)·BN_{K−1}(x) with W_0 = WG(x) from the weight generator
(:func:`advfeat.norm.to_fused_dual_bn`). Everything but the generator is frozen (weights and BN
statistics); the generator is trained with the classification loss only, on PGD examples of a
random strength per sample that the model is not told.

Readings of the paper (the other reading is an option where it is a real alternative):

* **ε grid** — not stated. K = 5 (Sec. 5.1) and the strengths reported in Tables 1–4 are
  ε ∈ {0, 1, 2, 4, 8}/255, so the default ``grid_spacing="doubling"`` gives
  ε_k = ε_max·2^{k−K+1} (K = 5: 0, 1, 2, 4, 8); ``"linear"`` gives ε_max·k/(K−1);
  ``eps_grid_255`` sets the values outright (0–255 pixel units, like the paper's tables).
* **Attack settings** — not stated. L∞ PGD, ``steps=10``, step α_k = ε_k/4 (``alpha_ratio``;
  2/255 at ε = 8/255, the PGD-AT step), start and BN mode of the base method (uniform start,
  train-mode BN for PGD-AT; 0.001·N(0, I) start, eval-mode BN for TRADES and MART). The attack
  for branch k runs through branch k. TRADES' attack maximises KL towards the clean reference.
* **Clean reference of TRADES/MART** — the text says each BN branch only sees samples of its own
  strength, but Algorithm 1 evaluates L_a(Θ, x_c, x_a, y) "with the k-th path enabled", i.e. it
  also runs x_c through BN_k. Default ``clean_reference="clean-branch"``: f_ref = f_0, the clean
  prediction through BN_0 (branch k's statistics then move only from ε_k examples);
  ``"own-branch"``: f_ref = f_k(x), the clean images also pass through BN_k (Algorithm 1
  literally). PGD-AT has no clean reference, so the option does not change it.
* **Stage-II strengths** — "samples of various attacking strengths": by default ε ~ U[0, ε_{K−1}]
  per sample (``stage2_strengths="uniform"``); ``"grid"`` draws from the stage-I grid (clean
  included). Stage-II examples are L∞ PGD on the cross-entropy of the current stage-II model
  (the evaluation attack of Tables 1–2), uniform start, BN in eval mode, α = ε/4, ``steps``
  steps. (Sec. 5.3 generates the samples of Fig. 6 with a separately trained ResNet-34; that
  transfer reading is not offered.)
* **Generator** — see :mod:`advfeat.norm.afa`: one W_0 per sample shared by all fused layers,
  computed, as §4.3 places it, at "the end of an intermediate layer": ``generator_source="auto"``
  (default) reads the end of the first stage (the module ``layer1`` of the ResNets and WRNs;
  the input images for a model without one), another module name reads that module, ``None``
  the input images. The fused BN layers that run before the generator's source use a fixed
  W_0, ``prefix_weight`` (default 0.5, an equal blend: the paper does not say).
  ``generator_per_layer`` gives one weight per fused layer. ``docs/results.md`` §6 (3 seeds)
  found no difference between the end of ``layer1`` and the input images at any ε, so the
  paper's placement is the default. The grid and attack settings above were not compared with
  alternatives.
* **Evaluating a stage-I run** — the paper reports only the final (stage-II) model. A stage-I
  run is evaluated through branch ``eval_branch`` (default 0, the clean branch BN_0, which is
  what the clean accuracy of the trainer measures; −1 selects the most robust branch BN_{K−1}).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advfeat.errors import AdvfeatError, unknown_name
from advfeat.methods.adversarial import (
    BASES,
    INIT_STD,
    PAPER_ATTACKS,
    RANDOM_STARTS,
    STEPS,
    RandomStart,
    adversarial_term,
    clean_reference_logits,
    pixel_attack,
)
from advfeat.methods.auxbn import AUX_NORM_OPTION, ROUTINGS, resolve_routing
from advfeat.methods.base import ATTACK_BN_MODES, Method, MethodOutput, unwrap
from advfeat.methods.registry import register_method
from advfeat.modes import eval_mode
from advfeat.norm import (
    BranchModel,
    BranchNorm,
    WeightGenerator,
    afa_branches,
    convert_branches,
    split_branches,
    to_fused_dual_bn,
    use_branch,
)
from advfeat.options import Choice, Flag, Integer, Number, option

__all__ = ["AFA", "strength_grid"]

GRID_SPACINGS = ("doubling", "linear")
CLEAN_REFERENCES = ("clean-branch", "own-branch")
STAGE2_STRENGTHS = ("uniform", "grid")


def strength_grid(k: int, eps_max_255: float, spacing: str = "doubling") -> tuple[float, ...]:
    """ε_0 = 0 < … < ε_{K−1} = ``eps_max_255`` in 0–255 units (K = 5, doubling: 0, 1, 2, 4, 8)."""
    if spacing == "doubling":
        return (0.0, *(eps_max_255 / 2 ** (k - 1 - i) for i in range(1, k)))
    if spacing == "linear":
        return tuple(eps_max_255 * i / (k - 1) for i in range(k))
    raise unknown_name("AFA grid_spacing", str(spacing), GRID_SPACINGS)


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


@register_method
class AFA(Method):
    """Adaptive feature alignment (Wang et al., afa.md): stage I (K BN branches) or stage II."""

    name = "afa"
    paper = "Wang et al., Adaptive Feature Alignment for Adversarial Training"
    capturable_step = True  # stage I; stage II is refused (capture_refusal)

    @dataclass
    class Options:
        stage: int = option(1, Integer(1, 2, hint="1: K BN branches, 2: weight generator"))
        # adversarial loss of stage I: pgd-at | trades | mart (Sec. 5.1)
        base: str = option("pgd-at", Choice(*BASES))
        num_branches: int = option(5, Integer(low=2, hint="K"))  # K (Sec. 5.1, Table 4)
        eps_max_255: float = 8.0  # ε_{K−1}, the largest strength of Tables 1–3
        # K = 5 → ε = 0, 1, 2, 4, 8 (/255)
        grid_spacing: str = option("doubling", Choice(*GRID_SPACINGS))
        eps_grid_255: list[float] | None = None  # explicit ε_0 = 0 < … < ε_{K−1}
        steps: int = option(10, STEPS)
        # PGD step α_k = alpha_ratio · ε_k
        alpha_ratio: float = option(0.25, Number(low=0, low_open=True))
        # None → the base's (uniform / 0.001·N(0, I))
        random_start: str | None = option(None, Choice(*RANDOM_STARTS, optional=True))
        init_std: float = option(0.001, INIT_STD)
        # None → the base's (train / eval)
        attack_bn_mode: str | None = option(None, Choice(*ATTACK_BN_MODES, optional=True))
        # TRADES β (Zhang et al. 2019, CIFAR-10), MART λ (Wang et al. 2020, WideResNet)
        trades_beta: float = option(6.0, Number(low=0))
        mart_lambda: float = option(6.0, Number(low=0))
        clean_reference: str = option("clean-branch", Choice(*CLEAN_REFERENCES))
        eval_branch: int = 0
        stage1_checkpoint: str | None = None
        stage2_strengths: str = option("uniform", Choice(*STAGE2_STRENGTHS))
        generator_source: str | None = "auto"  # §4.3: the end of an intermediate layer
        generator_per_layer: bool = option(False, Flag())
        generator_channels: int = option(64, Integer(low=1))
        prefix_weight: float | None = option(
            None,
            Number(
                low=0, high=1, optional=True,
                hint="the fixed W_0 of BN layers that run before generator_source",
            ),
        )  # fmt: skip
        """None: 0.5 where the generator reads an intermediate module."""
        # stage I: one split pass over the K−1 strengths, or one per branch
        routing: str = option("auto", Choice(*ROUTINGS))
        # papers: BN only; per-sample norms (LayerNorm...): "separate" or "shared" affine
        aux_norm: str = option("separate", AUX_NORM_OPTION)

    # ------------------------------------------------------------------------------ options
    def validate_options(self) -> None:
        o, k = self.opts, self.opts.num_branches
        self.grid_255 = self._resolve_grid()
        self._grids: dict[tuple[torch.device, torch.dtype], Tensor] = {}  # strength_grid's
        eb = o.eval_branch
        if isinstance(eb, bool) or not isinstance(eb, int) or not -k <= eb < k:
            raise AdvfeatError(
                f"afa: eval_branch must be a branch index in [{-k}, {k - 1}] (0 = clean BN_0, "
                f"-1 = BN_K-1), got {eb!r}"
            )
        self._validate_checkpoint_option()

    def _resolve_grid(self) -> tuple[float, ...]:
        o = self.opts
        k = o.num_branches
        if o.eps_grid_255 is None:
            if not _number(o.eps_max_255) or not 0 < o.eps_max_255 <= 255:
                raise AdvfeatError(
                    f"afa: eps_max_255 must be in (0, 255] (pixel levels), got {o.eps_max_255!r}"
                )
            return strength_grid(k, float(o.eps_max_255), o.grid_spacing)
        grid = o.eps_grid_255
        if not isinstance(grid, list | tuple) or not all(_number(v) for v in grid):
            raise AdvfeatError(
                f"afa: eps_grid_255 must be a list of numbers (0-255 pixel levels), got {grid!r}"
            )
        values = tuple(float(v) for v in grid)
        if len(values) != k:
            raise AdvfeatError(
                f"afa: eps_grid_255 has {len(values)} strengths but num_branches is {k}; give one "
                "strength per BN branch"
            )
        if values[0] != 0 or any(b <= a for a, b in itertools.pairwise(values)):
            raise AdvfeatError(
                f"afa: eps_grid_255 must start at 0 (the clean branch) and increase strictly, "
                f"got {list(values)}"
            )
        if values[-1] > 255:
            raise AdvfeatError(f"afa: eps_grid_255 values are pixel levels <= 255, got {values}")
        return values

    def _validate_checkpoint_option(self) -> None:
        o = self.opts
        path = o.stage1_checkpoint
        if o.stage == 1:
            if path is not None:
                raise AdvfeatError(
                    "afa: stage1_checkpoint is read in stage 2 only; set stage=2 to train the "
                    "weight generator on a stage-I model"
                )
            return
        if not path:
            raise AdvfeatError(
                "afa: stage 2 needs stage1_checkpoint=PATH, the checkpoint.pt of a finished "
                "`advfeat train --method afa` stage-1 run (e.g. --set "
                "method_options.stage1_checkpoint=runs/afa-stage1/checkpoint.pt)"
            )
        if not Path(path).is_file():
            raise AdvfeatError(
                f"afa: stage1_checkpoint {str(path)!r} does not exist (a relative path is read "
                "from the current directory)"
            )

    @property
    def branches(self) -> tuple[str, ...]:
        return afa_branches(self.opts.num_branches)

    # ------------------------------------------------------------------------------ model
    def prepare(self, model: nn.Module) -> nn.Module:
        """Stage I: K branches of every norm layer (BN; LayerNorm, GroupNorm, RMSNorm too, read
        by ``aux_norm``). Stage II: the stage-I model fused, frozen, with its generator."""
        convert_branches(model, self.branches, aux_norm=self.opts.aux_norm)
        if self.opts.stage == 1:
            return model
        self._load_stage1(model)
        o = self.opts
        fused_layers = sum(1 for m in model.modules() if isinstance(m, BranchNorm))
        source = self.generator_source(model)
        generator = WeightGenerator(
            self._generator_in_channels(model, source),
            fused_layers if o.generator_per_layer else 1,
            channels=o.generator_channels,
            hidden=o.generator_channels,
        )
        return to_fused_dual_bn(
            model,
            generator,
            self.branches[0],
            self.branches[-1],
            source=source,
            per_layer=o.generator_per_layer,
            prefix_weight=o.prefix_weight if source is None or o.prefix_weight is not None else 0.5,
        )

    def generator_source(self, model: nn.Module) -> str | None:
        """The module whose output the generator reads (``None``: the input images);
        ``"auto"``: ``layer1``, the end of the first stage, where the model has one."""
        source = self.opts.generator_source
        if source != "auto":
            return source
        return "layer1" if "layer1" in dict(model.named_modules()) else None

    def initial_checkpoint(self) -> str | None:
        return self.opts.stage1_checkpoint if self.opts.stage == 2 else None

    def _load_stage1(self, model: nn.Module) -> None:
        initial = self.initial_weights()
        if initial is None:  # validate_options requires stage1_checkpoint in stage 2
            raise AdvfeatError("afa: stage 2 needs the weights of a stage-1 run")
        path, config = initial.source, initial.config
        if config.get("method") != "afa":
            raise AdvfeatError(
                f"afa: stage1_checkpoint {path!r} was trained with method "
                f"{config.get('method')!r}; stage 2 needs an afa stage-1 checkpoint"
            )
        saved_options = dict(config.get("method_options") or {})
        saved = AFA.parse_options(saved_options)
        if saved.stage != 1:
            raise AdvfeatError(
                f"afa: stage1_checkpoint {path!r} is a stage-{saved.stage} run; give the "
                "checkpoint of the stage-1 run"
            )
        saved_grid = AFA(**{**saved_options, "stage1_checkpoint": None}).grid_255
        if saved.num_branches != self.opts.num_branches or not all(
            math.isclose(a, b) for a, b in zip(saved_grid, self.grid_255, strict=False)
        ):
            raise AdvfeatError(
                f"afa: stage1_checkpoint {path!r} has K={saved.num_branches} branches for "
                f"ε={list(saved_grid)} /255, this run asks for K={self.opts.num_branches}, "
                f"ε={list(self.grid_255)} /255; pass the stage-1 run's num_branches / grid options"
            )
        try:
            model.load_state_dict(initial.weights)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0][:200] if str(err).strip() else repr(err)
            raise AdvfeatError(
                f"afa: stage1_checkpoint {path!r} (model {config.get('model')!r}, "
                f"K={saved.num_branches}) does not fit this run's model: {first}"
            ) from None

    def _generator_in_channels(self, model: nn.Module, source: str | None) -> int:
        if source is None:
            return 3
        names = dict(model.named_modules())
        if source not in names or not source:
            raise unknown_name("afa generator_source module", str(source), [n for n in names if n])
        seen: list[int] = []

        def tap(_module: nn.Module, _args: Any, output: Any) -> None:
            if isinstance(output, Tensor) and output.dim() == 4 and not seen:
                seen.append(output.shape[1])

        shape = self.context.input_shape
        if shape is None:
            raise AdvfeatError(
                f"afa: generator_source {source!r} is sized by running the model once; prepare "
                "it with method.prepare_with(model, PrepareContext(input_shape=(C, H, W)))"
            )
        handle = names[source].register_forward_hook(tap)
        like = next(itertools.chain(model.parameters(), model.buffers()), None)
        device = like.device if like is not None else torch.device("cpu")
        dtype = like.dtype if like is not None and like.is_floating_point() else torch.float32
        try:
            with eval_mode(model), torch.no_grad():  # a probe input on the model's device
                model(torch.zeros(2, *shape, device=device, dtype=dtype))
        finally:
            handle.remove()
        if not seen:
            raise AdvfeatError(
                f"afa: generator_source {source!r} must output a feature map (N, C, H, W)"
            )
        return seen[0]

    def eval_model(self, model: nn.Module) -> nn.Module:
        if self.opts.stage == 2:
            return model
        return BranchModel(model, self.branches[self.opts.eval_branch])

    # ------------------------------------------------------------------------------ training
    def forward(self, model: nn.Module, x: Tensor, y: Tensor) -> MethodOutput:  # type: ignore[override]
        if self.opts.stage == 1:
            return self._stage1(model, x, y)
        return self._stage2(model, x, y)

    def _attack_settings(self) -> tuple[RandomStart, Literal["train", "eval"]]:
        """Random start and BN mode of the stage-I attack: the options, else the base's."""
        paper = PAPER_ATTACKS[self.opts.base]
        start = cast(RandomStart, self.opts.random_start or paper.random_start)
        bn_mode = cast(Literal["train", "eval"], self.opts.attack_bn_mode or paper.bn_mode)
        return start, bn_mode

    def _stage1(self, model: nn.Module, x: Tensor, y: Tensor) -> MethodOutput:
        o = self.opts
        net = unwrap(model)
        names = self.branches
        batch, reps = x.shape[0], len(names) - 1
        route = [(name, batch) for name in names[1:]]
        start, bn_mode = self._attack_settings()
        paper = PAPER_ATTACKS[o.base]
        own_reference = o.clean_reference == "own-branch" and o.base != "pgd-at"
        x_rep, y_rep = x.repeat(reps, *([1] * (x.dim() - 1))), y.repeat(reps)
        eps = self.strength_grid(x)[1:].repeat_interleave(batch)

        routing = resolve_routing(o.routing, model, x)

        def per_branch(fn: Callable[..., Tensor], *chunked: Tensor | None) -> Tensor:
            """``fn`` on the K−1 repeated copies, each through its own BN branch: one split
            pass (``routing="split"``) or one pass per branch (``"separate"``; faster on CPUs).
            ``chunked`` arguments are split per branch alongside the images."""
            if routing == "split":
                with split_branches(net, route):
                    return fn(None, *chunked)
            outs = []
            for i, (name, _) in enumerate(route):
                part = [c if c is None else c[i * batch : (i + 1) * batch] for c in chunked]
                with use_branch(net, name):
                    outs.append(fn(name, *part))
            return torch.cat(outs)

        def attack(
            branch: str | None, x_k: Tensor, y_k: Tensor, eps_k: Tensor, t: Tensor | None
        ) -> Tensor:
            return pixel_attack(
                net,
                x_k,
                y_k,
                eps=eps_k,
                alpha=o.alpha_ratio * eps_k,
                steps=o.steps,
                loss=paper.loss,
                clean_logits=t,
                random_start=start,
                init_std=o.init_std,
                bn_mode=bn_mode,
                branch=branch,
            )

        def forward(_branch: str | None, images: Tensor) -> Tensor:
            return cast(Tensor, model(images))

        def reference(_branch: str | None, images: Tensor) -> Tensor:
            return clean_reference_logits(net, images, bn_mode="eval")

        logits_clean: Tensor | None = None
        logits_ref: Tensor | None = None  # f_ref(x) of the loss when it is f_k(x) ("own-branch")
        target: Tensor | None = None  # f_ref(x) as the KL attack of TRADES sees it (detached)
        if paper.loss == "kl" and bn_mode == "train":  # the training forward gives these values
            if own_reference:
                logits_ref = per_branch(forward, x_rep)
                target = logits_ref.detach()
            else:
                with use_branch(net, names[0]):
                    logits_clean = model(x)
                target = logits_clean.detach().repeat(reps, 1)
        elif paper.loss == "kl" and own_reference:
            target = per_branch(reference, x_rep)
        elif paper.loss == "kl":
            ref = clean_reference_logits(net, x, bn_mode="eval", branch=names[0])
            target = ref.repeat(reps, 1)
        x_adv = per_branch(attack, x_rep, y_rep, eps, target)
        if logits_clean is None:
            with use_branch(net, names[0]):
                logits_clean = model(x)
        logits_adv = per_branch(forward, x_adv)
        if not own_reference:
            logits_ref = logits_clean.repeat(reps, 1)
        elif logits_ref is None:
            logits_ref = per_branch(forward, x_rep)

        loss_clean = F.cross_entropy(logits_clean, y)
        weight = o.trades_beta if o.base == "trades" else o.mart_lambda
        terms = [
            adversarial_term(o.base, ref_k, adv_k, y, weight=weight)
            for ref_k, adv_k in zip(logits_ref.split(batch), logits_adv.split(batch), strict=True)
        ]
        loss_adv = torch.stack(terms).sum()
        logs = self.detach_logs(
            loss_clean=loss_clean,
            loss_adv=loss_adv,
            **{f"loss_adv_{name}": term for name, term in zip(names[1:], terms, strict=True)},
        )
        return MethodOutput(loss=loss_clean + loss_adv, logits=logits_clean, logs=logs)

    def capture_refusal(self) -> str | None:
        if self.opts.stage == 2:
            return "AFA stage II attacks the samples drawn with ε > 0: a batch of varying size"
        return super().capture_refusal()

    def strength_grid(self, like: Tensor) -> Tensor:
        """The strengths ε_0 … ε_{K−1} in [0, 1] units, on ``like``'s device and dtype, made once
        (not from Python numbers at every step, which a captured step could not do)."""
        key = (like.device, like.dtype)
        grid = self._grids.get(key)
        if grid is None:
            grid = torch.tensor(self.grid_255, dtype=like.dtype, device=like.device) / 255
            self._grids[key] = grid
        return grid

    def _stage2_strengths(self, batch: int, like: Tensor) -> Tensor:
        """Per-sample strengths in [0, 1] units, unknown to the model (Sec. 4.3, stage II)."""
        grid = self.strength_grid(like)
        if self.opts.stage2_strengths == "grid":
            return grid[torch.randint(len(grid), (batch,), device=like.device)]
        return torch.rand(batch, dtype=like.dtype, device=like.device) * grid[-1]

    def _stage2(self, model: nn.Module, x: Tensor, y: Tensor) -> MethodOutput:
        o = self.opts
        net = unwrap(model)
        eps = self._stage2_strengths(x.shape[0], x)
        attacked = (eps > 0).nonzero().squeeze(1)
        x_adv = x
        if attacked.numel():
            chosen = eps[attacked]
            adv = pixel_attack(
                net,
                x[attacked],
                y[attacked],
                eps=chosen,
                alpha=o.alpha_ratio * chosen,
                steps=o.steps,
                loss="ce",
                random_start="uniform",
                bn_mode="eval",
            )
            x_adv = x.index_copy(0, attacked, adv)
        logits = model(x_adv)
        loss = F.cross_entropy(logits, y)
        values: dict[str, Tensor | float] = {"loss_adv": loss, "eps_mean_255": eps.mean() * 255}
        w0 = getattr(net, "last_weight", None)
        if isinstance(w0, Tensor):
            values["w0_mean"] = w0.float().mean()
        return MethodOutput(loss=loss, logits=logits, logs=self.detach_logs(**values))
