"""Recipe ablations at a fixed training time: one change at a time against a base recipe, each the mean of seeds.

    python bench/ablate.py ../shared/data/tinyshakespeare.txt --budget 120 --seeds 2 --variants classic lr3e-3 muon
    python bench/ablate.py CORPUS --budget 120 --mode steps --jobs 2 --variants classic +relu2 +rope --base classic

Each variant is a set of config overrides (and, for the few ideas that are not lmforge options, a patch applied
in the process that trains it: `PATCHES`). A run trains for --budget seconds and is then scored on the whole val
split, which is not part of the budget. Two modes:

- time: a real `--time` run, one at a time: the machine must be quiet while it runs.
- steps: each variant's steps/s is measured once (a --calibrate seconds run, all threads, its faster 10-step
  windows), and its runs train for budget x steps/s steps, the schedule following the steps. A run's loss then
  depends on the steps only, not on the machine's load while it trains, so --jobs runs go at once (one core and
  one thread each) and other work may share the machine; the calibration is best on a quiet one.

Results go to --out/results.jsonl as they come (a rerun skips what is there) and a table is printed at the end:
per variant the mean held-out loss, its spread, steps and tokens/s, and the difference to --base.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# A variant: "name" -> overrides. A name of "+a+b" (or "classic+a+b") stacks known variants on the base recipe.
# "default" is the time-budget rule's choice for --budget on this machine (presets.for_time_budget), so
# "default+adamw" tries one change against the new default as "+muon" does against the classic recipe.
CLASSIC = {"preset": "demo"}  # nanoGPT's CPU recipe: 4 x 128, context 64, batch 12, AdamW 1e-3, cosine
VARIANTS: dict[str, dict] = {
    "classic": {},
    "default": {},  # default_recipe()
    # against the default: its optimizer, schedule, shape and batch
    "adamw": {"optim.name": "adamw"},
    "adamw3e-3": {"optim.name": "adamw", "optim.lr": 3e-3},
    "cosine": {"optim.schedule": "cosine", "optim.min_lr_ratio": 0.1},
    "depth1": {"model.n_layer": 1, "model.n_embd": 64, "model.n_head": 1},
    "depth3": {"model.n_layer": 3, "model.n_embd": 192, "model.n_head": 3},
    "depth4": {"model.n_layer": 4, "model.n_embd": 256, "model.n_head": 4},
    "b8": {"train.batch_size": 8},
    "b16": {"train.batch_size": 16},
    "b32": {"train.batch_size": 32},
    "b64": {"train.batch_size": 64},
    "b128": {"train.batch_size": 128},
    "seq128": {"model.seq_len": 128},
    "heads4": {"model.n_head": 4},
    "muon2e-3": {"optim.name": "muon", "optim.lr": 2e-3},
    "muon5e-3": {"optim.name": "muon", "optim.lr": 5e-3},
    "muon2e-2": {"optim.name": "muon", "optim.lr": 2e-2},
    "wd0.3": {"optim.weight_decay": 0.3},
    "drop0.1": {"model.dropout": 0.1},
    "drop0.2": {"model.dropout": 0.2},
    # optimizer, learning rate, schedule, warmup
    "lr2e-3": {"optim.lr": 2e-3},
    "lr3e-3": {"optim.lr": 3e-3},
    "lr5e-3": {"optim.lr": 5e-3},
    "wsd": {"optim.schedule": "wsd", "optim.decay_fraction": 0.4, "optim.min_lr_ratio": 0.0},
    "linear0": {"optim.schedule": "linear", "optim.min_lr_ratio": 0.0},
    "warmup20": {"optim.warmup_steps": 20},
    "muon": {"optim.name": "muon"},
    "muon3e-3": {"optim.name": "muon", "optim.lr": 3e-3},
    "muon1e-2": {"optim.name": "muon", "optim.lr": 1e-2},
    "wd0": {"optim.weight_decay": 0.0},
    "beta2-95": {"optim.beta2": 0.95},
    # batch, context, width, depth
    "batch6": {"train.batch_size": 6},
    "batch24": {"train.batch_size": 24},
    "batch48": {"train.batch_size": 48},
    "ctx128": {"model.seq_len": 128, "train.batch_size": 6},
    "ctx128b12": {"model.seq_len": 128},
    "ctx256": {"model.seq_len": 256, "train.batch_size": 3},
    "ctx32": {"model.seq_len": 32, "train.batch_size": 24},
    "w96": {"model.n_embd": 96, "model.n_head": 3},
    "w192": {"model.n_embd": 192, "model.n_head": 3},
    "w256": {"model.n_embd": 256, "model.n_head": 4},
    "d2": {"model.n_layer": 2},
    "d3": {"model.n_layer": 3},
    "d6": {"model.n_layer": 6},
    # architecture
    "rope": {"model.pos_emb": "rope"},
    "relu2": {"model.mlp": "relu2"},
    "swiglu": {"model.mlp": "swiglu"},
    "rmsnorm": {"model.norm": "rmsnorm", "model.bias": False},
    "nobias": {"model.bias": False},
    "qknorm": {"model.qk_norm": True},
    "untied": {"model.tie_embeddings": False},
    "zeroinit": {},  # PATCHES
    "softcap": {},  # PATCHES
    "heads2": {"model.n_head": 2},
    "heads8": {"model.n_head": 8},
    # loop
    "random-order": {"train.order": "random"},
    "bf16": {"train.precision": "bf16"},
    "fp32": {"train.precision": "fp32"},
    "compile": {"train.compile": True},
    "noclip": {"optim.grad_clip": 0.0},
}


def patch_zeroinit() -> None:
    """Output projections (o_proj, down_proj) start at zero (modded-nanogpt): every block starts as the identity."""
    from lmforge.model import gpt

    init = gpt.GPT.init_weights

    def zero_projections(self):
        init(self)
        for name, param in self.named_parameters():
            if name.endswith("o_proj.weight") or name.endswith("down_proj.weight"):
                param.data.zero_()

    gpt.GPT.init_weights = zero_projections


def patch_softcap(cap: float = 15.0) -> None:
    """Logits squashed to (-cap, cap) by cap * tanh(logits / cap) before the loss (Gemma 2, modded-nanogpt)."""
    import torch

    from lmforge.model import gpt

    head = gpt.GPT.__init__

    def capped_init(self, config):
        head(self, config)
        linear = self.lm_head
        original = linear.forward
        linear.forward = lambda x: cap * torch.tanh(original(x) / cap)

    gpt.GPT.__init__ = capped_init


PATCHES = {"zeroinit": patch_zeroinit, "softcap": patch_softcap}


def default_recipe(data: Path, budget: float) -> dict:
    """What `lmforge train --time BUDGET` would choose on this machine for this data dir, as overrides. Kept in
    the work folder (default-BUDGET.json) the first time, so every run of one ablation has the same default even
    when the rule changes meanwhile: delete the file to take the current rule's choice."""
    import torch

    from lmforge import hardware, presets
    from lmforge.data.tokenizer import Tokenizer

    kept = Path(data).parent / f"default-{budget:g}.json"
    if kept.is_file():
        return json.loads(kept.read_text())
    cpu = torch.device("cpu")
    precision = hardware.auto_precision(cpu)
    vocab_size = Tokenizer.load(Path(data) / "tokenizer.json").vocab_size
    rule, _ = presets.for_time_budget(budget, hardware.speed(cpu).peak(precision), "cpu", vocab_size,
                                      hardware.memory_bytes(cpu), precision)  # fmt: skip
    recipe = {**rule, "train.eval_interval": 0.0}
    kept.write_text(json.dumps(recipe, indent=1))
    return recipe


def resolve(name: str, base: str, data: Path | None = None, budget: float = 0.0) -> tuple[dict, list[str]]:
    """(overrides, patches) of a variant name; "+a+b" stacks a and b on the base, "x+a" on variant x."""
    parts = [p for p in name.split("+")]
    first = parts[0] or base
    overrides, patches = {}, []
    for part in [first, *parts[1:]]:
        if part not in VARIANTS:
            raise SystemExit(f"unknown variant {part!r}; known: {', '.join(VARIANTS)}")
        overrides.update(default_recipe(data, budget) if part == "default" else VARIANTS[part])
        patches += [part] if part in PATCHES else []
    return overrides, patches


def prepared(corpus: str, work: Path) -> Path:
    from lmforge.data.clean import CleanConfig
    from lmforge.data.prepare import prepare

    data = work / f"data-{Path(corpus).stem}"
    if not (data / "meta.json").exists():
        prepare([corpus], data, tokenizer="char", progress=False, clean=CleanConfig.off())
    return data


def run_one(args) -> None:
    """In its own process: apply patches, pin to a core, train, score on the whole val split, print one JSON line."""
    import torch

    from lmforge.api import LM
    from lmforge.data.loader import DataDir
    from lmforge.eval.lm import evaluate
    from lmforge.train.log import read_metrics
    from lmforge.train.trainer import train

    if args.core is not None:
        os.sched_setaffinity(0, {args.core})
    overrides, patches = resolve(args.variant, args.base, args.data, args.budget)
    for name in patches:
        PATCHES[name]()
    preset = overrides.pop("preset", CLASSIC["preset"])
    overrides.update({"train.seed": args.seed, "train.save_every": 10**9, "train.eval_every": 10**9,
                      "train.log_every": 10})  # fmt: skip
    if args.steps:
        overrides.update({"train.max_steps": args.steps, "train.time": 0})
    else:
        overrides.update({"train.max_steps": 0, "train.time": args.seconds})
    if args.threads:
        overrides["train.threads"] = args.threads
    run = Path(tempfile.mkdtemp(prefix="ablate-", dir=args.work))
    began = time.time()
    result = train(str(args.data), run, preset=preset, overrides=overrides, progress_bar=False, echo=lambda *a: None)
    wall = time.time() - began
    lm = LM.load(run)
    full = evaluate(lm.model, DataDir(args.data).eval_batches(lm.config.model.seq_len, 64), torch.device("cpu"))
    # steps/s after the first quarter of the run (the first steps warm allocators and kernels up), from the faster
    # quarter of its 10-step windows: another process on the machine only ever slows a window down, and with
    # OpenMP threads waiting at barriers for a descheduled one, it slows some windows many times over
    logged = [(r["elapsed"], r["step"]) for r in read_metrics(run) if "elapsed" in r and "loss" in r]
    warm = [(t, s) for t, s in logged if t >= logged[-1][0] / 4] or logged
    per_step = sorted((t1 - t0) / (s1 - s0) for (t0, s0), (t1, s1) in zip(warm, warm[1:]) if s1 > s0)
    rate = 1 / max(statistics.quantiles(per_step, n=4)[0], 1e-9) if len(per_step) >= 4 else 0.0
    record = {"variant": args.variant, "seed": args.seed, "steps": result["step"], "tokens": result["tokens"],
              "train_seconds": round(result["elapsed"], 2), "wall_seconds": round(wall, 2), "steps_per_s": rate,
              "params": result["params"], "val_loss": round(full["val_loss"], 5),
              "train_loss": round(result["train_loss"], 5)}  # fmt: skip
    print(json.dumps(record))


def child(args, variant: str, seed: int, *, steps: int = 0, seconds: float = 0.0, core=None, threads=0):
    command = [sys.executable, __file__, "one", "--data", str(args.data), "--work", str(args.work), "--variant",
               variant, "--seed", str(seed), "--base", args.base, "--steps", str(steps), "--seconds", str(seconds),
               "--budget", str(args.budget),
               "--threads", str(threads)] + (["--core", str(core)] if core is not None else [])  # fmt: skip
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(proc) -> dict:
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"a run failed:\n{err[-2000:]}")
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", nargs="?")
    parser.add_argument("--variants", nargs="+", default=["classic"])
    parser.add_argument("--base", default="classic", help="the variant '+x' names stack on, and the table compares to")
    parser.add_argument("--budget", type=float, default=120.0, help="training seconds per run")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--mode", choices=["time", "steps"], default="time")
    parser.add_argument("--jobs", type=int, default=1, help="steps mode: runs at once, one core each")
    parser.add_argument("--calibrate", type=float, default=10.0, help="steps mode: seconds to measure steps/s")
    parser.add_argument("--out", default="ablate-out", help="folder for results.jsonl and the work files")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.work = out / "work"
    args.work.mkdir(exist_ok=True)
    args.data = prepared(args.corpus, out)
    results_file = out / "results.jsonl"
    done = [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.exists() else []
    tag = {"corpus": Path(args.corpus).name, "budget": args.budget, "mode": args.mode}
    have = {(r["variant"], r["seed"]) for r in done if all(r.get(k) == v for k, v in tag.items())}
    todo = [(v, s) for v in args.variants for s in range(args.seeds) if (v, s) not in have]
    speeds: dict[str, float] = {}
    if args.mode == "steps":
        calibrations = out / "speeds.json"
        speeds = json.loads(calibrations.read_text()) if calibrations.exists() else {}
        for variant in dict.fromkeys(v for v, _ in todo):
            if variant not in speeds:  # one at a time, all threads: the speed a real run would have
                speeds[variant] = finish(child(args, variant, 0, seconds=args.calibrate))["steps_per_s"]
                calibrations.write_text(json.dumps(speeds, indent=1))
                print(f"calibrated {variant}: {speeds[variant]:.1f} steps/s", flush=True)
    running: list = []
    cores = list(range(os.cpu_count() or 1))
    while todo or running:
        while todo and len(running) < (args.jobs if args.mode == "steps" else 1):
            variant, seed = todo.pop(0)
            free = [c for c in cores if c not in {core for *_, core in running}]
            if args.mode == "steps":
                steps = max(1, round(args.budget * speeds[variant]))
                running.append((child(args, variant, seed, steps=steps, core=free[0], threads=1), free[0]))
            else:
                running.append((child(args, variant, seed, seconds=args.budget), None))
        proc, _ = running.pop(0)
        record = {**finish(proc), **tag}
        if args.mode == "steps":
            record["tokens_per_s"] = round(record["tokens"] / args.budget)
        else:
            record["tokens_per_s"] = round(record["tokens"] / record["train_seconds"])
        done.append(record)
        with results_file.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"{record['variant']:>24} seed {record['seed']}: val {record['val_loss']:.4f} "
              f"({record['steps']} steps, {record['tokens_per_s']:,} tok/s)", flush=True)  # fmt: skip
    table(done, tag, args.variants, args.base)


def table(results: list[dict], tag: dict, variants: list[str], base: str) -> None:
    rows = {}
    for variant in variants:
        runs = [r for r in results if r["variant"] == variant and all(r.get(k) == v for k, v in tag.items())]
        if runs:
            losses = [r["val_loss"] for r in runs]
            steps, rate = statistics.mean(r["steps"] for r in runs), statistics.mean(r["tokens_per_s"] for r in runs)
            rows[variant] = (statistics.mean(losses), max(losses) - min(losses), len(runs), steps, rate)
    reference = rows.get(base, (None,))[0]
    print(f"\n{tag['corpus']}, {tag['budget']:g} s, {tag['mode']} mode")
    print("| variant | val loss | spread | seeds | steps | tokens/s | vs base |\n|---|---|---|---|---|---|---|")
    for variant, (loss, spread, n, steps, rate) in rows.items():
        delta = f"{loss - reference:+.4f}" if reference is not None else ""
        print(f"| {variant} | {loss:.4f} | {spread:.4f} | {n} | {steps:.0f} | {rate:,.0f} | {delta} |")


def one() -> None:
    parser = argparse.ArgumentParser()
    for flag in ("--data", "--work", "--variant", "--base"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--steps", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=0.0)
    parser.add_argument("--budget", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--core", type=int)
    args = parser.parse_args(sys.argv[2:])
    args.data = Path(args.data)
    run_one(args)


if __name__ == "__main__":
    one() if sys.argv[1:2] == ["one"] else main()
