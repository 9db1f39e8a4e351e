"""Speedrun: the classic recipe against the time-budget default, on one corpus, in one invocation.

    python bench/speedrun.py ../shared/data/tinyshakespeare.txt --time 120

Prepares CORPUS at character level (no cleaning: the text as it is; first 90% train, last 10% held out), then
trains, one after the other on the same machine:

- classic: the `demo` preset (nanoGPT's CPU recipe: 4 layers x 128, 4 heads, context 64, batch 12, AdamW 1e-3,
  cosine), for --time seconds of training;
- default: `lmforge train --time` with no preset or size flags (presets.for_time_budget sizes it for this
  machine), for the same seconds.

Each run evaluates on the whole held-out split every --time / --evals seconds of training (evaluations pause the
clock, so they take nothing from the budget) and once more at the end. Printed per recipe: the held-out loss at
the budget, training tokens/s, and for the default, the seconds of training it needed to reach the classic
recipe's final loss (linear between the two evaluations around the crossing). --recipes runs a subset, and
--set FIELD=VALUE adds overrides to the default (e.g. to try a change against the classic recipe).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from lmforge.data.clean import CleanConfig
from lmforge.data.prepare import prepare
from lmforge.train.log import read_metrics
from lmforge.train.trainer import train

RECIPES = {"classic": "demo", "default": None}  # recipe -> preset (None: the time-budget rule)


def run_recipe(name: str, data: Path, work: Path, seconds: float, evals: int, extra: dict) -> dict:
    said: list[str] = []
    overrides = {
        "train.time": seconds,
        "train.eval_interval": seconds / evals,
        "train.eval_batches": 0,  # the whole held-out split, at every evaluation
        "train.save_every": 10**9,
        **(extra if name == "default" else {}),
    }
    run = work / f"{name}-{time.strftime('%H%M%S')}"
    result = train(str(data), run, preset=RECIPES[name], overrides=overrides, progress_bar=False, echo=said.append)
    curve = [(r["elapsed"], r["val_loss"]) for r in read_metrics(run) if "val_loss" in r]
    config = json.loads((run / "config.json").read_text())
    model, optim = config["model"], config["optim"]
    return {
        "recipe": name,
        "model": f"{model['n_layer']} x {model['n_embd']}, {model['n_head']} heads, context {model['seq_len']}",
        "optimizer": f"{optim['name']} lr {optim['lr']:g} {optim['schedule']}",
        "batch": config["train"]["batch_size"],
        "precision": next((line.rsplit("; ", 1)[-1] for line in said if line.startswith("batch:")), ""),
        "steps": result["step"],
        "train_tokens_per_s": round(result["tokens"] / max(result["elapsed"], 1e-9)),
        "val_loss": round(curve[-1][1], 4),
        "curve": [(round(t, 2), round(v, 4)) for t, v in curve],
        "said": [line for line in said if line.startswith("time budget:")],
    }


def seconds_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """The training time at which the eval curve first reaches target, linear between evaluations."""
    previous = (0.0, float("inf"))
    for t, loss in curve:
        if loss <= target:
            (t0, l0) = previous
            if l0 == float("inf"):
                return t
            return t0 + (t - t0) * (l0 - target) / (l0 - loss)
        previous = (t, loss)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", help="a text file")
    parser.add_argument("--time", type=float, default=120.0, help="training budget in seconds")
    parser.add_argument("--evals", type=int, default=24, help="evaluations over the budget")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="overrides for the default")
    parser.add_argument("--out", help="work folder (default: a temporary one)")
    args = parser.parse_args()

    work = Path(args.out or tempfile.mkdtemp(prefix="lmforge-speedrun-"))
    data = work / f"data-{Path(args.corpus).stem}"
    if not (data / "meta.json").exists():
        prepare([args.corpus], data, tokenizer="char", progress=False, clean=CleanConfig.off())
    extra = dict(item.split("=", 1) for item in args.set)
    results = {name: run_recipe(name, data, work, args.time, args.evals, extra) for name in args.recipes}
    if "classic" in results and "default" in results:
        target = results["classic"]["val_loss"]
        reached = seconds_to_reach(results["default"]["curve"], target)
        results["default"]["seconds_to_classic_loss"] = None if reached is None else round(reached, 1)
        results["default"]["loss_below_classic"] = round(target - results["default"]["val_loss"], 4)
    report = {
        "corpus": Path(args.corpus).name,
        "time_budget_s": args.time,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "results": results,
    }
    print(json.dumps(report, indent=1))
    for name, r in results.items():
        extra_text = ""
        if "seconds_to_classic_loss" in r:
            reached, below = r["seconds_to_classic_loss"], r["loss_below_classic"]
            extra_text = f"; classic's final loss after {reached} s of training, {below:+.4f} below it at the end"
        print(f"{name}: val loss {r['val_loss']:.4f}, {r['train_tokens_per_s']:,} tokens/s, {r['steps']} steps, "
              f"{r['model']}, batch {r['batch']}, {r['optimizer']}, {r['precision']}{extra_text}")  # fmt: skip


if __name__ == "__main__":
    main()
