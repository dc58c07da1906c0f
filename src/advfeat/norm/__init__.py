"""Batch-norm tools: multi-branch BN (AdvProp, AdvBN, AFA stage I), frozen statistics, AFA fusion.

See :mod:`advfeat.norm.multibn` (conversion, routing, stripping, parameter groups),
:mod:`advfeat.norm.stats` (:func:`frozen_bn_statistics`) and :mod:`advfeat.norm.afa` (AFA's
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
from advfeat.norm.multibn import (
    BranchModel,
    MultiBatchNorm,
    branch_names,
    branch_parameters,
    convert_multibn,
    convert_sync_multibn,
    is_norm_leaf,
    main_branch,
    shared_parameters,
    split_branches,
    strip_aux_bn,
    use_branch,
)
from advfeat.norm.stats import (
    batchnorm_modules,
    frozen_bn_statistics,
    is_batchnorm_like,
    register_batchnorm_class,
)

__all__ = [
    "AdaptiveFeatureAlignment",
    "BranchModel",
    "FusedDualBN",
    "FusionWeights",
    "MultiBatchNorm",
    "WeightGenerator",
    "afa_branches",
    "batchnorm_modules",
    "branch_for_strength",
    "branch_names",
    "branch_parameters",
    "convert_multibn",
    "convert_sync_multibn",
    "frozen_bn_statistics",
    "is_batchnorm_like",
    "is_norm_leaf",
    "main_branch",
    "register_batchnorm_class",
    "shared_parameters",
    "split_branches",
    "strip_aux_bn",
    "to_fused_dual_bn",
    "use_branch",
]
