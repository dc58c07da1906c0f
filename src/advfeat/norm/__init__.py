"""Normalization tools: multi-branch norm for any family (AdvProp, AdvBN, AFA stage I), frozen
statistics, AFA fusion.

See :mod:`advfeat.norm.branches` (conversion, routing, stripping, parameter groups, for any norm
family), :mod:`advfeat.norm.families` (which layers can be given branches and what a branch
owns; :func:`register_norm_family`), :mod:`advfeat.norm.multibn` (batch norm's family:
:func:`convert_multibn`, SyncBN per branch), :mod:`advfeat.norm.stats`
(:func:`has_running_statistics`, :func:`frozen_bn_statistics`) and :mod:`advfeat.norm.afa` (AFA's
fused dual BN and weight generator).
"""

from advfeat.norm.afa import (
    AdaptiveFeatureAlignment,
    FusedDualBN,
    FusionWeights,
    WeightGenerator,
    afa_branches,
    branch_for_strength,
    to_fused_dual_bn,
)
from advfeat.norm.branches import (
    BranchModel,
    BranchNorm,
    branch_layers,
    branch_names,
    branch_parameters,
    convert_branches,
    convert_sync_branches,
    has_branches,
    is_norm_leaf,
    main_branch,
    shared_parameters,
    split_branches,
    strip_branches,
    use_branch,
)
from advfeat.norm.families import (
    AUX_NORMS,
    NormFamily,
    can_have_branches,
    norm_families,
    norm_family_of,
    register_norm_family,
    unregister_norm_family,
)
from advfeat.norm.multibn import (
    MultiBatchNorm,
    convert_multibn,
    convert_sync_multibn,
    strip_aux_bn,
)
from advfeat.norm.stats import (
    batchnorm_modules,
    frozen_bn_statistics,
    has_running_statistics,
    is_batchnorm_like,
    register_batchnorm_class,
)

__all__ = [
    "AUX_NORMS",
    "AdaptiveFeatureAlignment",
    "BranchModel",
    "BranchNorm",
    "FusedDualBN",
    "FusionWeights",
    "MultiBatchNorm",
    "NormFamily",
    "WeightGenerator",
    "afa_branches",
    "batchnorm_modules",
    "branch_for_strength",
    "branch_layers",
    "branch_names",
    "branch_parameters",
    "can_have_branches",
    "convert_branches",
    "convert_multibn",
    "convert_sync_branches",
    "convert_sync_multibn",
    "frozen_bn_statistics",
    "has_branches",
    "has_running_statistics",
    "is_batchnorm_like",
    "is_norm_leaf",
    "main_branch",
    "norm_families",
    "norm_family_of",
    "register_batchnorm_class",
    "register_norm_family",
    "shared_parameters",
    "split_branches",
    "strip_aux_bn",
    "strip_branches",
    "to_fused_dual_bn",
    "unregister_norm_family",
    "use_branch",
]
