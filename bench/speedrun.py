"""Speedrun: char-level CORPUS -> demo model trained for --time seconds -> val loss on the whole val split.

    python bench/speedrun.py ../shared/data/tinyshakespeare.txt --time 120

Prints the val loss (nats/token) over every val token and the training throughput in tokens/s.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from lmforge.api import LM
from lmforge.data.clean import CleanConfig
from lmforge.data.loader import DataDir
from lmforge.data.prepare import prepare
from lmforge.eval.lm import evaluate
from lmforge.train.trainer import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", help="a text file")
    parser.add_argument("--time", type=float, default=120.0, help="training budget in seconds")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="config overrides")
    parser.add_argument("--out", help="work folder (default: a temporary one)")
    args = parser.parse_args()

    work = Path(args.out or tempfile.mkdtemp(prefix="lmforge-speedrun-"))
    data = work / "data"
    if not (data / "meta.json").exists():
        # The standard benchmark text, as it is: no cleaning, so the figure compares with other tools'.
        prepare([args.corpus], data, tokenizer="char", progress=False, clean=CleanConfig.off())
    overrides = {"train.time": args.time}
    overrides.update(dict(item.split("=", 1) for item in args.set))
    run = work / time.strftime("run-%H%M%S")
    result = train(str(data), run, preset=args.preset, overrides=overrides, progress_bar=False, echo=print)
    lm = LM.load(run)
    data_dir = DataDir(data)
    full = evaluate(lm.model, data_dir.eval_batches(lm.config.model.seq_len, 64), torch.device("cpu"))
    report = {
        "corpus": Path(args.corpus).name,
        "preset": args.preset,
        "overrides": overrides,
        "time_budget_s": args.time,
        "steps": result["step"],
        "train_tokens": result["tokens"],
        "train_tokens_per_s": round(result["tokens_per_s"]),
        "val_loss_full": round(full["val_loss"], 4),
        "val_tokens": full["val_tokens"],
        "params": result["params"],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
