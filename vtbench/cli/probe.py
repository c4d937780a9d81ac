"""`vt probe`: linear probes and k-NN on cached token ensembles (no forward pass)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from vtbench.cli.app import app
from vtbench.cli.common import MultiValueCommand
from vtbench.errors import VTError


class _ProbeCommand(MultiValueCommand):
    multi_value = ("--tokens", "-t", "--protocol", "-p", "--seeds")

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
  default  logistic regression on standardised features; L2 strength chosen
           on the validation split (official, else a seeded stratified 20% of
           train) from a 17-value log grid (1e-6 to 100); refit on train+val; test
  sklearn  the same with scikit-learn's LogisticRegression (reference)
  ipvit    the paper's head: AdamW lr 5e-4, wd 0.05, 10 epochs, batch 256,
           on the paper's train splits; last epoch and max over epochs
           (the max peeks at test, as the paper did)
  knn      k-NN, cosine, DINO's exp(sim/0.07) votes, k in {10,20,100,200}
           chosen on the validation split
"""


@app.command(
    cls=_ProbeCommand,
    help=PROBE_HELP,
    short_help="Train and evaluate probes on cached token ensembles (no forward pass); results go to the store.",
    context_settings={"allow_extra_args": True},
)
def probe(
    ctx: typer.Context,
    model: str = typer.Option(..., "--model", "-m", help="timm model name, as given to `vt extract`."),
    dataset: str = typer.Option(..., "--dataset", "-d", help="Dataset spec, as given to `vt extract`."),
    tokens: Optional[List[str]] = typer.Option(
        None, "--tokens", "-t", help="Token spec(s): --tokens 'cls[-1]' 'cls[-4:]' (or repeat --tokens)."),
    protocol: Optional[List[str]] = typer.Option(
        None, "--protocol", "-p", help="default, sklearn, ipvit or knn; repeat for several (default: default)."),
    per_block: bool = typer.Option(False, "--per-block", help="Also probe every block's cls and patch (or stage) token alone."),
    seed: int = typer.Option(0, help="Seed for the held-out validation split, ipvit's init and shuffling."),
    seeds: Optional[List[int]] = typer.Option(None, "--seeds", help="Several seeds, one result each: --seeds 0 1 2 (the leaderboard shows their mean ± std)."),
    weights: Optional[str] = typer.Option(None, help="Pick the caches whose weights sha256 starts with, or whose source contains, this."),
    transform: Optional[str] = typer.Option(None, help="Pick the caches extracted with this transform (model or ipvit)."),
    norm: Optional[bool] = typer.Option(None, "--norm/--no-norm", help="Pick the caches with (or without) the final norm on every block."),
    root: Optional[Path] = typer.Option(None, "--root", help="Pick the caches extracted from this dataset root (as given to `vt extract --root`)."),
    standardize: bool = typer.Option(True, "--standardize/--no-standardize", help="default/sklearn: standardise features with train statistics."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Feature-cache directory (default: $VT_CACHE)."),
    results: Optional[Path] = typer.Option(None, "--results", help="Results directory (default: $VT_RESULTS, else ./results)."),
    skip_existing: bool = typer.Option(False, "--skip-existing", help="Skip specs whose result is already stored."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, ..."),
) -> None:
    from vtbench.transfer import run_probe

    extra = list(ctx.args)
    if extra and tokens is None:
        raise VTError(f"unexpected argument '{extra[0]}'; token specs go after --tokens")
    records = run_probe(
        model, dataset, list(tokens or []) + extra, protocol or ["default"],
        seed=seed, seeds=seeds or None, per_block=per_block, data_root=root, cache_dir=cache_dir, results_dir=results, weights=weights,
        transform=transform, norm=norm, skip_existing=skip_existing, device=device, standardize=standardize,
        log=lambda msg: typer.echo(msg, err=True),
    )
    if not records:
        typer.echo("nothing to do: every result already exists (drop --skip-existing to recompute)")
        return
    typer.echo(format_table(records))
    typer.echo(f"{len(records)} result(s) saved under {Path(records[0]['_path']).parents[3]}")


def format_table(records: list[dict]) -> str:
    """A small fixed-width table: one row per record."""
    from vtbench.results import convergence_note

    rows = [("protocol", "tokens", "dim", "top1", "top5", "mpc", "selection / note")]
    for rec in records:
        m, sel = rec["metrics"], rec.get("selection", {})
        if rec["protocol"] == "ipvit":
            note = f"max over epochs {m['top1_max_over_epochs']:.1f} (epoch {m['best_epoch']})"
        elif rec["protocol"] == "knn":
            note = f"k={sel['chosen']} ({rec['solver']['backend']})"
        else:
            problems = convergence_note(rec)
            note = f"l2={sel['chosen']:g}" + (f" ({problems})" if problems else "")
        rows.append((rec["protocol"] + (f"/{rec['variant']}" if rec.get("variant") else ""), rec["tokens"],
                     str(rec["feature_dim"]), f"{m['top1']:.2f}", f"{m['top5']:.2f}", f"{m['mean_per_class']:.2f}", note))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
