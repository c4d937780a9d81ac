"""Perturbation specs: ``--perturb patchdrop:random:0.5``, parsed into one canonical dict.

Grammar (docs/perturbations.md): ``KIND:ARG[:ARG][:key=value...]``

=====================================  ===========================================================
``patchdrop:random:R``                 a fraction R of the grid's cells set to black (0 in [0, 1])
``patchdrop:salient:L``                the cells holding the top L of a saliency ViT's attention mass
``patchdrop:nonsalient:L``             every cell but those
``shuffle:G``                          the image cut into G x G pieces, the pieces permuted
``lesion:block:I`` (ViT)               block I removed (both residual branches); CNNs: ``I`` = ``S.J``
``lesion:attn:I`` / ``lesion:mlp:I``   only the attention (MLP) branch of block I removed
``tokendrop:R:block=I``                a fraction R of the patch tokens zeroed before block I
=====================================  ===========================================================

Lists and ranges expand to one perturbation each: ``patchdrop:random:0.25,0.5,0.75``,
``lesion:attn:0..11``.

Options: ``grid=N`` (patchdrop: N x N cells; default the ViT's patch grid, 16 px cells for CNNs),
``seed=S`` (default 0), ``trials=T`` (random draws: T caches, trial 0..T-1; ``trial=t`` names one),
``head=H|mean`` (saliency: the attention head, default 1 as the paper's code).

The canonical dict is what a cache's ``perturbation`` attribute holds, without what extraction
resolves (the grid of a default, the saliency model): a spec picks every cache whose dict agrees
with the fields it gives. This module imports no torch.
"""

from __future__ import annotations

from vtbench.errors import VTError

KINDS = ("patchdrop", "shuffle", "lesion", "tokendrop")
DROP_MODES = ("random", "salient", "nonsalient")
LESION_PARTS = ("block", "attn", "mlp")
SHUFFLE_GRIDS_PAPER = (2, 4, 8, 14, 16)
DEFAULT_HEAD = 1  # the attention head IPViT's evaluate.py takes
RANDOM_KINDS = {("patchdrop", "random"), ("shuffle", None), ("tokendrop", None)}  # those with a seeded draw


def _fraction(text: str, what: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise VTError(f"--perturb {spec}: {what} must be a number in [0, 1], not '{text}'") from None
    if not 0 <= value <= 1:
        raise VTError(f"--perturb {spec}: {what} must be in [0, 1], not {value:g}")
    return value


def _integer(text: str, what: str, spec: str, least: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise VTError(f"--perturb {spec}: {what} must be an integer, not '{text}'") from None
    if least is not None and value < least:
        raise VTError(f"--perturb {spec}: {what} must be at least {least}, not {value}")
    return value


def _expand(spec: str) -> list[str]:
    """A spec with lists (``0.25,0.5``) or integer ranges (``0..11``) in its arguments, as one spec per value:
    a grid of drop ratios or every block's lesion is one spec."""
    parts = spec.split(":")
    for i, part in enumerate(parts):
        if "=" in part or i == 0:
            continue
        if "," in part:
            values = [v for v in part.split(",") if v]
        elif ".." in part:
            lo, _, hi = part.partition("..")
            try:
                values = [str(v) for v in range(int(lo), int(hi) + 1)]
            except ValueError:
                raise VTError(f"--perturb {spec}: a range is two integers, e.g. 0..11, not '{part}'") from None
        else:
            continue
        return [e for v in values for e in _expand(":".join(parts[:i] + [v] + parts[i + 1:]))]
    return [spec]


def parse(spec: str, *, query: bool = False) -> list[dict]:
    """The canonical perturbation dicts a spec stands for (several with ``trials=T``, lists or ranges).

    ``query`` parses a spec that picks caches: ``trials`` is refused there (name a ``trial=t``).
    """
    expanded = _expand(str(spec).strip())
    if len(expanded) > 1:
        return [p for one in expanded for p in parse(one, query=query)]
    spec = expanded[0]
    head, *rest = spec.split(":")
    if head not in KINDS:
        raise VTError(f"--perturb {spec}: unknown perturbation '{head}'; use one of {', '.join(KINDS)} "
                      "(e.g. patchdrop:random:0.5, shuffle:4, lesion:attn:-1, tokendrop:0.5:block=4)")
    args = [a for a in rest if "=" not in a]
    options = {}
    for part in (a for a in rest if "=" in a):
        key, _, value = part.partition("=")
        options[key.strip()] = value.strip()
    out = {"patchdrop": _patchdrop, "shuffle": _shuffle, "lesion": _lesion, "tokendrop": _tokendrop}[head](
        spec, args, options)
    trials = _integer(options.pop("trials"), "trials", spec, 1) if "trials" in options else None
    random = (out["kind"], out.get("mode")) in RANDOM_KINDS
    if random:
        out["seed"] = _integer(options.pop("seed", "0"), "seed", spec, 0)
        out["trial"] = _integer(options.pop("trial", "0"), "trial", spec, 0)
    if options:
        raise VTError(f"--perturb {spec}: unknown option(s) {', '.join(sorted(options))} for {head}")
    if trials is not None:
        if not random:
            raise VTError(f"--perturb {spec}: trials= only for random perturbations (random patchdrop, shuffle, "
                          "tokendrop)")
        if query:
            raise VTError(f"--perturb {spec}: a cache is one trial; name it with trial=T instead of trials=")
        return [dict(out, trial=t) for t in range(trials)]
    return [out]


def _patchdrop(spec, args, options) -> dict:
    if len(args) != 2 or args[0] not in DROP_MODES:
        raise VTError(f"--perturb {spec}: patchdrop takes a mode ({', '.join(DROP_MODES)}) and a fraction, "
                      "e.g. patchdrop:random:0.5")
    mode, value = args
    out = {"kind": "patchdrop", "mode": mode, "ratio" if mode == "random" else "mass": _fraction(value, "the fraction", spec)}
    if "grid" in options:
        if mode != "random":
            raise VTError(f"--perturb {spec}: the {mode} grid is the saliency ViT's patch grid (no grid=)")
        out["grid"] = _integer(options.pop("grid"), "grid", spec, 1)
    if mode != "random":
        head = options.pop("head", str(DEFAULT_HEAD))
        out["head"] = "mean" if head == "mean" else _integer(head, "head", spec, 0)
    return out


def _shuffle(spec, args, options) -> dict:
    if len(args) != 1:
        raise VTError(f"--perturb {spec}: shuffle takes a grid size, e.g. shuffle:4 (4 x 4 pieces)")
    return {"kind": "shuffle", "grid": _integer(args[0], "the grid size", spec, 1)}


def _lesion(spec, args, options) -> dict:
    if len(args) != 2 or args[0] not in LESION_PARTS:
        raise VTError(f"--perturb {spec}: lesion takes a part ({', '.join(LESION_PARTS)}) and a block index, "
                      "e.g. lesion:attn:-1 (CNNs: lesion:block:STAGE.BLOCK)")
    part, where = args
    if "." in where:
        if part != "block":
            raise VTError(f"--perturb {spec}: CNN blocks (STAGE.BLOCK) are removed whole: lesion:block:{where}")
        stage, block = where.split(".", 1)
        return {"kind": "lesion", "part": "block", "stage": _integer(stage, "the stage", spec),
                "block": _integer(block, "the block", spec)}
    return {"kind": "lesion", "part": part, "block": _integer(where, "the block index", spec)}


def _tokendrop(spec, args, options) -> dict:
    if len(args) != 1 or "block" not in options:
        raise VTError(f"--perturb {spec}: tokendrop takes a fraction and the block before which it acts, "
                      "e.g. tokendrop:0.5:block=4")
    return {"kind": "tokendrop", "ratio": _fraction(args[0], "the fraction", spec),
            "before_block": _integer(options.pop("block"), "block", spec)}


def parse_all(specs) -> list[dict]:
    """Every perturbation of several specs, once each, in order."""
    out = []
    for spec in [specs] if isinstance(specs, str) else list(specs or []):
        for item in parse(spec):
            if item not in out:
                out.append(item)
    return out


def applies_to(p: dict, arch: str) -> bool:
    """Whether a perturbation fits a model family: block-index lesions and token drop are ViTs', stage.block
    lesions CNNs'."""
    if p["kind"] == "tokendrop" or (p["kind"] == "lesion" and "stage" not in p):
        return arch == "vit"
    if p["kind"] == "lesion":
        return arch == "cnn"
    return True


def spec_of(p: dict) -> str:
    """The spec string of a parsed perturbation (its trial named): ``parse(spec_of(p), query=True) == [p]``."""
    kind = p["kind"]
    if kind == "patchdrop":
        amount = p["ratio"] if p["mode"] == "random" else p["mass"]
        parts = ["patchdrop", p["mode"], f"{amount:g}"]
        parts += [f"grid={p['grid']}"] if "grid" in p else []
        parts += [f"head={p['head']}"] if "head" in p and p["head"] != DEFAULT_HEAD else []
    elif kind == "shuffle":
        parts = ["shuffle", str(p["grid"])]
    elif kind == "lesion":
        where = f"{p['stage']}.{p['block']}" if "stage" in p else str(p["block"])
        parts = ["lesion", p["part"], where]
    else:
        parts = ["tokendrop", f"{p['ratio']:g}", f"block={p['before_block']}"]
    if "seed" in p:
        parts += ([f"seed={p['seed']}"] if p["seed"] else []) + ([f"trial={p['trial']}"] if p["trial"] else [])
    return ":".join(parts)


def agrees(query: dict, stored: dict | None) -> bool:
    """Whether a cache's perturbation (None: clean) is one the query spec's dict stands for (a negative block
    index counts from the model's last block, as the cache's ``depth`` says)."""
    if stored is None:
        return False
    for key, want in query.items():
        have = stored.get(key)
        if key in ("block", "before_block") and isinstance(want, int) and want < 0 and "depth" in stored \
                and "stage" not in stored:
            want += stored["depth"]
        if have != want:
            return False
    return True


def sort_key(p: dict | None) -> tuple:
    """Clean first, then by kind, mode and amount in numeric order (5% before 10%)."""
    if not p:
        return ()
    amount = [p.get(k) for k in ("ratio", "mass", "grid", "stage", "block", "before_block", "trial") if k in p]
    return (p["kind"], str(p.get("mode", p.get("part", ""))), *[float(a) for a in amount])


def label(p: dict | None) -> str:
    """A perturbation in a few words: 'patchdrop random 50%', 'shuffle 4x4', 'lesion attn block -1'."""
    if not p:
        return "clean"
    kind = p["kind"]
    if kind == "patchdrop":
        amount = f"{p['ratio']:.0%}" if p["mode"] == "random" else f"mass {p['mass']:g}"
        text = f"patchdrop {p['mode']} {amount}" + (f" on {p['grid']}x{p['grid']}" if p.get("grid") else "")
    elif kind == "shuffle":
        text = f"shuffle {p['grid']}x{p['grid']}"
    elif kind == "lesion":
        where = f"stage {p['stage']} block {p['block']}" if "stage" in p else f"block {p['block']}"
        text = f"lesion {p['part']} {where}"
    else:
        text = f"tokendrop {p['ratio']:.0%} before block {p['before_block']}"
    if p.get("trial"):
        text += f" trial {p['trial']}"
    return text


def describe(p: dict | None) -> str:
    """Everything about a perturbation, for notes: how it was drawn and with which saliency model."""
    if not p:
        return "clean"
    text = label(p)
    if "seed" in p:
        text += f", seed {p['seed']} (drawn per image from the seed and the image id)"
    saliency = p.get("saliency")
    if saliency:
        text += (f", saliency {saliency.get('model')} (weights {str(saliency.get('weights_sha256', ''))[:12]}), "
                 f"head {p.get('head')}")
    if p.get("module"):
        text += f", module {p['module']}"
    return text
