"""``advbn``: train AdvBN's decoder on the evaluated model's features at a site, render what
AdvBN perturbations look like, and write the "-AdvBN" shifted test set (AdvBN §3, App. B).

See :mod:`advfeat.eval.advbn_decoder`. The evaluated model is the *source* (encoder + the
classifier that gives AdvBN its loss). The suite

1. trains a decoder for ``advbn_decoder_epochs`` on (a seeded subset of ``advbn_train_images``)
   training images, and measures its reconstruction error on held-out test images;
2. decodes, for a few test images, the clean features and AdvBN features at each strength of
   ``advbn_show_eps`` (the plot ``advbn_images.png``);
3. passes the test set (``max_images``) through encoder → AdvBN (``advbn_eps``, ``advbn_alpha``,
   ``advbn_steps``, batches of ``advbn_batch_size``; App. B: 1.1, 0.2, 6, 32) → decoder, and
   through encoder → decoder without perturbation, and writes both as image folders
   ``<advbn_dir>/advbn/<class>/*.png`` and ``<advbn_dir>/reconstructed/<class>/*.png`` (8-bit
   PNG), with ``decoder.pt``. ``advbn_dir`` defaults to ``<out stem>_advbn`` beside the JSON.

Any model is then scored on them like on any shifted domain::

    advfeat eval --checkpoint other/checkpoint.pt --suite shift \\
        --domain advbn=DIR/advbn --domain reconstructed=DIR/reconstructed
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from advfeat.checkpoint import save_checkpoint
from advfeat.eval.advbn_decoder import (
    advbn_images,
    reconstruction_error,
    train_decoder,
    write_image_folder,
)
from advfeat.eval.analysis_plots import plot_advbn
from advfeat.eval.config import POSITIVE
from advfeat.eval.context import EvalContext, seeded_subset
from advfeat.eval.report import md_table, pct
from advfeat.eval.suites.features import default_site
from advfeat.eval.suites.registry import options_of, register_suite, skipped
from advfeat.options import Each, Integer, Number, Text, option

__all__ = ["run"]


@dataclass
class AdvbnOptions:
    """Settings of the ``advbn`` suite: the decoder and the "-AdvBN" test set (AdvBN §3,
    App. B)."""

    site: str | None = option(None, Text(optional=True))
    """Encoder = the model up to this site (default: the first stage, as ``features``)."""
    dir: str | None = option(None, Text(optional=True))
    """Where the decoder and the image folders go (default: ``<out stem>_advbn``)."""
    train_images: int | None = option(2048, Integer(low=1, optional=True))
    decoder_epochs: int = option(10, Integer(low=1))
    decoder_batch_size: int = option(64, Integer(low=1))
    decoder_lr: float = option(1e-3, POSITIVE)
    eps: float = option(1.1, Number(low=0))
    alpha: float = option(0.2, POSITIVE)
    steps: int = option(6, Integer(low=0))
    batch_size: int = option(32, Integer(low=1))
    show_images: int = option(6, Integer(low=1))
    show_eps: tuple[float, ...] = (0.3, 0.6, 1.1)
    """The budgets of the example images (one number or a list)."""

    def validate(self, task: str) -> None:
        if isinstance(self.show_eps, (int, float)):
            self.show_eps = (float(self.show_eps),)
        self.show_eps = Each(Number(low=0))("advbn", "show_eps", self.show_eps)


def _folder(ctx: EvalContext) -> Path | None:
    folder = options_of(ctx.config, "advbn").dir
    if folder:
        return Path(folder)
    partial = ctx.store.path
    if partial is None:
        return None
    out = partial.with_name(partial.name.removesuffix(".partial"))
    return out.with_name(out.stem + "_advbn")


def _pixels(t: torch.Tensor) -> list[Any]:
    return [[[round(float(v), 3) for v in px] for px in row] for row in t.cpu().permute(1, 2, 0)]


def _quantized(t: torch.Tensor) -> torch.Tensor:
    """What an 8-bit PNG of ``t`` reads back as."""
    return (t.clamp(0, 1) * 255).round() / 255


@register_suite(
    "advbn",
    "AdvBN decoder: visualised feature-statistics shifts, -AdvBN test set",
    order=90,
    title="AdvBN decoder and -AdvBN test set (AdvBN §3, App. B)",
    report=lambda result, _task: _advbn(result),
    plots={"advbn_images": plot_advbn},
    options=AdvbnOptions,
    aliases={f"advbn_{f}": f for f in AdvbnOptions.__dataclass_fields__},
)
def run(ctx: EvalContext) -> dict[str, Any]:
    cfg = ctx.config
    opts: AdvbnOptions = options_of(cfg, "advbn")
    model = ctx.model
    site = opts.site or default_site(model)
    if site is None:
        return skipped("no feature site found; set advbn_site (e.g. layer1)")
    train = ctx.data.train if ctx.data.train is not None else None
    if train is None:
        return skipped("the decoder is trained on the training images, and none were given")
    folder = _folder(ctx)
    names = ctx.data.class_names or [str(i) for i in range(ctx.data.num_classes)]

    def compute() -> dict[str, Any]:
        subset = seeded_subset(train, opts.train_images, cfg.seed)
        bar = ctx.bar(opts.decoder_epochs, "advbn decoder")

        def tick(epoch: int, loss: float) -> None:
            bar.update(1)
            bar.set_postfix_str(f"mse {loss:.4f}")

        try:
            decoder, losses = train_decoder(
                model,
                site,
                subset,
                epochs=opts.decoder_epochs,
                batch_size=opts.decoder_batch_size,
                lr=opts.decoder_lr,
                seed=ctx.seed_for("advbn/decoder"),
                device=ctx.device,
                progress=tick,
            )
        finally:
            bar.close()
        test = ctx.test_set()
        held_out = reconstruction_error(model, site, decoder, test, device=ctx.device)
        # the pictures: a few test images at every strength of advbn_show_eps
        show = seeded_subset(ctx.data.test, opts.show_images, cfg.seed + 1)
        xs, ys = next(ctx.batches(show, batch_size=opts.show_images))
        columns: dict[str, Any] = {"original": xs}
        for eps in opts.show_eps:
            recon, adv = advbn_images(
                model, site, decoder, xs, ys, eps=eps, alpha=opts.alpha,
                steps=opts.steps, seed=ctx.seed_for(f"advbn/show/{eps:g}"),
            )  # fmt: skip
            columns.setdefault("reconstructed", recon)
            columns[f"AdvBN ε={eps:g}"] = adv
        # the shifted test set
        hits = {"original": 0, "reconstructed": 0, "advbn": 0}
        change = {"advbn_vs_original": 0.0, "advbn_vs_reconstructed": 0.0,
                  "reconstructed_vs_original": 0.0}  # fmt: skip
        lo, hi, n, start = 1.0, 0.0, 0, 0
        for b, (x, y) in enumerate(ctx.batches(test, batch_size=opts.batch_size)):
            recon, adv = advbn_images(
                model, site, decoder, x, y, eps=opts.eps, alpha=opts.alpha,
                steps=opts.steps, seed=ctx.seed_for(f"advbn/test/{b}"),
            )  # fmt: skip
            recon, adv = _quantized(recon), _quantized(adv)
            with torch.no_grad():
                for key, images in (("original", x), ("reconstructed", recon), ("advbn", adv)):
                    hits[key] += int((model(images).argmax(1) == y).sum())
            change["advbn_vs_original"] += float((adv - x).abs().mean(dim=(1, 2, 3)).sum())
            change["advbn_vs_reconstructed"] += float((adv - recon).abs().mean(dim=(1, 2, 3)).sum())
            change["reconstructed_vs_original"] += float(
                (recon - x).abs().mean(dim=(1, 2, 3)).sum()
            )
            lo, hi = min(lo, float(adv.min())), max(hi, float(adv.max()))
            if folder is not None:
                labels = [int(v) for v in y]
                write_image_folder(folder / "advbn", adv, labels, names, start)
                write_image_folder(folder / "reconstructed", recon, labels, names, start)
            n += int(y.shape[0])
            start += int(y.shape[0])
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            save_checkpoint(
                folder / "decoder.pt",
                {"decoder": decoder.state_dict(), "config": decoder.config(), "site": site},
            )
        return {
            "site": site,
            "decoder": {
                **decoder.config(),
                "epochs": opts.decoder_epochs,
                "train_images": len(subset),  # type: ignore[arg-type]
                "train_mse": losses,
                "held_out": held_out,
            },
            "attack": {
                "eps": opts.eps,
                "alpha": opts.alpha,
                "steps": opts.steps,
                "batch_size": opts.batch_size,
            },
            "n": n,
            "accuracy": {k: v / max(n, 1) for k, v in hits.items()},
            "mean_abs_change": {k: v / max(n, 1) for k, v in change.items()},
            "pixel_range": [lo, hi],
            "folders": None
            if folder is None
            else {"advbn": str(folder / "advbn"), "reconstructed": str(folder / "reconstructed")},
            "show": {
                "columns": list(columns),
                "labels": [names[int(v)] for v in ys],
                "images": {k: [_pixels(t) for t in v] for k, v in columns.items()},
            },
        }

    return ctx.unit("advbn", compute)


def _advbn(a: dict[str, Any]) -> list[str]:
    d, att, acc, ch = a["decoder"], a["attack"], a["accuracy"], a["mean_abs_change"]
    lines = [
        f"Decoder for site `{a['site']}` ({d['channels']}×{d['feature_size']}² → "
        f"{d['image_size']}² px), trained {d['epochs']} epochs on {d['train_images']} training "
        f"images (final MSE {d['train_mse'][-1]:.4f}); held-out MSE {d['held_out']['mse']:.4f} "
        f"(PSNR {d['held_out']['psnr_db']:.1f} dB). AdvBN: ε = {att['eps']:g}, step "
        f"{att['alpha']:g} × {att['steps']}, batches of {att['batch_size']}.",
        "",
    ]
    lines += md_table(
        ["test set", "accuracy (this model)", "mean |Δ pixel| vs original"],
        [
            ["original", pct(acc["original"]), "0"],
            ["reconstructed", pct(acc["reconstructed"]), f"{ch['reconstructed_vs_original']:.4f}"],
            ["-AdvBN", pct(acc["advbn"]), f"{ch['advbn_vs_original']:.4f}"],
        ],
    )
    if a.get("folders"):
        f = a["folders"]
        lines += [
            f"Image folders: `{f['advbn']}`, `{f['reconstructed']}` (score any model with "
            f"`--suite shift --domain advbn={f['advbn']}`).",
            "",
        ]
    return lines
