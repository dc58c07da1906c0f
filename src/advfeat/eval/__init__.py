"""Evaluation: accuracy, robustness suites, metrics, plots and reports.

Evaluate any classifier (images in [0, 1] → logits)::

    from advfeat.eval import evaluate
    results = evaluate(model, bundle, suites=["clean", "attacks"], out="eval.json")

or a run written by ``advfeat train`` with :func:`evaluate_checkpoint` (``advfeat eval``).
"""

from advfeat.eval.accuracy import eval_mode, evaluate_accuracy
from advfeat.eval.config import DEFAULT_SUITES, EvalConfig
from advfeat.eval.context import EvalContext, EvalData
from advfeat.eval.loading import LoadedRun, eval_data, load_run, load_weights
from advfeat.eval.runner import evaluate, evaluate_checkpoint, write_outputs
from advfeat.eval.suites import SUITES, ordered_suites, suite_names

__all__ = [
    "DEFAULT_SUITES",
    "SUITES",
    "EvalConfig",
    "EvalContext",
    "EvalData",
    "LoadedRun",
    "eval_data",
    "eval_mode",
    "evaluate",
    "evaluate_accuracy",
    "evaluate_checkpoint",
    "load_run",
    "load_weights",
    "ordered_suites",
    "suite_names",
    "write_outputs",
]
