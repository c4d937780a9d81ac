"""Linear probes and k-NN on cached token ensembles (``vt probe``), and the batched logistic-regression solver."""

from vtbench.transfer.probe import L2_GRID, PROTOCOLS, run_probe
from vtbench.transfer.solver import LogRegFit, fit_logreg

__all__ = ["run_probe", "fit_logreg", "LogRegFit", "L2_GRID", "PROTOCOLS"]
