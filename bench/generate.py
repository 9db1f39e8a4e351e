"""Generation speed: lmforge's KV-cached decoder against transformers' generate() on the same weights.

    python bench/generate.py RUN_DIR --new-tokens 200 --threads 1

Exports RUN_DIR with `lmforge export` (export_hf), loads the export with transformers.AutoModelForCausalLM and
times both in this one process, best of --repeats runs each:
1. single stream: one prompt, greedy, exactly --new-tokens new tokens (no end-of-text stop): tokens/s of ours and
   of generate(), and whether both chose the same tokens;
2. batched throughput at 1, 4 and 16 streams: prompts of different lengths, sampled at temperature 1: total new
   tokens/s of ours, and of generate() with left padding.
"""

from __future__ import annotations

import argparse
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch


def best_time(fn, repeats: int) -> float:
    fn()  # warm up: first calls allocate and pick kernels
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--new-tokens", type=int, default=200, help="new tokens per stream (capped by the context)")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--batch-sizes", default="1,4,16")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import transformers

    from lmforge.api import LM
    from lmforge.generate import SamplingParams, generate
    from lmforge.interop.hf import export_hf

    torch.set_num_threads(args.threads)
    lm = LM.load(args.run_dir)
    config = lm.model.config
    new = min(args.new_tokens, config.seq_len - args.prompt_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        exported = export_hf(args.run_dir, Path(tmp) / "hf")
        hf = transformers.AutoModelForCausalLM.from_pretrained(exported["out_dir"], dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # both sides generate exactly `new` tokens
    pad = lm.tokenizer.hf.token_to_id("<|pad|>") or 0
    hf.generation_config.pad_token_id = pad
    print(
        f"model: {args.run_dir} ({exported['architecture']}, {lm.model.num_params():,} parameters, {config.n_layer} "
        f"layers, {config.n_embd} wide, context {config.seq_len}); {platform.machine()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, {args.threads} thread(s); {args.prompt_tokens}-token prompts, "
        f"{new} new tokens per stream, best of {args.repeats}"
    )
    rng = random.Random(0)
    ordinary = [i for i in range(lm.tokenizer.vocab_size) if lm.tokenizer.decode([i])]

    def prompt(length: int) -> list[int]:
        return [rng.choice(ordinary) for _ in range(length)]

    # 1. single stream, greedy
    single = prompt(args.prompt_tokens)
    ours_out: list[list[int]] = []
    theirs_out: list[list[int]] = []

    def ours_single():
        ours_out[:] = [
            generate(lm.model, lm.tokenizer, [single], SamplingParams(new, 0.0, stop_token_ids=()))[0].token_ids
        ]

    def theirs_single():
        with torch.inference_mode():
            out = hf.generate(torch.tensor([single]), max_new_tokens=new, do_sample=False, use_cache=True)
        theirs_out[:] = [out[0, len(single) :].tolist()]

    ours_s, theirs_s = best_time(ours_single, args.repeats), best_time(theirs_single, args.repeats)
    same = ours_out[0] == theirs_out[0]
    agree = next((i for i, (a, b) in enumerate(zip(ours_out[0], theirs_out[0])) if a != b), len(ours_out[0]))
    print("\n| single stream, greedy | tokens/s | ms/token |")
    print("|---|---|---|")
    print(f"| lmforge | {new / ours_s:,.0f} | {ours_s / new * 1000:.2f} |")
    print(f"| transformers generate() | {new / theirs_s:,.0f} | {theirs_s / new * 1000:.2f} |")
    print(f"\nspeed-up: {theirs_s / ours_s:.2f}x; same tokens: {'yes' if same else f'first {agree} of {new}'}")

    # 2. batched throughput, sampled, prompts of different lengths
    print("\n| streams | lmforge tokens/s | transformers tokens/s | ratio |")
    print("|---|---|---|---|")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        prompts = [prompt(rng.randint(args.prompt_tokens // 2, args.prompt_tokens)) for _ in range(batch)]
        params = [SamplingParams(new, 1.0, seed=i, stop_token_ids=()) for i in range(batch)]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

        def ours_batch(prompts=prompts, params=params):
            generate(lm.model, lm.tokenizer, prompts, params)

        def theirs_batch(ids=ids, mask=mask):
            with torch.inference_mode():
                hf.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=True, top_k=0, use_cache=True)

        ours_b, theirs_b = best_time(ours_batch, args.repeats), best_time(theirs_batch, args.repeats)
        total = batch * new
        print(f"| {batch} | {total / ours_b:,.0f} | {total / theirs_b:,.0f} | {theirs_b / ours_b:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
