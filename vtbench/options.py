"""Options owned by the library: one :class:`Opt` per option of ``vt extract``, ``vt probe`` and ``vt fewshot``.

The typer commands (:func:`vtbench.cli.common.command_from`) and the suite schema
(:mod:`vtbench.suite`) are both built from these option sets, so a name, type, default or help
text lives here once. The sets themselves live beside the code they configure:
:data:`vtbench.extract.run.EXTRACT_OPTIONS`, :data:`vtbench.transfer.probe.PROBE_OPTIONS`,
:data:`vtbench.fewshot.run.FEWSHOT_OPTIONS`; the options that pick caches by extraction settings
are :data:`vtbench.settings.SELECT_OPTIONS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from vtbench.errors import VTError

REQUIRED = ...  # the default of an option that must be given


@dataclass(frozen=True)
class Opt:
    """One option: its Python name (also its YAML key), type, default and help.

    ``type`` is int, float, str, bool or Path; ``multiple`` makes it a list. ``flag`` overrides the
    flag derived from the name (``input_size`` -> ``--input-size``), e.g. ``--norm/--no-norm``;
    ``short`` adds a one-letter alias; ``suite`` is False for options a suite sets itself.
    """

    name: str
    type: Any
    default: Any = None
    help: str = ""
    flag: Optional[str] = None
    short: Optional[str] = None
    multiple: bool = False
    aliases: tuple[str, ...] = ()
    suite: bool = True
    api: Optional[str] = None  # the keyword of the Python API, where it is not ``name``
    argument: bool = False  # a positional argument instead of an option

    def flag_names(self) -> list[str]:
        """The option's flags, the long one first (``--norm/--no-norm`` gives both halves)."""
        main = self.flag or "--" + self.name.replace("_", "-")
        names = [part for part in main.split("/")] + list(self.aliases)
        return names + ([self.short] if self.short else [])

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def annotation(self):
        """The Python type typer reads: ``Optional[...]`` where None is allowed, ``List[...]`` for multiple."""
        from typing import List

        base = List[self.type] if self.multiple else self.type
        return base if self.required or (self.default is not None and not self.multiple) else Optional[base]


def weights_choice(pretrained: bool, checkpoint: str | None, random_init: bool) -> str:
    """Map --pretrained / --checkpoint FILE / --random-init to the `weights` argument of the API."""
    if checkpoint and random_init:
        raise VTError("pass either --checkpoint or --random-init, not both")
    if checkpoint:
        return checkpoint
    if random_init:
        return "random"
    if not pretrained:
        raise VTError("--no-pretrained needs --checkpoint FILE or --random-init")
    return "pretrained"


def by_name(options) -> dict[str, Opt]:
    return {o.name: o for o in options}


def api_kwargs(options, values: dict) -> dict:
    """Option values (by option name) as keywords of the Python API (``root`` -> ``data_root``, ...)."""
    names = {o.name: o.api or o.name for o in options}
    return {names.get(k, k): v for k, v in values.items()}


def suite_options(options) -> dict[str, Opt]:
    """The options a suite section may set (the rest the suite sets itself), by name."""
    return {o.name: o for o in options if o.suite}


# Options several commands share.
MODEL = Opt("model", str, REQUIRED, "timm model name, as given to `vt extract`.", short="-m", suite=False)
DATASET = Opt("dataset", str, REQUIRED, "Dataset spec, as given to `vt extract`.", short="-d", suite=False)
CACHE_DIR = Opt("cache_dir", Path, None, "Feature caches (default: $VT_CACHE, else the user cache dir).", suite=False)
RESULTS_DIR = Opt("results", Path, None, "Results store (default: $VT_RESULTS, else ./results).", suite=False,
                  api="results_dir")
WEIGHTS_PICK = Opt("weights", str, None, "Pick the caches whose weights sha256 starts with, or whose source contains, "
                   "this.", suite=False)
ROOT_PICK = Opt("root", Path, None, "Pick the caches extracted from this dataset root (as given to `vt extract --root`).",
                suite=False, api="data_root")
SKIP_EXISTING = Opt("skip_existing", bool, False, "Skip results already in the store (they are listed as stored).",
                    suite=False)
DEVICE = Opt("device", str, "auto", "auto, cpu, cuda, cuda:1, ...")
