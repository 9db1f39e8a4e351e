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
            "Read SOURCEs (text files; JSONL, plain, .gz or .zst; Parquet; folders and globs of these; hf:NAME"
            "[:CONFIG][@SPLIT] or a saved dataset folder; - for stdin; the named corpora pydocs and tinyshakespeare), "
            "clean and deduplicate the documents, build a tokenizer and write train/val token shards with meta.json "
            "into --out. Every cleaning rule is on by default except --strip-html, and each is counted."
        ),
    )
    p.add_argument("sources", nargs="+", metavar="SOURCE")
    p.add_argument("--out", required=True, help="the data dir to create")
    p.add_argument(
        "--tokenizer",
        default="char",
        help="char, bpe, or a tokenizer.json, a folder holding one, or a SentencePiece .model (default: char)",
    )
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size for --tokenizer bpe")
    p.add_argument(
        "--tokenizer-sample-bytes",
        type=_byte_size,
        help="train BPE on this much text from the start of the corpus, e.g. 200M; 0 for all (default: 100M)",
    )
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of the text held out for validation")
    p.add_argument("--seed", type=int, default=1337, help="seed of the train/val split")
    p.add_argument("--text-field", default="text", help="JSONL/Parquet/dataset field of the text; a.b for nested")
    p.add_argument("--stdin-format", choices=["text", "jsonl"], default="text", help="what - reads (default: text)")
    p.add_argument("--workers", type=int, default=1, help="encoding processes, 0 for one per CPU; same output")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file")
    p.add_argument("--input", help="local copy of a named corpus (for offline use)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    c = p.add_argument_group("cleaning (each rule is counted in meta.json and the summary)")
    c.add_argument("--normalize", choices=["NFC", "NFKC", "none"], default="NFC", help="Unicode form (default NFC)")
    c.add_argument("--keep-newlines", action="store_true", help="do not turn CRLF and CR into LF")
    c.add_argument("--keep-control", action="store_true", help="keep control and format characters")
    c.add_argument("--keep-spaces", action="store_true", help="keep runs of spaces and trailing spaces")
    c.add_argument("--keep-blank-lines", action="store_true", help="keep runs of blank lines")
    c.add_argument("--strip-html", action="store_true", help="remove HTML tags, scripts and styles; unescape entities")
    c.add_argument("--no-clean", action="store_true", help="turn every rule, filter and deduplication off")
    c.add_argument("--min-chars", type=int, default=0, help="drop documents shorter than this after cleaning")
    c.add_argument("--max-chars", type=int, default=0, help="drop documents longer than this (0: no limit)")
    c.add_argument("--no-dedup", action="store_true", help="keep exact duplicate documents")
    c.add_argument(
        "--on-invalid",
        choices=["replace", "skip", "error"],
        default="replace",
        help="invalid UTF-8: replace by U+FFFD and count, skip the document, or stop (default: replace)",
    )
    c.add_argument(
        "--on-error",
        choices=["skip", "error"],
        default="error",
        help="a malformed JSONL line or unreadable file: skip and count, or stop (default: error)",
    )


def _byte_size(value: str) -> int:
    """200M, 1.5G, 64k or a plain number of bytes."""
    units = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
    text = value.strip().lower().removesuffix("b")
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a size such as 200M or 1G") from None


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
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="starting config (default: with --time and no --max-steps, a model and recipe sized for the budget "
        "on this machine, said at the start; else demo)",
    )
    p.add_argument("--config", help="JSON config file of {section: {field: value}} applied over the preset")
    p.add_argument("--depth", type=int, help="one size dial: layers; width, heads, lr, batch and steps follow")
    p.add_argument("--objective", choices=["clm", "mlm"], help="same as --train.objective")
    p.add_argument("--max-steps", help="same as --train.max_steps")
    p.add_argument("--time", help="wall-clock budget such as 90s, 5m or 1h (same as --train.time)")
    p.add_argument("--seed", help="same as --train.seed")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_flags(p, skip=lambda name: name.split(".")[0] in ("finetune", "lora"))  # those are lmforge finetune's


def add_config_flags(p, skip=lambda name: False, aliases: dict[str, list[str]] | None = None) -> None:
    """A --SECTION.FIELD flag for every config field (and --section.field-name), grouped by section."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, kind in field_types().items():
        if "." not in name or skip(name):
            continue
        section = name.split(".")[0]
        group = groups.setdefault(section, p.add_argument_group(f"{section} config"))
        metavar = {bool: "BOOL", int: "INT", float: "NUM"}.get(kind, "STR")
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])  # --early-stop.patience too
        flags += (aliases or {}).get(name, [])
        group.add_argument(*flags, dest=name, metavar=metavar, default=argparse.SUPPRESS)


def add_sampling_arguments(p, max_new_tokens: int = 200) -> None:
    """Flags of SamplingParams shared by generate and chat."""
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default: 0.8)")
    p.add_argument("--top-k", type=int, help="sample from the k most likely tokens only")
    p.add_argument("--top-p", type=float, help="sample from the most likely tokens that make up this probability")
    p.add_argument("--min-p", type=float, help="drop tokens less likely than this times the most likely one")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages tokens already seen")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="subtracted per earlier use of a token")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="subtracted once from each token used")
    p.add_argument("--seed", type=int, help="make sampling reproducible")
    p.add_argument("--stop", action="append", default=[], help="a string that ends the output (repeatable)")
    p.add_argument(
        "--overflow",
        choices=["stop", "slide"],
        default="stop",
        help="when prompt and output fill the context: stop (default) or slide the window and go on",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")


def sampling_options(args) -> dict:
    names = ("top_k", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty", "seed",
             "stop", "overflow")  # fmt: skip
    return {name: getattr(args, name) for name in names}


def add_generate(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text from a trained run, streaming",
        description=(
            "Continue a prompt with the newest checkpoint of RUN_DIR, printing tokens as they are made. Several "
            "--prompt flags or --num-samples decode together in one batch. Generation stops when prompt and output "
            "fill the model's context; --overflow slide goes on with a sliding window instead."
        ),
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument(
        "--prompt", action="append", help="text to continue; repeat for a batch (default: start a new document)"
    )
    add_sampling_arguments(p)
    p.add_argument("--num-samples", type=int, default=1, help="continuations per prompt (seeds seed, seed+1, ...)")
    p.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (deterministic)")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam score = log-prob / length ** this")
    p.add_argument("--logprobs", type=int, metavar="N", help="print each token's log-probability and N alternatives")
    p.add_argument("--truncate", choices=["left"], help="left: drop the oldest prompt tokens that do not fit")


def add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="prepare the built-in corpus, train a small model, show samples",
        description=(
            "Prepare the built-in pydocs corpus at character level, train the model that --minutes buys on this "
            "machine (lmforge train --time), and print samples of the untrained and trained model side by side."
        ),
    )
    p.add_argument("--minutes", type=float, default=2.0, help="training time (default: 2)")
    p.add_argument("--out", default="runs/demo", help="folder for the data dir and the run dirs")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a run as a Hugging Face transformers model dir",
        description=(
            "Write the newest checkpoint of RUN_DIR to OUT_DIR as a transformers model: GPT-2-style models as "
            "GPT2LMHeadModel, Llama-style ones as LlamaForCausalLM, with tokenizer and generation config, as "
            "safetensors. AutoModelForCausalLM.from_pretrained(OUT_DIR) loads it with nothing of lmforge installed."
        ),
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--format", choices=["hf"], default="hf", help="hf: Hugging Face transformers (the default)")
    p.add_argument("--step", type=int, help="export this checkpoint step instead of the newest")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")


def add_import(sub) -> None:
    p = sub.add_parser(
        "import",
        help="turn a local Hugging Face model dir (GPT-2 or Llama family) into a run dir",
        description=(
            "Read a local transformers model dir (config.json, safetensors weights, tokenizer.json) of the GPT-2 "
            "or Llama family and write a run dir that lmforge can generate from, evaluate and fine-tune."
        ),
    )
    p.add_argument("hf_dir", metavar="HF_DIR")
    p.add_argument("--out", required=True, help="the run dir to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def add_info(sub) -> None:
    p = sub.add_parser(
        "info",
        help="parameters, FLOPs per token and memory of a run or preset",
        description=(
            "Print the parameter count, FLOPs per token, and the memory training and inference need at a batch and "
            "context, for the model of RUN_DIR, of --preset NAME, or of --depth N."
        ),
    )
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a preset instead of a run dir (default: demo)")
    p.add_argument("--depth", type=int, help="size the model by its number of layers (the one size dial)")
    p.add_argument("--batch-size", type=int, help="sequences per forward pass (default: the config's micro-batch)")
    p.add_argument("--context", type=int, help="tokens per sequence (default: model.seq_len)")
    p.add_argument("--vocab-size", type=int, default=50257, help="when the config has none (default: GPT-2's 50257)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="compute dtype (default: bf16)")


def add_finetune(sub) -> None:
    from lmforge.config import SAMPLERS, SFT_FORMATS

    p = sub.add_parser(
        "finetune",
        help="fine-tune a run on task records: prompt/response, chat, translation, QA, classification; full or LoRA",
        description=(
            "Start from the newest weights of RUN_DIR (trained or imported) and train on the JSONL records of --data "
            "into the new run dir --out, with the training loop of lmforge train. --task sft (default) learns the "
            "responses of prompt/response, chat (messages), translation (source, target), summarization (document, "
            "summary) or qa (context, question, answer) records, the prompt masked out of the loss; chat records "
            "store a ChatML chat template with the model. --task classify trains a classification head on text and "
            "label fields. --lora.rank N trains LoRA adapters only (merged into model.safetensors for generate, "
            "serve and export). Rerunning the same command resumes from --out's newest checkpoint."
        ),
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the base run dir to start from")
    p.add_argument("--data", required=True, help="JSONL file of training records")
    p.add_argument("--out", required=True, help="the new run dir (or the one to resume)")
    p.add_argument("--task", choices=["sft", "classify"], help="sft (default) or classify (same as --train.objective)")
    p.add_argument("--label-field", help="classify: the records' label field (default: label)")
    p.add_argument("--text-field", help="classify: the records' text field (default: text)")
    p.add_argument("--config", help="JSON config file of {section: {field: value}} applied over the base's model")
    p.add_argument("--max-steps", help="same as --train.max_steps")
    p.add_argument("--time", help="wall-clock budget such as 90s, 5m or 1h (same as --train.time)")
    p.add_argument("--seed", help="same as --train.seed")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    aliases = {
        "finetune.format": ["--format"],
        "finetune.class_weights": ["--class-weights"],
        "finetune.sampler": ["--sampler"],
        "finetune.val_data": ["--val-data"],
    }
    set_by_us = ("finetune.base", "finetune.data", "finetune.data_sha256")

    def skip(name: str) -> bool:  # the model is the base's; only its dropout may change
        return name in set_by_us or (name.startswith("model.") and name != "model.dropout")

    add_config_flags(p, skip=skip, aliases=aliases)
    p.epilog = f"formats: {', '.join(SFT_FORMATS)}; samplers: {', '.join(SAMPLERS)}"


def cmd_finetune(args) -> None:
    from lmforge.train.trainer import finetune

    overrides = {name: value for name, value in vars(args).items() if "." in name}
    for flag, field in (("max_steps", "train.max_steps"), ("time", "train.time"), ("seed", "train.seed")):
        if getattr(args, flag) is not None:
            overrides[field] = getattr(args, flag)
    renames = [f"{role}={key}" for role, key in (("text", args.text_field), ("label", args.label_field)) if key]
    if renames:
        overrides["finetune.fields"] = ",".join(filter(None, [overrides.get("finetune.fields", ""), *renames]))
    result = finetune(
        args.run_dir,
        args.data,
        args.out,
        task=args.task,
        config_file=args.config,
        overrides=overrides,
        progress_bar=not args.quiet,
    )
    if result["rank"] == 0:
        print_result(result)
        print(f"score it:   lmforge eval {args.out} --task RECORDS.jsonl")


def add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="score a run: loss, perplexity, bits per byte on text; task metrics on records; lm-evaluation-harness",
        description=(
            "--data DATA_DIR|TEXT_FILE: loss, perplexity, bits per byte (comparable across tokenizers) and loss by "
            "position in the context. --task FILE.jsonl: generate each record's answer and score BLEU, chrF, "
            "ROUGE-1/2/L, exact match and token F1; for a classification run, accuracy, per-class and macro "
            "precision/recall/F1, ROC-AUC with the ROC curve and the confusion matrix; for multiple-choice records "
            '({"prompt", "choices": [...], "answer": i}), accuracy by log-likelihood, also per character. '
            "--harness TASKS: lm-evaluation-harness tasks (names, or YAML task files) on the run itself, no export "
            "needed (pip install 'lmforge[eval]'). Writes JSON, a markdown report and plots into --out."
        ),
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--data", help="a data dir (its --split) or a UTF-8 text file")
    p.add_argument("--task", help="a JSONL file of records like lmforge finetune's, or multiple-choice ones")
    p.add_argument("--harness", metavar="TASKS", help="lm-evaluation-harness tasks (names, .yaml files)")
    p.add_argument("--num-fewshot", type=int, help="--harness: examples in each prompt (default: each task's own)")
    dtypes = ["fp32", "bf16", "fp16"]
    p.add_argument("--dtype", choices=dtypes, default="fp32", help="--harness: the model's dtype (default: fp32)")
    p.add_argument("--out", help="folder for the reports (default: RUN_DIR/eval)")
    p.add_argument("--split", default="val", help="the data dir's split (default: val)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default: 8)")
    p.add_argument("--max-batches", type=int, help="--data: stop after this many batches")
    p.add_argument("--max-new-tokens", type=int, default=128, help="--task: longest answer (default: 128)")
    p.add_argument("--num-beams", type=int, default=1, help="--task: beam search with N beams (default: greedy)")
    p.add_argument("--limit", type=int, default=0, help="--task, --harness: score the first N records (of each task)")
    p.add_argument("--step", type=int, help="evaluate this checkpoint step instead of the newest")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")


def cmd_eval(args) -> None:
    import torch

    from lmforge.eval.report import evaluate

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch_size < 1 or args.limit < 0:
        raise LMForgeError("--batch-size must be at least 1 and --limit not negative")
    results = evaluate(
        args.run_dir,
        data=args.data,
        task=args.task,
        harness=args.harness,
        out=args.out,
        split=args.split,
        batch_size=args.batch_size,
        max_batches=args.max_batches,
        max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
        limit=args.limit,
        device=args.device,
        step=args.step,
        num_fewshot=args.num_fewshot,
        dtype=args.dtype,
    )
    if "lm" in results:
        lm = results["lm"]
        bpb = f"{lm['bits_per_byte']:.4f}" if lm["bits_per_byte"] is not None else "n/a"
        print(
            f"{lm['data']}: loss {lm['loss']:.4f}, perplexity {lm['perplexity']:.3f}, bits per byte {bpb} "
            f"({lm['tokens']:,} tokens)"
        )
    if "task" in results:
        m = results["task"]["metrics"]
        if results["task"]["kind"] == "classification":
            auc = f"{m['roc_auc']:.4f}" if m["roc_auc"] is not None else "n/a"
            print(f"{m['examples']} records: accuracy {m['accuracy']:.4f}, macro F1 {m['macro_f1']:.4f}, ROC-AUC {auc}")
        elif results["task"]["kind"] == "multiple_choice":
            print(f"{m['examples']} records: accuracy {m['accuracy']:.4f}, per character {m['accuracy_norm']:.4f}")
        else:
            print(
                f"{m['examples']} records: BLEU {m['bleu']:.2f}, chrF {m['chrf']:.2f}, ROUGE-L {m['rougeL']:.2f}, "
                f"exact match {m['exact_match']:.2f}, token F1 {m['token_f1']:.2f}"
            )
    for task, metrics in results.get("harness", {}).get("results", {}).items():
        shown = [f"{k.partition(',')[0]} {v:.4f}" for k, v in metrics.items() if "_stderr" not in k and _is_number(v)]
        print(f"{task}: {', '.join(shown)}")
    print("reports:    " + ", ".join(str(f) for f in results["files"]))


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def build_parser() -> Parser:
    parser = Parser(prog="lmforge", description="Raw text to a trained transformer language model, and back.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    commands = (add_prepare, add_train, add_finetune, add_eval, add_generate, add_chat, add_serve, add_demo, add_export,
                add_import, add_info)  # fmt: skip
    for add in commands:
        add(sub)
    return parser


def cmd_prepare(args) -> None:
    from lmforge.data.clean import CleanConfig
    from lmforge.data.prepare import prepare, summary

    if args.no_clean:
        clean = CleanConfig.off()
    else:
        clean = CleanConfig(
            html=args.strip_html,
            newlines=not args.keep_newlines,
            control=not args.keep_control,
            normalize=args.normalize,
            spaces=not args.keep_spaces,
            blank_lines=not args.keep_blank_lines,
            min_chars=args.min_chars,
            max_chars=args.max_chars,
            dedup=not args.no_dedup,
        )
    meta = prepare(
        args.sources,
        args.out,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        seed=args.seed,
        input=args.input,
        overwrite=args.overwrite,
        shard_tokens=args.shard_tokens,
        progress=not args.quiet,
        clean=clean,
        text_field=args.text_field,
        on_invalid=args.on_invalid,
        on_error=args.on_error,
        stdin_format=args.stdin_format,
        workers=args.workers,
        tokenizer_sample_bytes=args.tokenizer_sample_bytes,
    )
    print(summary(meta, args.out))


def train_overrides(args) -> dict:
    overrides = {name: value for name, value in vars(args).items() if "." in name}
    shortcuts = (("max_steps", "train.max_steps"), ("time", "train.time"), ("seed", "train.seed"))
    for flag, field in (*shortcuts, ("objective", "train.objective")):
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
        depth=args.depth,
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
    import torch

    from lmforge.api import LM

    if args.threads:
        torch.set_num_threads(args.threads)
    lm = LM.load(args.run_dir, device=args.device)
    if args.num_samples < 1:
        raise LMForgeError(f"--num-samples must be at least 1, not {args.num_samples}")
    prompts = args.prompt or [""]
    options = sampling_options(args)
    extra = {"num_beams": args.num_beams, "length_penalty": args.length_penalty, "truncate": args.truncate}
    if len(prompts) == 1 and args.num_samples == 1 and args.num_beams == 1 and args.logprobs is None:
        pieces = lm.stream(prompts[0], args.max_new_tokens, args.temperature, **options, **extra)
        first = next(pieces, "")  # settings and prompt are checked here, before anything is printed
        sys.stdout.write(prompts[0] + first)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return
    completions = lm.complete(
        prompts, args.max_new_tokens, args.temperature, args.num_samples, logprobs=args.logprobs, **options, **extra
    )
    lm.warn_context_full(completions, args.max_new_tokens)
    for i, completion in enumerate(completions):
        prompt, sample = divmod(i, args.num_samples)
        if len(completions) > 1:
            where = f"prompt {prompt + 1}, " if len(prompts) > 1 else ""
            print(f"--- {where}sample {sample + 1} ---")
        print(prompts[prompt] + completion.text)
        if completion.logprobs is not None:
            print(f"--- {completion.completion_tokens} tokens, finish_reason {completion.finish_reason} ---")
            for token, logprob, top in zip(completion.token_ids, completion.logprobs, completion.top_logprobs):
                alternatives = "  ".join(f"{lm.tokenizer.decode([t])!r} {lp:.3f}" for t, lp in top)
                print(f"{lm.tokenizer.decode([token])!r:>14} {logprob:8.3f}   {alternatives}")


def add_chat(sub) -> None:
    p = sub.add_parser(
        "chat",
        help="talk to a trained run in the terminal",
        description=(
            "An interactive session with RUN_DIR's model, keeping the history. A run dir with a chat template "
            "(chat_template.jinja, written by fine-tuning) uses it; any other model continues the conversation as "
            "plain text. /reset clears the history, /params shows or sets sampling settings, Ctrl-C stops a reply, "
            "/quit or Ctrl-D leaves."
        ),
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--system", help="a system message that starts the conversation")
    add_sampling_arguments(p)


def cmd_chat(args) -> None:
    import torch

    from lmforge.api import LM
    from lmforge.chat import ChatSession, run_chat
    from lmforge.generate import SamplingParams

    if args.threads:
        torch.set_num_threads(args.threads)
    lm = LM.load(args.run_dir, device=args.device)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, **sampling_options(args))
    run_chat(ChatSession(lm, params, args.system))


def add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a trained run over an OpenAI-compatible HTTP API, with a playground page",
        description=(
            "Serve RUN_DIR's model: GET /health, GET /v1/models, POST /v1/completions and /v1/chat/completions "
            "(streaming with server-sent events), and a playground page at /. Concurrent requests are decoded "
            "together; when --max-queue requests already wait, new ones get 429 at once. SIGTERM or Ctrl-C drains: "
            "new requests and /health get 503 while the ones in flight finish (for up to --timeout seconds; a "
            "second signal stops at once), then the server exits with 0."
        ),
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require Authorization: Bearer KEY on /v1 (default: $LMFORGE_API_KEY, if set)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (default: 16)")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot (default: 64)")
    p.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds a request may take, and the longest drain at shutdown (default: 120)",
    )
    p.add_argument("--max-tokens", type=int, help="the most tokens one request may ask for (default: the context)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default: 1 MiB)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def cmd_serve(args) -> None:
    import os

    import torch

    from lmforge.serve.app import serve

    if args.threads:
        torch.set_num_threads(args.threads)
    api_key = args.api_key or os.environ.get("LMFORGE_API_KEY") or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        warnings.warn(f"serving on {args.host} without --api-key: anyone who can reach it can use it", stacklevel=1)
    serve(
        args.run_dir,
        args.host,
        args.port,
        device=args.device,
        log_level=args.log_level,
        api_key=api_key,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        timeout=args.timeout,
        max_tokens=args.max_tokens,
        max_body_bytes=args.max_body_bytes,
    )


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
    print(f"training for {args.minutes:g} minute(s) into {run}, sized for the budget and this machine")
    result = train(str(data), run, overrides={"train.time": args.minutes * 60}, progress_bar=not args.quiet)
    trained = LM.load(run)
    untrained = LM.untrained(RunConfig.load(run / "config.json"), trained.tokenizer)
    prompt = "The "
    # 300 characters from a 64-token model: the sliding window is asked for explicitly
    options = {"max_new_tokens": 300, "temperature": 0.8, "seed": 0, "overflow": "slide"}
    print()
    print(
        side_by_side(prompt + untrained.generate(prompt, **options)[0], prompt + trained.generate(prompt, **options)[0])
    )
    print()
    print_result(result)
    print(f"generate more: lmforge generate {run} --prompt 'The '")


def cmd_export(args) -> None:
    from lmforge.interop.hf import export_hf

    result = export_hf(args.run_dir, args.out_dir, step=args.step, overwrite=args.overwrite)
    print(f"exported {args.run_dir} as {result['architecture']} ({result['params']:,} parameters) to {args.out_dir}")
    print(f"load it with transformers: AutoModelForCausalLM.from_pretrained({args.out_dir!r})")


def cmd_import(args) -> None:
    from lmforge.interop.hf import import_hf

    result = import_hf(args.hf_dir, args.out, overwrite=args.overwrite)
    print(f"imported {args.hf_dir} ({result['architecture']}, {result['params']:,} parameters) into {args.out}")
    print(f"generate from it: lmforge generate {args.out} --prompt 'Hello'")


def cmd_info(args) -> None:
    from dataclasses import replace

    from lmforge import presets
    from lmforge.config import BatchPlan, RunConfig, apply_overrides
    from lmforge.info import model_info

    if args.run_dir:
        if args.preset or args.depth is not None:
            raise LMForgeError("give either RUN_DIR or --preset/--depth, not both")
        if not (Path(args.run_dir) / "config.json").is_file():
            raise LMForgeError(f"{args.run_dir} is not a run dir (no config.json)")
        config = RunConfig.load(Path(args.run_dir) / "config.json")
    else:
        overrides = presets.get(args.preset or "demo")
        if args.depth is not None:
            overrides.update(presets.from_depth(args.depth))
        config = apply_overrides(RunConfig(), overrides)
    model = config.model if config.model.vocab_size else replace(config.model, vocab_size=args.vocab_size)
    batch = args.batch_size or BatchPlan.derive(config.train, args.context or model.seq_len).micro_batch_size
    print(model_info(model, batch, args.context, args.dtype).report())


COMMANDS = {
    "prepare": cmd_prepare,
    "train": cmd_train,
    "finetune": cmd_finetune,
    "eval": cmd_eval,
    "generate": cmd_generate,
    "chat": cmd_chat,
    "serve": cmd_serve,
    "demo": cmd_demo,
    "export": cmd_export,
    "import": cmd_import,
    "info": cmd_info,
}


# The optional extras (pyproject.toml) by the modules they bring: a command that needs one says which to install.
EXTRAS = {
    "transformers": "hf",
    "datasets": "data",
    "pyarrow": "data",
    "zstandard": "data",
    "sentencepiece": "data",
    "fastapi": "serve",
    "uvicorn": "serve",
    "httpx": "serve",
    "sacrebleu": "metrics",
    "rouge_score": "metrics",
    "sklearn": "metrics",
    "tensorboard": "log",
    "wandb": "log",
}


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = lambda message, category, *rest: f"lmforge: warning: {message}\n"
    args = None
    try:
        args = build_parser().parse_args(argv)
        COMMANDS[args.command](args)
    except LMForgeError as exc:
        print(f"lmforge: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ModuleNotFoundError as exc:
        extra = EXTRAS.get((exc.name or "").split(".")[0])
        if extra is None:
            raise  # not an optional dependency: a defect, with its traceback
        command = f"lmforge {args.command}" if args is not None else "lmforge"
        print(f"lmforge: error: {command} needs the {extra} extra ({exc.name} is not installed): "
              f"pip install 'lmforge[{extra}]'", file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\nlmforge: interrupted; a run resumes from its newest checkpoint with the same command", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
