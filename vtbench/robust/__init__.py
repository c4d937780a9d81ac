"""Robustness analyses on cached features: accuracy under perturbation, feature stability, CKA (`vt robust`)."""

from vtbench.robust.cka import CKAAccumulator, linear_cka
from vtbench.robust.run import run_accuracy, run_cka, run_stability

__all__ = ["CKAAccumulator", "linear_cka", "run_accuracy", "run_cka", "run_stability"]
