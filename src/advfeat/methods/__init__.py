"""Training methods, one small module per method of each paper."""

from advfeat.methods import standard  # noqa: F401  (registers)
from advfeat.methods.base import Method, MethodOutput, unwrap
from advfeat.methods.registry import METHODS, build_method, register_method

__all__ = ["METHODS", "Method", "MethodOutput", "build_method", "register_method", "unwrap"]
