"""Evaluation: accuracy, robustness suites, metrics, plots and reports."""

from advfeat.eval.accuracy import eval_mode, evaluate_accuracy

__all__ = ["eval_mode", "evaluate_accuracy"]
