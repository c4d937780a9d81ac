"""Perturbed extraction: PatchDrop (random, salient, non-salient), patch shuffle, lesions and token drop.

:mod:`vtbench.perturb.spec` parses ``--perturb`` specs (no torch); :mod:`vtbench.perturb.apply` does
them to a batch or a model during ``vt extract``. docs/perturbations.md has the grammar and the
procedures.
"""

from vtbench.perturb.spec import describe, label, parse, parse_all

__all__ = ["describe", "label", "parse", "parse_all"]
