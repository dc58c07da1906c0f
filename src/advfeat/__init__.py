"""advfeat: adversarial feature augmentation and multi-branch batch normalization.

Implements, on one set of shared parts, AdvProp (Xie et al. 2020), ALFA / L-ALFA (Qin et al.),
A-FAN (Chen et al. 2021), AdvBN (Shu et al. 2021) and AFA (dual-BN fusion) for unmodified
PyTorch models.
"""

__version__ = "0.1.0"
