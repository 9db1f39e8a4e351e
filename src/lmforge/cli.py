"""The `lmforge` command: prepare, train, generate, demo.

Config flags (`--model.n_layer 6`, `--optim.lr 1e-3`, ...) are generated from the config dataclasses, so the
help lists every field. A user error prints one line, `lmforge: error: ...`, and exits with code 2.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
import warnings
from itertools import zip_longest
from pathlib import Path

from lmforge.config import field_types
from lmforge.errors import LMForgeError
from lmforge.presets import PRESETS

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        raise LMForgeError(f"{message} (see {self.prog} --help)")


def add_prepare(sub) -> None:
    p = sub.add_parser(
        "prepare",
        help="turn text sources into a data dir of token shards",
        description=(
            "Read SOURCEs (text files, folders of .txt/.md, globs, or the named corpora pydocs and tinyshakespeare), "
            "build a tokenizer and write train/val token shards with meta.json into --out."
        ),
    )
    p.add_argument("sources", nargs="+", metavar="SOURCE")
    p.add_argument("--out", required=True, help="the data dir to create")
    p.add_argument("--tokenizer", default="char", help="char, bpe, or a path to a tokenizer.json (default: char)")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size for --tokenizer bpe")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of the text held out for validation")
    p.add_argument("--seed", type=int, default=1337, help="seed of the train/val split")
    p.add_argument("--input", help="local copy of a named corpus (for offline use)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model, or resume the run in --out",
        description=(
            "Train a model on a data dir. Rerunning the same command on an existing --out resumes from its newest "
            "complete checkpoint. Any config field can be set with --SECTION.FIELD VALUE."
        ),
    )
    p.add_argument("--data", help="data dir made by lmforge prepare (required for a new run)")
    p.add_argument("--out", required=True, help="run dir: config, checkpoints, metrics.jsonl, loss.png")
    p.add_argument("--preset", choices=sorted(PRESETS), help="starting config (default: demo)")
    p.add_argument("--config", help="JSON config file of {section: {field: value}} applied over the preset")
    p.add_argument("--max-steps", help="same as --train.max_steps")
    p.add_argument("--time", help="wall-clock budget such as 90s, 5m or 1h (same as --train.time)")
    p.add_argument("--seed", help="same as --train.seed")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, kind in field_types().items():
        if "." not in name:
            continue
        section = name.split(".")[0]
        group = groups.setdefault(section, p.add_argument_group(f"{section} config"))
        metavar = {bool: "BOOL", int: "INT", float: "NUM"}.get(kind, "STR")
        group.add_argument(f"--{name}", dest=name, metavar=metavar, default=argparse.SUPPRESS)


def add_generate(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text from a trained run, streaming",
        description=("Continue a prompt with the newest checkpoint of RUN_DIR, printing tokens as they are made."),
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--device", default="cpu")


def add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="prepare the built-in corpus, train a small model, show samples",
        description=(
            "Prepare the built-in pydocs corpus at character level, train the demo model for --minutes on this "
            "machine, and print samples of the untrained and trained model side by side."
        ),
    )
    p.add_argument("--minutes", type=float, default=2.0, help="training time (default: 2)")
    p.add_argument("--out", default="runs/demo", help="folder for the data dir and the run dirs")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> Parser:
    parser = Parser(prog="lmforge", description="Raw text to a trained transformer language model, and back.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for add in (add_prepare, add_train, add_generate, add_demo):
        add(sub)
    return parser


def cmd_prepare(args) -> None:
    from lmforge.data.prepare import prepare, summary

    meta = prepare(
        args.sources,
        args.out,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        seed=args.seed,
        input=args.input,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    print(summary(meta, args.out))


def train_overrides(args) -> dict:
    overrides = {name: value for name, value in vars(args).items() if "." in name}
    for flag, field in (("max_steps", "train.max_steps"), ("time", "train.time"), ("seed", "train.seed")):
        if getattr(args, flag) is not None:
            overrides[field] = getattr(args, flag)
    return overrides


def cmd_train(args) -> None:
    from lmforge.train.trainer import train

    result = train(
        args.data,
        args.out,
        preset=args.preset,
        config_file=args.config,
        overrides=train_overrides(args),
        progress_bar=not args.quiet,
    )
    if result["rank"] == 0:
        print_result(result)


def print_result(result: dict) -> None:
    val = f", val loss {result['val_loss']:.4f}" if result.get("val_loss") is not None else ""
    print(
        f"done: {result['step']} steps, {result['tokens']:,} tokens in {result['elapsed']:.0f}s "
        f"({result['tokens_per_s']:,.0f} tokens/s); train loss {result['train_loss']:.4f}{val}"
    )
    print(f"run dir:    {result['run_dir']}")
    print(f"checkpoint: {result['checkpoint']}")
    print(f"loss plot:  {result['plot']}")


def cmd_generate(args) -> None:
    from lmforge.api import LM

    lm = LM.load(args.run_dir, device=args.device)
    if args.num_samples < 1:
        raise LMForgeError(f"--num-samples must be at least 1, not {args.num_samples}")
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---", flush=True)
        seed = None if args.seed is None else args.seed + i
        sys.stdout.write(args.prompt)
        for piece in lm.stream(args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, seed):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")


def side_by_side(left: str, right: str, titles=("untrained", "trained"), width: int = 50) -> str:
    def lines(text: str) -> list[str]:
        out: list[str] = []
        for line in text.splitlines() or [""]:
            out.extend(textwrap.wrap(line, width, replace_whitespace=False, drop_whitespace=False) or [""])
        return out

    rows = [f"{titles[0]:<{width}} | {titles[1]}", f"{'-' * width}-+-{'-' * width}"]
    for a, b in zip_longest(lines(left), lines(right), fillvalue=""):
        rows.append(f"{a:<{width}} | {b}")
    return "\n".join(rows)


def cmd_demo(args) -> None:
    from lmforge.api import LM
    from lmforge.config import RunConfig
    from lmforge.data.prepare import load_meta, prepare, summary
    from lmforge.train.trainer import train

    if not args.minutes > 0:
        raise LMForgeError(f"--minutes must be positive, not {args.minutes}")
    out = Path(args.out)
    data = out / "data"
    if (data / "meta.json").is_file():
        print(f"using the prepared corpus in {data}")
        load_meta(data)
    else:
        print("preparing the built-in corpus (the Python reference docs, character level)")
        print(summary(prepare(["pydocs"], data, tokenizer="char", progress=not args.quiet), data))
    run = out / time.strftime("run-%Y%m%d-%H%M%S")
    print(f"training the demo model for {args.minutes:g} minute(s) into {run}")
    result = train(
        str(data), run, preset="demo", overrides={"train.time": args.minutes * 60}, progress_bar=not args.quiet
    )
    trained = LM.load(run)
    untrained = LM.untrained(RunConfig.load(run / "config.json"), trained.tokenizer)
    prompt = "The "
    options = {"max_new_tokens": 300, "temperature": 0.8, "seed": 0}
    print()
    print(
        side_by_side(prompt + untrained.generate(prompt, **options)[0], prompt + trained.generate(prompt, **options)[0])
    )
    print()
    print_result(result)
    print(f"generate more: lmforge generate {run} --prompt 'The '")


COMMANDS = {"prepare": cmd_prepare, "train": cmd_train, "generate": cmd_generate, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = lambda message, category, *rest: f"lmforge: warning: {message}\n"
    try:
        args = build_parser().parse_args(argv)
        COMMANDS[args.command](args)
    except LMForgeError as exc:
        print(f"lmforge: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\nlmforge: interrupted; a run resumes from its newest checkpoint with the same command", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
