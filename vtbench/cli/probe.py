"""`vt probe`: linear probes and k-NN on cached token ensembles (no forward pass)."""

from __future__ import annotations

from pathlib import Path

import typer

from vtbench.cli.app import app
from vtbench.cli.common import command_from
from vtbench.errors import VTError
from vtbench.transfer.probe import PROBE_OPTIONS


PROBE_HELP = """Train and evaluate probes on cached features: one result per token spec
and protocol, saved to the results store. No forward pass: every spec is read
from the caches made by `vt extract` (train, val if any, test), and several
specs and protocols share one batched run.

Example: vt probe -m deit_small_patch16_224 -d cub -t 'cls[-1]' 'cls[-4:]'

Token specs (quote them in the shell; '+' concatenates terms in order):
  cls\\[-1]             the last block's class token
  cls\\[-4:]            the last four blocks' class tokens, in block order
  cls\\[-4:]+patch\\[-1]  ... plus the last block's mean patch token
  cls\\[3], cls\\[2:6], cls\\[all]   one block, a slice (end excluded), all blocks
  stage\\[-1]           a CNN's last stage, average-pooled
  prelogits           the model's pre-logit feature
  Indices are Python-style: negative ones count from the last block.

Protocols (--protocol, repeatable):
"""


def probe(ctx, **values) -> None:
    from vtbench.options import api_kwargs
    from vtbench.transfer import run_probe
    from vtbench.transfer.probe import PROBE_OPTIONS

    extra = list(ctx.args)
    if extra and values["tokens"] is None:
        raise VTError(f"unexpected argument '{extra[0]}'; token specs go after --tokens")
    values["tokens"] = list(values["tokens"] or []) + extra
    values["protocol"] = values["protocol"] or ["default"]
    values["seeds"] = values["seeds"] or None
    records = run_probe(**api_kwargs(PROBE_OPTIONS, values), log=lambda msg: typer.echo(msg, err=True))
    typer.echo(format_table(records))
    stored = sum(bool(r.get("skipped")) for r in records)
    if stored == len(records):
        typer.echo("nothing to do: every result was already stored (drop --skip-existing to recompute)")
        return
    typer.echo(f"{len(records) - stored} result(s) saved under {Path(records[0]['_path']).parents[3]}"
               + (f"; {stored} already stored" if stored else ""))


def _protocols_help() -> str:
    """One block per registered protocol: its name and summary, wrapped (typer keeps the line breaks)."""
    import textwrap

    from vtbench.protocols import get_protocol, probe_protocols

    lines = []
    for name in probe_protocols():
        text = textwrap.wrap(get_protocol(name).summary, 66)
        lines += [f"  {name:8s} {text[0]}"] + [f"           {more}" for more in text[1:]]
    return "\n".join(lines) + "\n"


command_from(
    app, "probe", PROBE_OPTIONS, probe, takes_ctx=True, help=PROBE_HELP + _protocols_help(),
    short_help="Train and evaluate probes on cached token ensembles (no forward pass); results go to the store.",
    context_settings={"allow_extra_args": True},
)


def format_table(records: list[dict]) -> str:
    """A small fixed-width table: one row per record, its last column from the record's protocol."""
    from vtbench.protocols import describe

    def number(metrics: dict, name: str) -> str:
        return f"{metrics[name]:.2f}" if name in metrics else "—"

    rows = [("protocol", "tokens", "dim", "top1", "top5", "mpc", "selection / note")]
    for rec in records:
        m, protocol = rec.get("metrics", {}), describe(rec["protocol"])
        try:
            note = protocol().table_note(rec) if protocol is not None else ""
        except (KeyError, TypeError):  # a record of another shape (an older vtbench): no note rather than no table
            note = ""
        if rec.get("skipped"):
            note = (note + " " if note else "") + "(stored)"
        rows.append((rec["protocol"] + (f"/{rec['variant']}" if rec.get("variant") else ""), rec["tokens"],
                     str(rec.get("feature_dim", "—")), number(m, "top1"), number(m, "top5"),
                     number(m, "mean_per_class"), note))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
