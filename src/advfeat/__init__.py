"""advfeat: adversarial feature augmentation and multi-branch batch normalization.

Implements, on one set of shared parts, the methods of five papers for *unmodified* PyTorch
models addressed by layer name: AdvProp (Xie et al., CVPR 2020), ALFA and L-ALFA (Qin et al.),
A-FAN (Chen et al., CVPR 2021), AdvBN (Shu et al., NeurIPS 2021) and AFA (dual-BN fusion against
unknown attack strengths).

>>> import advfeat
>>> model = advfeat.build_model("resnet20", num_classes=10)
>>> method = advfeat.build_method("afan", site="layer3")
"""

from advfeat import attacks
from advfeat.data import build_dataset
from advfeat.errors import AdvfeatError
from advfeat.layouts import FeatureLayout, infer_layout, site_layout
from advfeat.methods import Method, MethodOutput, build_method
from advfeat.models import Normalize, build_model
from advfeat.norm import (
    branch_names,
    branch_parameters,
    convert_branches,
    convert_multibn,
    register_norm_family,
    split_branches,
    strip_aux_bn,
    strip_branches,
    use_branch,
)
from advfeat.sites import SiteSplit, capture_features, replace_features, resolve_site
from advfeat.version import __version__

__all__ = [
    "AdvfeatError",
    "FeatureLayout",
    "Method",
    "MethodOutput",
    "Normalize",
    "SiteSplit",
    "__version__",
    "attacks",
    "branch_names",
    "branch_parameters",
    "build_dataset",
    "build_method",
    "build_model",
    "capture_features",
    "convert_branches",
    "convert_multibn",
    "infer_layout",
    "register_norm_family",
    "replace_features",
    "resolve_site",
    "site_layout",
    "split_branches",
    "strip_aux_bn",
    "strip_branches",
    "use_branch",
]
