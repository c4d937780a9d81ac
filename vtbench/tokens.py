"""Token specs: the one mini-language for choosing features out of a cache.

Grammar (whitespace is ignored)::

    spec  := term ("+" term)*
    term  := KIND "[" index "]" | "prelogits"
    KIND  := "cls" | "patch" | "stage" | "prelogits"
    index := INT | [INT] ":" [INT] | "all"

Examples: ``cls[-1]`` (last block's class token), ``cls[-4:]`` (the last four
blocks' class tokens, concatenated in block order), ``patch[-1]`` (last block's
mean patch token), ``cls[-4:]+patch[-1]``, ``cls[3]``, ``cls[all]``,
``prelogits`` (the model's pre-logit feature), ``stage[-1]`` (a CNN's last
stage, globally average-pooled). Indices are Python-style, so negative values
count from the last block and slices exclude their end; unlike Python, a slice
bound beyond the blocks is an error rather than clamped (``cls[-4:]`` on a
3-block model is not "the last four blocks").

A spec is parsed once (:func:`parse_spec`) and resolved against what a cache
holds (:meth:`TokenSpec.resolve`), which turns it into concrete
``(kind, block)`` pairs and checks that every block exists.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vtbench.errors import VTError

KINDS = ("cls", "patch", "stage", "prelogits", "logits")
SINGLE = ("prelogits", "logits")  # kinds with one "block": the head's input and output

_TERM = re.compile(r"^(?P<kind>[a-z_]+)(?:\[(?P<index>[^\]]*)\])?$")
_INT = r"-?\d+"


@dataclass(frozen=True)
class Term:
    """One ``KIND[index]`` term. ``start``/``stop`` form a slice unless ``single`` is set."""

    kind: str
    start: int | None = None
    stop: int | None = None
    single: bool = False

    def __str__(self) -> str:
        if self.kind in SINGLE:
            return self.kind
        if self.single:
            return f"{self.kind}[{self.start}]"
        if self.start is None and self.stop is None:
            return f"{self.kind}[all]"
        lo = "" if self.start is None else str(self.start)
        hi = "" if self.stop is None else str(self.stop)
        return f"{self.kind}[{lo}:{hi}]"

    def blocks(self, num_blocks: int) -> list[int]:
        """Concrete block indices (0-based, in order) for a kind with ``num_blocks`` blocks."""
        if self.single:
            idx = self.start
            if not -num_blocks <= idx < num_blocks:
                raise VTError(
                    f"token spec '{self}': block {idx} is out of range; "
                    f"this cache has {num_blocks} '{self.kind}' blocks (0..{num_blocks - 1})"
                )
            return [idx % num_blocks]
        for bound in (self.start, self.stop):
            # Python would clamp, but cls[-4:] on a 3-block model is not the last four blocks: say so.
            if bound is not None and not -num_blocks <= bound <= num_blocks:
                raise VTError(
                    f"token spec '{self}': {bound} is out of range; "
                    f"this cache has {num_blocks} '{self.kind}' blocks (0..{num_blocks - 1})"
                )
        picked = list(range(num_blocks))[slice(self.start, self.stop)]
        if not picked:
            raise VTError(
                f"token spec '{self}' selects no blocks; this cache has {num_blocks} '{self.kind}' blocks"
            )
        return picked


@dataclass(frozen=True)
class TokenSpec:
    """A parsed token spec: terms joined by ``+``, concatenated in order."""

    terms: tuple[Term, ...]

    def __str__(self) -> str:
        return "+".join(str(t) for t in self.terms)

    @property
    def kinds(self) -> set[str]:
        return {t.kind for t in self.terms}

    def resolve(self, available: dict[str, int]) -> list[tuple[str, int]]:
        """Turn the spec into ``(kind, block)`` pairs, given ``{kind: number of blocks}`` in a cache."""
        pairs: list[tuple[str, int]] = []
        for term in self.terms:
            if term.kind not in available:
                have = ", ".join(sorted(available)) or "nothing"
                raise VTError(f"token spec '{self}': this cache has no '{term.kind}' features (it has: {have})")
            pairs.extend((term.kind, b) for b in term.blocks(available[term.kind]))
        return pairs


def _parse_index(kind: str, text: str, term_text: str) -> Term:
    text = text.strip()
    if text == "all":
        return Term(kind)
    if re.fullmatch(_INT, text):
        return Term(kind, int(text), None, single=True)
    m = re.fullmatch(rf"(?P<lo>{_INT})?:(?P<hi>{_INT})?", text)
    if m:
        lo, hi = m.group("lo"), m.group("hi")
        return Term(kind, None if lo is None else int(lo), None if hi is None else int(hi))
    raise VTError(f"bad token spec term '{term_text}': index must be N, A:B or all")


def parse_spec(text: str | TokenSpec) -> TokenSpec:
    """Parse a token spec such as ``cls[-4:]+patch[-1]``; raise VTError on bad syntax."""
    if isinstance(text, TokenSpec):
        return text
    compact = "".join(str(text).split())
    if not compact:
        raise VTError("empty token spec; try 'cls[-1]', 'cls[-4:]' or 'prelogits'")
    terms = []
    for term_text in compact.split("+"):
        m = _TERM.match(term_text)
        if not m or m.group("kind") not in KINDS:
            raise VTError(
                f"unknown token spec term '{term_text}' in '{text}'; "
                f"use cls[...], patch[...], stage[...], prelogits or logits (see 'vt probe --help')"
            )
        kind, index = m.group("kind"), m.group("index")
        if kind in SINGLE:
            if index not in (None, "0", "-1", "all"):
                raise VTError(f"'{kind}' has a single block; got '{term_text}'")
            terms.append(Term(kind, 0, None, single=True))
        elif index is None:
            raise VTError(f"token spec term '{term_text}' needs a block index, e.g. {kind}[-1]")
        else:
            terms.append(_parse_index(kind, index, term_text))
    return TokenSpec(tuple(terms))


def per_block_specs(available: dict[str, int]) -> list[TokenSpec]:
    """One single-block spec per block of every per-block kind (cls, patch, stage): the per-block curve."""
    specs = []
    for kind in ("cls", "patch", "stage"):
        for block in range(available.get(kind, 0)):
            specs.append(TokenSpec((Term(kind, block, None, single=True),)))
    return specs
