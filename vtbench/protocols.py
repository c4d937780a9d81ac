"""Protocols as registered objects: what a number was measured by.

A probe protocol (``default``, ``sklearn``, ``ipvit``, ``knn``, ``ncc``) is a class registered with
:func:`register_protocol`; its parameters live in ``__init__`` (scikit-learn style), and it says which
splits it needs, how it runs on a set of features (:meth:`ProbeProtocol.run`), its variant name, its
leaderboard note and its row of ``vt probe``'s table and help. Few-shot protocols (episode samplers)
and few-shot classifiers are registered the same way for their notes and variant names; their
sampling and scoring live in :mod:`vtbench.fewshot`.

This module imports no torch: the leaderboard reads notes from it. A protocol's ``run`` imports
what it needs.
"""

from __future__ import annotations

import re
from typing import ClassVar

import numpy as np

from vtbench.errors import VTError

_REGISTRY: dict[str, type] = {}


def register_protocol(cls: type) -> type:
    """Class decorator: make a protocol (or few-shot classifier) known by its ``name``."""
    _REGISTRY[cls.name] = cls
    return cls


def probe_protocols() -> list[str]:
    """Names of the registered probe protocols, in registration order."""
    return [name for name, cls in _REGISTRY.items() if cls.task == "probe"]


def get_protocol(name: str, task: str = "probe", **params):
    """An instance of the registered protocol ``name`` (VTError naming the choices when unknown)."""
    cls = _REGISTRY.get(name)
    if cls is None or cls.task != task:
        choices = [n for n, c in _REGISTRY.items() if c.task == task]
        raise VTError(f"unknown protocol '{name}'; choose from {', '.join(choices)}")
    return cls(**params)


def describe(name: str) -> type | None:
    """The registered class a protocol or variant part name stands for (fixed few-shot episodes by pattern)."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    return next((cls for cls in _REGISTRY.values() if getattr(cls, "pattern", None) and cls.pattern.match(name)), None)


def protocol_note(name: str, metric: str) -> str:
    """One line saying what a protocol is (and what its number means under ``metric``)."""
    cls = describe(name)
    desc = cls.describe_name(name) if cls is not None else "no description registered (see the records)"
    extra = cls.metric_notes.get(metric) if cls is not None else None
    return f"{name}: {desc}" + (f"; {extra}" if extra else "")


class Protocol:
    """Base of every registered protocol: a name, a task, a note."""

    name: ClassVar[str]
    task: ClassVar[str]
    note: ClassVar[str]  # the leaderboard's note
    metric_notes: ClassVar[dict[str, str]] = {}  # what the number means under a metric, where not obvious

    @classmethod
    def describe_name(cls, name: str) -> str:
        return cls.note

    @classmethod
    def part_note(cls, part: str) -> str | None:
        """What a part of a variant name that this protocol writes means (None: not one of its parts)."""
        return None

    def get_params(self) -> dict:
        return dict(vars(self))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.get_params().items())})"


class ProbeProtocol(Protocol):
    """A probe on cached features: trained on the train split (selected on val where it needs one), tested on test."""

    task = "probe"
    summary: ClassVar[str]  # its lines in `vt probe --help`
    needs_val: ClassVar[bool] = True  # selects a hyperparameter on a validation split
    paper_splits: ClassVar[bool] = False  # trains on the IPViT paper's training splits

    def train_splits(self, info) -> list[str]:
        return list(info.paper_train_splits) if self.paper_splits else [info.train_split]

    def variant(self) -> str:
        """Protocol detail that changes the number ('' for the protocol as it is)."""
        return ""

    def run(self, task) -> list[dict]:
        """One outcome (metrics, selection, solver, timings) per token spec of ``task``
        (:class:`vtbench.transfer.probe.Task`)."""
        raise NotImplementedError

    def fit(self, task, spec):
        """The probe fitted on one spec (:class:`vtbench.transfer.probe.Fitted`): what scores other test sets
        (``vt robust``)."""
        raise VTError(f"the {self.name} protocol cannot score other test sets; use default, sklearn, knn or ncc")

    def table_note(self, record: dict) -> str:
        """The last column of `vt probe`'s table for one record of this protocol."""
        return ""


class _Logistic(ProbeProtocol):
    backend: ClassVar[str]

    def __init__(self, standardize: bool = True):
        self.standardize = standardize

    def variant(self) -> str:
        return "" if self.standardize else "raw"

    @classmethod
    def part_note(cls, part: str) -> str | None:
        return "logistic probe on raw (unstandardised) features" if part == "raw" else None

    def run(self, task) -> list[dict]:
        from vtbench.transfer.probe import logistic

        return logistic(task, self.backend)

    def fit(self, task, spec):
        from vtbench.transfer.probe import fit_logistic

        return fit_logistic(task, spec, self.backend)

    def table_note(self, record: dict) -> str:
        from vtbench.results import convergence_note

        problems = convergence_note(record)
        return f"l2={record['selection']['chosen']:g}" + (f" ({problems})" if problems else "")


@register_protocol
class DefaultProbe(_Logistic):
    name = "default"
    backend = "vtbench"
    note = ("vtbench's linear probe on frozen features: regularisation selected on a validation split, "
            "converged solver")
    summary = ("logistic regression on standardised features; L2 strength chosen on the validation split "
               "(official, else a seeded stratified 20% of train) from a 17-value log grid (1e-6 to 100); "
               "refit on train+val; test")


@register_protocol
class SklearnProbe(_Logistic):
    name = "sklearn"
    backend = "sklearn"
    note = "scikit-learn LogisticRegression on frozen features, C selected on a validation split"
    summary = "the same with scikit-learn's LogisticRegression (reference)"


@register_protocol
class IPViTProbe(ProbeProtocol):
    name = "ipvit"
    needs_val = False
    paper_splits = True
    note = ("the IPViT paper's probe recipe: linear head trained with AdamW at a constant learning rate "
            "for a fixed number of epochs, no augmentation, no validation split")
    summary = ("the paper's head: AdamW lr 5e-4, wd 0.05, 10 epochs, batch 256, on the paper's train splits; "
               "last epoch and max over epochs (the max peeks at test, as the paper did)")
    metric_notes = {
        "top1": "top1 is the test accuracy after the last epoch; the paper reported the maximum over epochs "
                "(--metric top1_max_over_epochs)",
        "top1_max_over_epochs": "shown: the maximum test top-1 over the epochs, as the paper reported",
    }

    def run(self, task) -> list[dict]:
        from vtbench.transfer.probe import ipvit

        return ipvit(task)

    def table_note(self, record: dict) -> str:
        m = record["metrics"]
        return f"max over epochs {m['top1_max_over_epochs']:.1f} (epoch {m['best_epoch']})"


@register_protocol
class KNNProbe(ProbeProtocol):
    name = "knn"
    note = "k-nearest-neighbour classifier on frozen features"
    summary = "k-NN, cosine, DINO's exp(sim/0.07) votes, k in {10,20,100,200} chosen on the validation split"

    def run(self, task) -> list[dict]:
        from vtbench.transfer.probe import knn

        return knn(task)

    def fit(self, task, spec):
        from vtbench.transfer.probe import fit_knn

        return fit_knn(task, spec)

    def table_note(self, record: dict) -> str:
        return f"k={record['selection']['chosen']} ({record['solver']['backend']})"


@register_protocol
class NearestCentroidProbe(ProbeProtocol):
    """Cosine similarity to the class means of the L2-normalised train features; nothing to select."""

    name = "ncc"
    needs_val = False
    note = "nearest class centroid: cosine similarity to the mean of each class's L2-normalised train features"
    summary = "nearest centroid: cosine to the class means of the L2-normalised train features; no selection"

    def fit(self, task, spec):
        import time

        import torch

        from vtbench.transfer.probe import Fitted

        t0 = time.perf_counter()
        labels = torch.from_numpy(task.train.labels).long()
        sums = torch.zeros(task.num_classes, task.train.width(spec), dtype=torch.float64)
        start = 0
        for chunk in task.train.chunks(spec, task.chunk_rows(task.train, spec, "knn")):  # chunks beyond --max-memory
            normalised = torch.nn.functional.normalize(torch.from_numpy(chunk).double(), dim=1)
            sums.index_add_(0, labels[start : start + len(chunk)], normalised)
            start += len(chunk)
        present = torch.bincount(labels, minlength=task.num_classes) > 0
        centroids = torch.nn.functional.normalize(sums, dim=1)

        def predict(features):
            scores = torch.nn.functional.normalize(torch.from_numpy(features).double(), dim=1) @ centroids.T
            scores[:, ~present] = -torch.inf  # a class without training images is never predicted
            return scores

        return Fitted(predict, {"selection": {"note": "no selection: class means of the train split"},
                                "solver": {"name": "ncc", "dtype": "float64",
                                           "similarity": "cosine (L2-normalised features, normalised means)"},
                                "timings": {"fit_s": time.perf_counter() - t0, "shared_by_specs": 1}})

    def run(self, task) -> list[dict]:
        import torch

        from vtbench.transfer.metrics import classification_metrics

        out = []
        for spec in task.specs:
            fitted = self.fit(task, spec)
            scores = fitted.score(task.test, spec, task.chunk_rows(task.test, spec, "knn"))
            out.append({"metrics": classification_metrics(scores, torch.from_numpy(task.test.labels).long()),
                        **fitted.outcome})
        return out

    def table_note(self, record: dict) -> str:
        return "no selection"


@register_protocol
class ModelHead(ProbeProtocol):
    """The model's own ImageNet-1k classifier on the ``logits`` token kind (``vt extract --logits``): nothing
    is trained; a test image is right when the head's top class is its synset."""

    name = "head"
    needs_val = False
    note = ("the model's own ImageNet-1k classifier head (no training): top-1 over its 1000 classes, the dataset's "
            "classes being ImageNet synsets (the IPViT paper's protocol on ImageNet val)")
    summary = ("the model's own ImageNet head on --tokens logits (vt extract --logits), for datasets whose classes "
               "are ImageNet synsets; nothing is trained")

    def train_splits(self, info) -> list[str]:
        return [info.test_split]  # nothing is trained: only the test split is read

    def fit(self, task, spec):
        import torch

        from vtbench.data.imagenet import imagenet_class_index
        from vtbench.transfer.probe import Fitted

        if str(spec) != "logits":
            raise VTError(f"the head protocol scores the model's logits: --tokens logits (not {spec}), from caches "
                          "made with vt extract --logits")
        index = imagenet_class_index(task.test.caches[0].class_names)
        return Fitted(lambda features: torch.from_numpy(np.asarray(features, dtype=np.float32)),
                      {"selection": {"note": "no selection: the model's own head"},
                       "solver": {"name": "head", "classes": "timm's ImageNet-1k order (timm.data.ImageNetInfo)"},
                       "timings": {"fit_s": 0.0, "shared_by_specs": 1}}, label_map=index)

    def run(self, task) -> list[dict]:
        from vtbench.transfer.metrics import classification_metrics

        out = []
        for spec in task.specs:
            fitted = self.fit(task, spec)
            scores = fitted.score(task.test, spec, task.chunk_rows(task.test, spec, "knn"))
            out.append({"metrics": classification_metrics(scores, fitted.labels(task.test.labels)), **fitted.outcome})
        return out

    def table_note(self, record: dict) -> str:
        return "own head"


# ------------------------------------------------------------------------------------------ analyses


class AnalysisProtocol(Protocol):
    """A measure of features rather than a probe (vt robust stability, cka); registered for its note."""

    task = "analysis"


@register_protocol
class PearsonStability(AnalysisProtocol):
    name = "pearson"
    note = ("feature stability: per block, the mean over test images of the Pearson correlation between the clean "
            "feature and the perturbed feature of the same image")


@register_protocol
class LinearCKA(AnalysisProtocol):
    name = "linear-cka"
    note = ("linear CKA (Kornblith et al. 2019) between blocks on the test images, biased estimator shown, "
            "debiased in the records")


# ------------------------------------------------------------------------------------------ few-shot


class FewshotProtocol(Protocol):
    """Episodes of a sampler (vtbench.fewshot.samplers); registered for its note."""

    task = "fewshot"


@register_protocol
class MetaDatasetEpisodes(FewshotProtocol):
    name = "fewshot-md"
    note = "Meta-Dataset episodes: variable way (5 to 50 classes) and variable shot, up to 10 queries per class"


@register_protocol
class FixedEpisodes(FewshotProtocol):
    name = "fewshot-NwKs"
    pattern = re.compile(r"^fewshot-(\d+)w(\d+)s$")
    note = "fixed episodes"

    @classmethod
    def describe_name(cls, name: str) -> str:
        ways, shots = cls.pattern.match(name).groups()
        return f"fixed episodes: {ways}-way {shots}-shot, 15 queries per class (qN in a variant: N queries)"


class FewshotClassifier(Protocol):
    """A classifier fitted on each episode's support set; its variant parts name the options that change
    the number."""

    task = "fewshot-classifier"

    def variant_parts(self) -> list[str]:
        return [self.name]

    def score(self, features, episodes, *, l2_normalize: bool, device: str):
        """Per-episode accuracies (:class:`vtbench.fewshot.classifiers.EpisodeScores`) of this classifier."""
        from vtbench.fewshot.classifiers import episode_accuracies

        return episode_accuracies(features, episodes, self.name, l2_normalize=l2_normalize, device=device,
                                  **self.get_params())

    def describe_run(self, scores) -> dict:
        """What a record says of the classifier beyond its name and parameters."""
        return {}


class LogisticEpisodes(FewshotClassifier):
    name = "lr"
    note = "logistic regression fitted on each episode's support set"
    _C = re.compile(r"^C([0-9.eE+-]+)$")  # its C, where not the default

    def __init__(self, C: float = 1.0):
        self.C = C

    @classmethod
    def part_note(cls, part: str) -> str | None:
        if part == cls.name:
            return cls.note
        m = cls._C.match(part)
        return f"C = {m.group(1)} (default 1)" if m else None

    def variant_parts(self) -> list[str]:
        return [self.name] + ([f"C{self.C:g}"] if self.C != 1.0 else [])

    def describe_run(self, scores) -> dict:
        from vtbench.fewshot.classifiers import LR_HISTORY, LR_TOL
        from vtbench.transfer.solver import CRITERION

        return {"l2": "1/(C*n_support)", "objective": "mean cross-entropy + l2/2 ||W||^2, bias unpenalised",
                "solver": f"vtbench.transfer.solver.fit_logreg (batched L-BFGS, {LR_HISTORY} pairs; episodes with "
                          "s < d solved exactly in their s-dim kernel basis)",
                "tol": LR_TOL, "criterion": CRITERION, "converged_fraction": float(scores.converged.mean()),
                "mean_iterations": float(scores.iterations.mean())}


class NearestCentroidEpisodes(FewshotClassifier):
    name = "ncc"
    note = "nearest centroid (cosine similarity to the support-class means)"

    def __init__(self, center: bool = False):
        self.center = center

    @classmethod
    def part_note(cls, part: str) -> str | None:
        return {cls.name: cls.note, "center": "features centred on the episode's support mean (SimpleShot)"}.get(part)

    def variant_parts(self) -> list[str]:
        return [self.name] + (["center"] if self.center else [])

    def describe_run(self, scores) -> dict:
        return {"similarity": "cosine to class centroids",
                "centering": "mean of the episode's support features" if self.center else None}


FEWSHOT_CLASSIFIERS = {c.name: c for c in (LogisticEpisodes, NearestCentroidEpisodes)}


def fewshot_classifier(name: str, **params) -> FewshotClassifier:
    """The few-shot classifier ``name`` (lr or ncc) with those of ``params`` it takes."""
    import inspect

    cls = FEWSHOT_CLASSIFIERS.get(name)
    if cls is None:
        raise VTError(f"unknown classifier '{name}'; choose from {', '.join(FEWSHOT_CLASSIFIERS)}")
    takes = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in params.items() if k in takes})


def variant_part_note(part: str) -> str | None:
    """What one '+'-separated part of a variant name means, from the protocol or classifier that writes it."""
    for cls in [*_REGISTRY.values(), *FEWSHOT_CLASSIFIERS.values()]:
        note = cls.part_note(part)
        if note is not None:
            return note
    return None
