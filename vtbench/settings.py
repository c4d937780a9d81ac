"""How features were made, beyond model, weights and data: :class:`FeatureSettings`, and picking by them.

A cache's metadata and a result record both carry these settings as top-level fields
(:data:`FeatureSettings.FIELDS`); everything that names, matches or describes extraction settings
goes through this module: the cache key, cache selection, the results identity, the suite's plan,
leaderboard rows and notes, plot labels, and the options of ``vt extract`` and of every command
that picks caches (:data:`SELECT_OPTIONS`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Sequence

from vtbench.errors import VTError
from vtbench.options import Opt

DTYPES = ("float16", "float32")
DEFAULT_DTYPE = "float16"
DEFAULT_TRANSFORM = "model"
DEFAULT_NORM = True
# A record written before precision was copied into records (every CPU run) has none: it means fp32.
DEFAULT_PRECISION = "fp32"


@dataclass(frozen=True, eq=True)
class FeatureSettings:
    """The extraction settings of one cache: transform, final norm, stored dtype, forward precision, and
    the perturbation (None for clean features)."""

    transform: Optional[dict] = field(default=None, hash=False)  # vtbench.models.transforms: mode, input_size, ...
    norm: Optional[bool] = DEFAULT_NORM
    dtype: Optional[str] = DEFAULT_DTYPE
    precision: Optional[str] = None
    perturbation: Optional[dict] = field(default=None, hash=False)

    # The top-level fields of a cache's metadata and of a result record that hold these settings.
    FIELDS = ("transform", "norm", "dtype", "precision", "perturbation")

    @classmethod
    def of(cls, meta: dict) -> "FeatureSettings":
        """The settings recorded in a cache's metadata or a result record (absent fields: their defaults)."""
        # Raw values, None where unrecorded: the id of an older record must be the one it was stored under.
        return cls(transform=meta.get("transform"), norm=meta.get("norm"), dtype=meta.get("dtype"),
                   precision=meta.get("precision"), perturbation=meta.get("perturbation") or None)

    def fields(self) -> dict:
        """The settings as metadata / record fields; a clean cache has no perturbation field (so its key is
        the one it had before perturbations existed)."""
        out = {"transform": self.transform, "norm": self.norm, "dtype": self.dtype, "precision": self.precision}
        if self.perturbation:
            out["perturbation"] = self.perturbation
        return out

    @property
    def id(self) -> str:
        """12 hex digits naming these settings (fp32 counts as unrecorded, so older records keep their id)."""
        ident = {"transform": self.transform, "norm": self.norm, "dtype": self.dtype,
                 "precision": None if self.precision == DEFAULT_PRECISION else self.precision}
        if self.perturbation:
            ident["perturbation"] = self.perturbation
        return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:12]

    # The settings that must agree between the caches one evaluation reads (train, val and test): the
    # stored dtype and the forward precision may differ, the image transform, norm and perturbation not.
    AGREE = ("transform", "norm", "perturbation")

    def disagreement(self, other: "FeatureSettings") -> tuple[str, Any, Any] | None:
        """The first setting of :data:`AGREE` in which two caches differ, with both values (None if none)."""
        for name in self.AGREE:
            if getattr(self, name) != getattr(other, name):
                return name, getattr(self, name), getattr(other, name)
        return None

    @property
    def input_size(self) -> Optional[int]:
        """The square input side in pixels (the first of height, width); None where not recorded."""
        size = (self.transform or {}).get("input_size")
        return int(size[1]) if size else None

    def label(self, full: bool = False, arch: str | None = None, perturbation: bool = True) -> str:
        """The settings in words: 'model 224px crop 0.875' (``full``: every setting, as the notes give it;
        ``perturbation=False`` leaves the perturbation to a column of its own)."""
        from vtbench.perturb.spec import describe, label

        t = self.transform
        if not t:
            return "extraction settings not recorded"
        if full:
            return self._long(arch) + (f"; perturbed: {describe(self.perturbation)}" if self.perturbation else "")
        extras = self._extras() + ([label(self.perturbation)] if self.perturbation and perturbation else [])
        return ", ".join([self._short()] + extras)

    def _short(self) -> str:
        t = self.transform
        text = str(t.get("mode", "?"))
        if t.get("input_size"):
            h, w = t["input_size"][1:]
            text += f" {h}px" if h == w else f" {h}x{w}px"
        if t.get("mode") == "model" and t.get("crop_pct") is not None:
            text += f" crop {t['crop_pct']:g}"
        return text

    def _extras(self) -> list[str]:
        extras = [] if self.norm is not False else ["no final norm"]
        if self.dtype not in (None, DEFAULT_DTYPE):
            extras.append(self.dtype)
        if self.precision not in (None, DEFAULT_PRECISION):
            extras.append(str(self.precision))
        return extras

    def _long(self, arch: str | None) -> str:
        t = self.transform
        size = (t.get("input_size") or [None, "?", "?"])[1:]
        mean = ", ".join(f"{v:g}" for v in t.get("mean") or [])
        std = ", ".join(f"{v:g}" for v in t.get("std") or [])
        crop = (f", {t.get('crop_mode', 'center')} crop {t['crop_pct']:g}" if t.get("crop_pct") is not None
                else ", no crop")
        return (f"{t.get('mode', '?')} transform {size[0]}x{size[1]} px{crop}, {t.get('interpolation', '?')}, "
                f"mean ({mean}), std ({std}); {self._norm_words(arch)}; stored as {self.dtype or 'unrecorded dtype'}; forward in "
                f"{self.precision or 'unrecorded precision'}")

    def _norm_words(self, arch: str | None) -> str:
        """What the norm setting did: only ViTs have a final norm to apply to every block."""
        if arch == "cnn":
            return "no final norm to apply (CNN: pooled stages as they are)"
        if arch == "vit":
            return "the final norm on every block (--norm)" if self.norm else "blocks without the final norm (--no-norm)"
        return "--norm (ViTs: the final norm on every block)" if self.norm else "--no-norm"

    def describe(self) -> str:
        """One line that tells caches of one model, dataset and split apart (cache errors)."""
        t = self.transform or {}
        size = "x".join(map(str, (t.get("input_size") or [])[1:])) or "?"
        crop = f"crop {t['crop_pct']:g}" if t.get("crop_pct") is not None else "no crop"
        return (f"transform {t.get('mode')} {size} {crop} {t.get('interpolation')}, norm {self.norm}, "
                f"dtype {self.dtype}, {self.precision}")


# ------------------------------------------------------------------------------------------ options

# The options of `vt extract` (and YAML keys of a suite's extract section) that make the settings.
SETTINGS_OPTIONS = (
    Opt("transform", str, DEFAULT_TRANSFORM,
        "'model': the model's own eval transform; 'ipvit': resize to 224x224, no crop (the paper)."),
    Opt("input_size", int, None, "Override the input resolution (a ViT is built for it)."),
    Opt("crop_pct", float, None, "Override the centre-crop fraction."),
    Opt("interpolation", str, None, "Override the resize interpolation (bilinear, bicubic, ...)."),
    Opt("mean", str, None, "Override normalisation mean, e.g. 0.485,0.456,0.406."),
    Opt("std", str, None, "Override normalisation std."),
    Opt("norm", bool, DEFAULT_NORM, "Apply the model's final norm to every block's tokens (the paper's definition).",
        flag="--norm/--no-norm"),
    Opt("dtype", str, DEFAULT_DTYPE, "Feature dtype in the cache: float16 or float32."),
)

# ------------------------------------------------------------------------------------------ picking by settings

# How commands that read caches or results pick them by extraction settings: one option per setting that
# can tell two caches apart. None (not given) matches anything. Suites pick by their extract section.
SELECT_OPTIONS = (
    Opt("transform", str, None, suite=False, help="Pick caches extracted with this transform mode (model or ipvit)."),
    Opt("input_size", int, None, suite=False, help="Pick caches extracted at this input size (pixels, square)."),
    Opt("crop_pct", float, None, suite=False, help="Pick caches extracted with this centre-crop fraction."),
    Opt("interpolation", str, None, suite=False, help="Pick caches extracted with this resize interpolation."),
    Opt("mean", str, None, suite=False, help="Pick caches normalised with this mean, e.g. 0.485,0.456,0.406."),
    Opt("std", str, None, suite=False, help="Pick caches normalised with this std."),
    Opt("norm", bool, None, suite=False, help="Pick caches extracted with / without the final norm.", flag="--norm/--no-norm"),
    Opt("dtype", str, None, suite=False, help="Pick caches stored in this dtype (float16 or float32)."),
    Opt("precision", str, None, suite=False, help="Pick caches whose forward ran in this precision (fp32, bf16-autocast)."),
    Opt("perturb", str, None, suite=False, help="Pick the caches of this perturbation, as given to `vt extract --perturb` "
        "(e.g. patchdrop:random:0.5); caches default to the clean ones."),
)


@dataclass(frozen=True)
class SettingsQuery:
    """A partial :class:`FeatureSettings`: the settings a command was asked to pick by (None: any)."""

    transform: Optional[str] = None
    input_size: Optional[int] = None
    crop_pct: Optional[float] = None
    interpolation: Optional[str] = None
    mean: Optional[str] = None
    std: Optional[str] = None
    norm: Optional[bool] = None
    dtype: Optional[str] = None
    precision: Optional[str] = None
    perturb: Optional[str] = None  # a --perturb spec; None: clean caches (find_cache), any result (filters)

    @classmethod
    def from_options(cls, options: dict) -> "SettingsQuery":
        """The query of a command's options (other keys are ignored)."""
        return cls(**{o.name: options.get(o.name) for o in SELECT_OPTIONS})

    @classmethod
    def of(cls, settings: "SettingsQuery | dict | None" = None, **select) -> "SettingsQuery":
        """A query from a query, a mapping, or keyword arguments named as :data:`SELECT_OPTIONS` (the API's
        ``run_probe(..., input_size=224, dtype="float32")``); a name that is none of them is a TypeError."""
        given = dict(settings.given() if isinstance(settings, SettingsQuery) else settings or {})
        unknown = set(given) - {o.name for o in SELECT_OPTIONS}
        unknown |= set(select) - {o.name for o in SELECT_OPTIONS}
        if unknown:
            raise TypeError(f"unknown setting(s) {', '.join(sorted(unknown))}; settings are "
                            f"{', '.join(o.name for o in SELECT_OPTIONS)}")
        given.update({k: v for k, v in select.items() if v is not None})
        return cls(**given)

    def _checks(self, s: FeatureSettings) -> dict[str, Any]:
        t = s.transform or {}
        return {"transform": t.get("mode"), "input_size": s.input_size, "crop_pct": t.get("crop_pct"),
                "interpolation": t.get("interpolation"), "mean": _triple(t.get("mean")), "std": _triple(t.get("std")),
                "norm": DEFAULT_NORM if s.norm is None else bool(s.norm), "dtype": s.dtype,
                "precision": s.precision or DEFAULT_PRECISION, "perturb": json.dumps(s.perturbation, sort_keys=True)}

    def matches(self, settings: FeatureSettings | dict, clean_unless_given: bool = False) -> bool:
        """Whether the settings (or a cache's metadata / a record) agree with every setting given.
        ``clean_unless_given``: without ``perturb``, only clean features match (how caches are picked)."""
        from vtbench.perturb.spec import agrees, parse

        if isinstance(settings, dict):
            settings = FeatureSettings.of(settings)
        if self.perturb is not None:
            parsed = parse(self.perturb, query=True)
            if len(parsed) != 1:
                raise VTError(f"--perturb {self.perturb}: picks one perturbation's caches, not {len(parsed)}")
            (wanted,) = parsed
            if not agrees(wanted, settings.perturbation):
                return False
        elif clean_unless_given and settings.perturbation:
            return False
        actual = self._checks(settings)
        return all(actual[name] == (_triple(want) if name in ("mean", "std") else want)
                   for name, want in self.given().items() if name != "perturb")

    def given(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def __str__(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.given().items()) or "any settings"


def _triple(values) -> str | None:
    """Normalisation constants as one comparable string: '0.5,0.5,0.5' and [0.5, 0.5, 0.5] alike."""
    if values is None:
        return None
    if isinstance(values, str):
        values = [float(v) for v in values.split(",")]
    return ",".join(f"{float(v):g}" for v in values)


def telling_apart(settings: Sequence[FeatureSettings]) -> list[str]:
    """The options (``--input-size``, ``--dtype``, ...) whose values differ between these settings: what
    narrows a choice between them."""
    query = SettingsQuery()
    values = [query._checks(s) for s in settings]
    return [o.flag_names()[0] for o in SELECT_OPTIONS if len({repr(v[o.name]) for v in values}) > 1]


def select_flags() -> str:
    """Every pick-by-settings option, for error messages."""
    return ", ".join(o.flag_names()[0] if o.type is not bool else o.flag for o in SELECT_OPTIONS)
