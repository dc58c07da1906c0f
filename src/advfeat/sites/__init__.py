"""Feature sites: capture, replace and re-run the output of a named submodule.

A *feature site* is a dotted module name of an unmodified model (``"layer3"``, ``"layer4.0"``,
``"features.4"``). Feature-space methods (ALFA, A-FAN, AdvBN) perturb the output of a site and
run only the part of the network after it — "the gradient is only back-propagated to the i-th
layer without going further" (ALFA §3.2; A-FAN §4, "partial backpropagation"; AdvBN §4, "we do
not need to backpropagate through the first half of the network").

* :func:`resolve_site` — the module behind a name (``DataParallel``/DDP/compiled wrappers are
  transparent); unknown names list close matches.
* :func:`capture_features` / :func:`replace_features` — forward hooks, as context managers.
* :class:`SiteSplit` — *tail-only execution*: the model's output as if the site had produced a
  given tensor, running only what comes after the site.

How the tail is built. ``nn.Sequential`` models split at a top-level child directly. Other models
are traced with ``torch.fx``: the site (and any site to be replaced inside the tail) is a leaf, so
are the standard ``torch.nn`` layers, batch-norm layers (including advfeat's multi-branch BN),
modules carrying hooks, user-given leaves, and any submodule whose ``forward`` cannot be traced
(it is tried, then kept whole). The graph is cut after the site's node. The tail is compiled
from the graph but runs against the live model (``self`` is the model itself), so it shares every
submodule, parameter and buffer — training through the tail trains the model, and swapping a
submodule, ``.to(device)`` or BN-branch routing are seen at once. Traces are cached per model and
redone when module types, train/eval flags or the presence of hooks change (Python state read by
non-leaf modules, e.g. ``if self.training``, is frozen into a trace).

The frontier. When the tail also needs values from before the site — a site inside a residual
block, whose block input the shortcut adds back; a dense block, whose later layers concatenate
earlier outputs — those values (the *frontier*: model inputs and outputs of module calls, with
the function calls between them and the tail replayed) are recorded during the clean pass by
``capture_features(model, sites, frontier=True)`` and handed to the tail when it is called with
the same input ``x`` (the same tensor or an alias of it, not written to since). The tail is then
tail-only at any site of a traceable model. The frontier keeps its autograd graph: with
``prefix_grad=True`` gradients reach the layers before the site through it, as they do through the
skip connection of the full model; by default it is a constant of the tail, like the fallback's
prefix.

Fallback (model not traceable, a frontier that no clean pass captured for this input, a hooked
ancestor of the site, forward hooks on the root): the whole model runs on the input ``x`` with
the site's output replaced by a forward hook; the part before the site runs under
``torch.no_grad()`` (grad mode is switched back on by the site hook). Slower, equally correct.
Check :attr:`SiteSplit.is_fast` and :attr:`SiteSplit.frontier`.

Root forward *pre*-hooks (e.g. :func:`advfeat.models.attach_normalize`) are part of the head and
are not run by a fast tail, which starts after the site.

The package, one module per concern:

* :mod:`~advfeat.sites.addressing` — names: :func:`resolve_site`, :func:`split_site_name`,
  :func:`unwrap_model`, :func:`uncompiled`, :func:`check_disjoint_sites` (no site inside
  another).
* :mod:`~advfeat.sites.hooks` — :func:`capture_features`, :func:`replace_features`.
* :mod:`~advfeat.sites.tracing` — the ``torch.fx`` tracer of sites, :func:`site_order`.
* :mod:`~advfeat.sites.plans` — the trace cut after a site (tail plans, cached per model).
* :mod:`~advfeat.sites.frontier` — the frontier recorded in the clean pass,
  :func:`frontier_capture`.
* :mod:`~advfeat.sites.split` — :class:`SiteSplit`.
* :mod:`~advfeat.sites.blocks` — the default sites: stages and blocks (:func:`last_stage`,
  :func:`stage_blocks`, :func:`spread_blocks`), or the sites a model declares
  (:func:`declared_sites`).
"""

from __future__ import annotations

from advfeat.sites.addressing import (
    check_disjoint_sites,
    resolve_site,
    split_site_name,
    uncompiled,
    unwrap_model,
)
from advfeat.sites.blocks import (
    block_stacks,
    declared_sites,
    first_stage,
    last_stage,
    spread_blocks,
    stage_blocks,
    stages,
)
from advfeat.sites.frontier import frontier_capture
from advfeat.sites.hooks import FeatureFn, capture_features, replace_features
from advfeat.sites.split import SiteSplit
from advfeat.sites.tracing import site_order

__all__ = [
    "FeatureFn",
    "SiteSplit",
    "block_stacks",
    "capture_features",
    "check_disjoint_sites",
    "declared_sites",
    "first_stage",
    "frontier_capture",
    "last_stage",
    "replace_features",
    "resolve_site",
    "site_order",
    "split_site_name",
    "spread_blocks",
    "stage_blocks",
    "stages",
    "uncompiled",
    "unwrap_model",
]
