"""Fine-tuning benchmark: BLEU on a synthetic translation task after a fixed CPU time, from a pretrained tiny model
and from scratch.

    python bench/finetune.py --threads 1                        # 120 s pretraining, 120 s per fine-tune
    python bench/finetune.py --pretrain-time 300 --finetune-time 120 --out runs/bench-ft

The "language" is made by this script from --seed: a vocabulary of source words (consonant-vowel syllables) and a
fixed one-to-one substitution into target words (vowel-consonant syllables). Sentences are 3-6 words drawn with
Zipf-like frequencies; a translation replaces each word by its substitute. A pair fits the `demo` model's context of
64 characters (words of 1-2 syllables, sentences of 3-6 words). The script
1. prepares a character-level data dir of monolingual text in both languages (no aligned pairs) and pretrains the
   `demo`-sized model on it for --pretrain-time seconds;
2. fine-tunes (lmforge finetune, translation records, the same settings) for --finetune-time seconds each:
   (a) from the pretrained run, (b) from an untrained model of the same shape (a weights-only checkpoint);
3. translates --test held-out sentences greedily with each and scores BLEU, chrF and exact match (lmforge eval).
Figures go to OUT/results.json and are printed as a markdown table row for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

import torch

from lmforge.config import RunConfig
from lmforge.data.prepare import prepare
from lmforge.data.tokenizer import Tokenizer
from lmforge.eval.tasks import evaluate_task
from lmforge.model.gpt import GPT
from lmforge.train import checkpoint
from lmforge.train.trainer import finetune, train

FINETUNE = {"optim.lr": 1e-3, "optim.warmup_steps": 20, "train.batch_size": 32, "train.eval_every": 100,
            "train.eval_batches": 4, "train.save_every": 100000, "train.log_every": 20}  # fmt: skip


def make_language(seed: int, n_words: int) -> dict[str, str]:
    """A fixed substitution: source word -> target word, both invented."""
    rng = random.Random(seed)
    consonants, vowels = "bdfgklmnprstvz", "aeiou"

    def words(syllable) -> list[str]:
        found: dict[str, None] = {}
        while len(found) < n_words:
            found["".join(syllable() for _ in range(rng.randint(1, 2)))] = None
        return list(found)

    source = words(lambda: rng.choice(consonants) + rng.choice(vowels))
    target = words(lambda: rng.choice(vowels) + rng.choice(consonants))
    return dict(zip(source, target))


class Sentences:
    def __init__(self, language: dict[str, str], seed: int):
        self.language, self.rng = language, random.Random(seed)
        self.words = list(language)
        self.weights = [1 / (rank + 1) for rank in range(len(self.words))]  # Zipf-like

    def pair(self) -> tuple[str, str]:
        chosen = self.rng.choices(self.words, weights=self.weights, k=self.rng.randint(3, 6))
        return " ".join(chosen), " ".join(self.language[w] for w in chosen)


def write_jsonl(path: Path, pairs: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in pairs), encoding="utf-8")
    return path


def untrained_base(path: Path, like: Path, seed: int) -> Path:
    """A run dir holding a freshly initialised model shaped like `like`'s: fine-tuning from it is training from
    scratch through the same code path."""
    config = RunConfig.load(like / "config.json")
    path.mkdir(parents=True)
    config.save(path / "config.json")
    (path / "tokenizer.json").write_bytes((like / "tokenizer.json").read_bytes())
    torch.manual_seed(seed)
    checkpoint.save(path, 0, GPT(config.model), None, {"tokens": 0}, keep_last=1)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench-finetune")
    parser.add_argument("--pretrain-time", type=float, default=120.0, help="seconds of pretraining (default 120)")
    parser.add_argument("--finetune-time", type=float, default=120.0, help="seconds per fine-tune (default 120)")
    parser.add_argument("--pairs", type=int, default=20000, help="parallel training pairs (default 20000)")
    parser.add_argument("--monolingual", type=int, default=20000, help="pretraining sentences per language")
    parser.add_argument("--test", type=int, default=200, help="held-out sentences to translate (default 200)")
    parser.add_argument("--words", type=int, default=100, help="vocabulary size of the language (default 100)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"{out} exists; remove it or choose another --out")
    out.mkdir(parents=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    language = make_language(args.seed, args.words)
    mono = Sentences(language, args.seed + 1)
    corpus = out / "corpus"
    corpus.mkdir()
    monolingual = [mono.pair() for _ in range(args.monolingual)]
    (corpus / "source.txt").write_text("\n".join(s for s, _ in monolingual) + "\n", encoding="utf-8")
    monolingual = [mono.pair() for _ in range(args.monolingual)]
    (corpus / "target.txt").write_text("\n".join(t for _, t in monolingual) + "\n", encoding="utf-8")
    parallel = Sentences(language, args.seed + 2)
    test_pairs: dict[str, str] = {}
    while len(test_pairs) < args.test:
        source, target = parallel.pair()
        test_pairs[source] = target
    train_pairs = []
    while len(train_pairs) < args.pairs:
        source, target = parallel.pair()
        if source not in test_pairs:
            train_pairs.append((source, target))
    data = write_jsonl(out / "train.jsonl", train_pairs)
    test = write_jsonl(out / "test.jsonl", list(test_pairs.items()))

    prepare([str(corpus)], out / "data", tokenizer="char", progress=False)
    started = time.time()
    pretrained = train(
        str(out / "data"), out / "pretrained", preset="demo", overrides={"train.time": args.pretrain_time},
        progress_bar=False,
    )  # fmt: skip
    print(
        f"pretrained {pretrained['step']} steps in {time.time() - started:.0f}s, val loss {pretrained['val_loss']:.4f}"
    )
    scratch = untrained_base(out / "untrained", out / "pretrained", args.seed)
    missing = set("".join(s + t for s, t in train_pairs)) - set(
        Tokenizer.load(scratch / "tokenizer.json").hf.get_vocab()
    )
    if missing:
        raise SystemExit(f"characters {sorted(missing)} of the pairs are not in the pretraining vocabulary")

    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "pretrain_steps": pretrained["step"],
        "pretrain_val_loss": pretrained["val_loss"],
        "args": vars(args),
    }
    for name, base in (("pretrained", out / "pretrained"), ("scratch", scratch)):
        run = finetune(
            base, data, out / f"ft-{name}", overrides={**FINETUNE, "train.time": args.finetune_time}, progress_bar=False
        )
        scores = evaluate_task(out / f"ft-{name}", test, max_new_tokens=100, batch_size=50)["metrics"]
        results[name] = {"steps": run["step"], "val_loss": run["val_loss"], **{k: scores[k] for k in
                         ("bleu", "chrf", "exact_match")}}  # fmt: skip
        print(f"{name}: {run['step']} steps, BLEU {scores['bleu']:.2f}, chrF {scores['chrf']:.2f}, "
              f"exact match {scores['exact_match']:.1f}%")  # fmt: skip
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    p, s = results["pretrained"], results["scratch"]

    def cell(r: dict) -> str:
        return f"**{r['bleu']:.1f}** / {r['chrf']:.1f} / {r['exact_match']:.0f}% ({r['steps']} steps)"

    print(
        f"| {results['date']} | {results['machine']} | {args.pretrain_time:g} s ({pretrained['step']} steps) "
        f"| {args.finetune_time:g} s | {cell(p)} | {cell(s)} |"
    )


if __name__ == "__main__":
    main()
