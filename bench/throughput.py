"""Training throughput: our GPT against a textbook reference, in one run on this machine.

    python bench/throughput.py                       # demo size and a larger one, CPU
    python bench/throughput.py --sizes 12x768x1024 --batch 16 --device cuda --steps 30

The reference is the textbook Transformer stack built from torch.nn.TransformerEncoder (pre-norm, GELU,
a causal mask) with the same embedding, width, depth, heads, context and batch, trained with the same AdamW
(fused, as lmforge trains), so the ratio compares the models alone. Each configuration runs a few warm-up steps,
then --steps timed steps; the figures are tokens/s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.model.gpt import GPT, ModelConfig


class Reference(nn.Module):
    def __init__(self, vocab: int, seq_len: int, n_layer: int, n_head: int, n_embd: int):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, n_embd)
        self.pos_emb = nn.Embedding(seq_len, n_embd)
        layer = nn.TransformerEncoderLayer(
            n_embd, n_head, 4 * n_embd, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, n_layer, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab, bias=False)
        self.head.weight = self.tok_emb.weight
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq_len), persistent=False)

    def forward(self, idx):
        T = idx.size(1)
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(T, device=idx.device))
        x = self.encoder(x, mask=self.mask[:T, :T], is_causal=True)
        return self.head(self.norm(x)), None


class Runner:
    """One model with its optimizer and a fixed batch; `time(steps)` returns tokens/s over that many steps."""

    def __init__(self, model, batch: int, seq_len: int, vocab: int, device, autocast):
        self.model, self.device, self.autocast = model.to(device).train(), device, autocast
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        self.x = torch.randint(0, vocab, (batch, seq_len), device=device)
        self.y = torch.randint(0, vocab, (batch, seq_len), device=device)
        self.time(3)  # warm-up (and compilation, for a compiled model)

    def step(self) -> None:
        with self.autocast:
            logits, _ = self.model(self.x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), self.y.flatten())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def time(self, steps: int) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return self.x.numel() * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["4x128x64", "6x384x256"], help="LAYERSxWIDTHxCONTEXT")
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="also time ours under torch.compile (fp32 and bf16)")
    args = parser.parse_args()
    device = torch.device(args.device)
    bf16 = torch.autocast(device.type, dtype=torch.bfloat16)
    rows = []
    for size in args.sizes:
        n_layer, n_embd, seq_len = map(int, size.split("x"))
        n_head = max(1, n_embd // 64) if n_embd >= 64 else 2
        config = ModelConfig(vocab_size=args.vocab, seq_len=seq_len, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
        torch.manual_seed(0)
        row = {"size": size, "batch": args.batch, "heads": n_head}
        plain, bf16_ctx = contextlib.nullcontext(), bf16
        runners = {
            "reference_fp32": Runner(
                Reference(args.vocab, seq_len, n_layer, n_head, n_embd), args.batch, seq_len, args.vocab, device, plain
            ),
            "reference_bf16": Runner(
                Reference(args.vocab, seq_len, n_layer, n_head, n_embd), args.batch, seq_len, args.vocab, device, bf16
            ),
            "ours_fp32": Runner(GPT(config), args.batch, seq_len, args.vocab, device, plain),
            "ours_bf16": Runner(GPT(config), args.batch, seq_len, args.vocab, device, bf16_ctx),
        }
        if args.compile:
            runners["ours_fp32_compiled"] = Runner(
                torch.compile(GPT(config)), args.batch, seq_len, args.vocab, device, plain
            )
            runners["ours_bf16_compiled"] = Runner(
                torch.compile(GPT(config)), args.batch, seq_len, args.vocab, device, bf16_ctx
            )
        # Interleaved rounds, best of each: a shared machine's noise hits every variant alike.
        for _ in range(args.rounds):
            for name, runner in runners.items():
                row[name] = max(row.get(name, 0.0), runner.time(args.steps))
        for name in runners:
            if name != "reference_fp32":
                row[f"ratio_{name.removeprefix('ours_')}"] = row[name] / row["reference_fp32"]
        rows.append({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()})
    print(json.dumps({"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "machine": platform.machine(), "results": rows}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
