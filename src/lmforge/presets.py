"""Presets: named starting configs, as plain functions returning dotted overrides of the defaults.

`tiny` trains on a CPU in seconds and is what the tests use; `demo` is the model `lmforge demo` and the
speedrun benchmark train on a CPU; `small` is the classic 6-layer character-level GPT for one GPU. `gpt2` and
`gpt2-medium` are GPT-2's layouts (124M and 355M parameters with its 50257-token vocabulary), `llama-20m`,
`llama-60m` and `llama-150m` Llama-style models (RoPE, RMSNorm, SwiGLU, grouped-query attention; sizes counted
with a 32k vocabulary, tied embeddings), and `bert` a BERT-base-style encoder trained with masked tokens.

`from_depth(d)` is the one size dial (after nanochat's `--depth`): width, heads, learning rate, batch and
horizon all follow from the number of layers. `for_time_budget(seconds, ...)` turns that dial for a wall-clock
budget on the machine at hand: `lmforge train --time 2m` with no preset or size flags.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from lmforge.errors import LMForgeError


def tiny() -> dict:
    return {
        "model.seq_len": 32,
        "model.n_layer": 2,
        "model.n_head": 2,
        "model.n_embd": 32,
        "train.batch_size": 8,
        "train.max_steps": 50,
        "train.eval_every": 25,
        "train.eval_batches": 4,
        "train.save_every": 25,
        "train.log_every": 5,
        "optim.lr": 3e-3,
        "optim.warmup_steps": 5,
    }


def demo() -> dict:
    return {
        "model.seq_len": 64,
        "model.n_layer": 4,
        "model.n_head": 4,
        "model.n_embd": 128,
        "train.batch_size": 12,
        "train.time": 120.0,
        "train.eval_every": 250,
        "train.eval_batches": 20,
        "train.save_every": 500,
        "optim.lr": 1e-3,
        "optim.warmup_steps": 100,
        "optim.weight_decay": 0.1,
    }


def small() -> dict:
    return {
        "model.seq_len": 256,
        "model.n_layer": 6,
        "model.n_head": 6,
        "model.n_embd": 384,
        "model.dropout": 0.2,
        "train.batch_size": 64,
        "train.max_steps": 5000,
        "train.eval_every": 250,
        "optim.lr": 1e-3,
        "optim.min_lr_ratio": 0.1,
        "optim.warmup_steps": 100,
    }


def gpt2() -> dict:
    """GPT-2 small (124M): 12 layers, 12 heads, 768 wide, context 1024; 10B tokens in 0.5M-token steps."""
    return {
        "model.seq_len": 1024,
        "model.n_layer": 12,
        "model.n_head": 12,
        "model.n_embd": 768,
        "train.batch_tokens": 2**19,
        "train.micro_batch_size": 16,
        "train.max_steps": 19073,
        "train.eval_every": 250,
        "train.save_every": 1000,
        "optim.lr": 6e-4,
        "optim.min_lr_ratio": 0.1,
        "optim.warmup_steps": 700,
        "optim.beta2": 0.95,
        "optim.weight_decay": 0.1,
    }


def gpt2_medium() -> dict:
    """GPT-2 medium (355M): 24 layers, 16 heads, 1024 wide, the same data and schedule as gpt2."""
    return {
        **gpt2(),
        "model.n_layer": 24,
        "model.n_head": 16,
        "model.n_embd": 1024,
        "train.micro_batch_size": 8,
        "optim.lr": 3e-4,
    }


def llama(n_layer: int, n_embd: int, n_head: int, n_kv_head: int, lr: float, batch_tokens: int, steps: int) -> dict:
    """A Llama-style layout, trained for about 20 tokens per parameter (Chinchilla)."""
    return {
        "model.seq_len": 1024,
        "model.n_layer": n_layer,
        "model.n_head": n_head,
        "model.n_kv_head": n_kv_head,
        "model.n_embd": n_embd,
        "model.pos_emb": "rope",
        "model.norm": "rmsnorm",
        "model.mlp": "swiglu",
        "model.bias": False,
        "train.batch_tokens": batch_tokens,
        "train.micro_batch_size": 16,
        "train.max_steps": steps,
        "train.eval_every": 250,
        "train.save_every": 1000,
        "optim.lr": lr,
        "optim.min_lr_ratio": 0.1,
        "optim.warmup_steps": max(100, steps // 50),
        "optim.beta2": 0.95,
        "optim.weight_decay": 0.1,
    }


def llama_20m() -> dict:
    return llama(n_layer=16, n_embd=256, n_head=4, n_kv_head=2, lr=2e-3, batch_tokens=2**17, steps=3000)


def llama_60m() -> dict:
    return llama(n_layer=16, n_embd=512, n_head=8, n_kv_head=4, lr=1e-3, batch_tokens=2**18, steps=4800)


def llama_150m() -> dict:
    return llama(n_layer=20, n_embd=768, n_head=12, n_kv_head=4, lr=6e-4, batch_tokens=2**19, steps=5700)


def bert() -> dict:
    """BERT-base's layout (12 layers, 768 wide, context 512), bidirectional, trained on masked tokens (15%)."""
    return {
        "model.seq_len": 512,
        "model.n_layer": 12,
        "model.n_head": 12,
        "model.n_embd": 768,
        "model.causal": False,
        "model.dropout": 0.1,
        "train.objective": "mlm",
        "train.mlm_probability": 0.15,
        "train.batch_tokens": 2**17,
        "train.micro_batch_size": 32,
        "train.max_steps": 100_000,
        "train.eval_every": 1000,
        "train.save_every": 5000,
        "optim.lr": 1e-4,
        "optim.min_lr_ratio": 0.0,
        "optim.schedule": "linear",
        "optim.warmup_steps": 10_000,
        "optim.beta2": 0.999,
        "optim.weight_decay": 0.01,
    }


PRESETS: dict[str, Callable[[], dict]] = {
    "tiny": tiny,
    "demo": demo,
    "small": small,
    "gpt2": gpt2,
    "gpt2-medium": gpt2_medium,
    "llama-20m": llama_20m,
    "llama-60m": llama_60m,
    "llama-150m": llama_150m,
    "bert": bert,
}

HEAD_SIZE = 64  # width per attention head; with width 64 * depth, depth 12 is GPT-2 small's shape
TOKENS_PER_PARAM = 20  # Chinchilla's compute-optimal data size
TARGET_STEPS = 4000  # the batch is chosen so a compute-optimal run takes about this many steps


def adamw_lr(width: int) -> float:
    """AdamW's learning rate for a width: GPT-2 small's 6e-4 at 768, scaled by sqrt(768 / width)."""
    return float(f"{6e-4 * math.sqrt(768 / width):.3g}")


def from_depth(depth: int) -> dict:
    """Dotted overrides for a GPT of `depth` layers, every other size following from it (nanochat's dial).

    - width 64 * depth, one head per 64 channels (depth 12 gives GPT-2 small: 768 wide, 12 heads);
    - learning rate 6e-4 * sqrt(768 / width): GPT-2 small's at depth 12, higher for narrower models;
    - horizon: 20 tokens per non-embedding parameter (12 * depth * width^2), Chinchilla's ratio;
    - batch: the power of two of tokens nearest horizon / 4000, within 4K..512K tokens, so runs take about
      4000 steps; max_steps = horizon / batch, and a 4% warmup.

    The values stand in for the preset's; flags given after --depth override them.
    """
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        raise LMForgeError(f"--depth must be a whole number of layers, at least 1, not {depth!r}")
    width = HEAD_SIZE * depth
    params = 12 * depth * width**2
    tokens = TOKENS_PER_PARAM * params
    batch_tokens = 2 ** min(19, max(12, round(math.log2(tokens / TARGET_STEPS))))
    steps = math.ceil(tokens / batch_tokens)
    return {
        "model.n_layer": depth,
        "model.n_embd": width,
        "model.n_head": width // HEAD_SIZE,
        "optim.lr": adamw_lr(width),
        "optim.warmup_steps": max(10, steps // 25),
        "train.batch_tokens": batch_tokens,
        "train.max_steps": steps,
    }


def get(name: str) -> dict:
    if name not in PRESETS:
        raise LMForgeError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return {"preset": name, **PRESETS[name]()}


BUDGET = "budget"  # the preset name of a run sized by for_time_budget

# The time-budget rule (for_time_budget). Each constant is fitted on the measurements in docs/benchmarks.md
# ("The time-budget recipe"); change them together with that section.
BUDGET_UTILIZATION = {"cpu": 0.15, "cuda": 0.4}  # the share of the probed matmul peak a step reaches at these sizes
BUDGET_TOKENS_PER_PARAM = 3.0  # training tokens per non-embedding parameter the depth is chosen for
BUDGET_STEPS = 2000  # the batch is chosen so the budget takes about this many steps
BUDGET_MAX_DEPTH = 48
BUDGET_MEMORY_SHARE = 0.5  # of the machine's memory, for weights, optimizer state and activations


def budget_shape(depth: int, vocab_size: int) -> dict:
    """The model for_time_budget trains at a depth: from_depth's width (64 per layer, heads of 64), GPT-2's
    layout, and a context of 24 tokens per layer (a power of two in 64..1024)."""
    seq_len = 2 ** min(10, max(6, round(math.log2(24 * depth))))
    return {
        "model.n_layer": depth,
        "model.n_embd": HEAD_SIZE * depth,
        "model.n_head": depth,
        "model.seq_len": seq_len,
        "model.vocab_size": vocab_size,
    }


def for_time_budget(
    seconds: float,
    peak_flops: float,
    device_type: str = "cpu",
    vocab_size: int = 256,
    memory_bytes: int = 0,
    precision: str = "fp32",
    muon: bool = True,
) -> tuple[dict, list[str]]:
    """(dotted overrides, the reasons in words) for the model and recipe that a budget of `seconds` trains best
    on a device whose matmuls reach `peak_flops` in the precision in use.

    The rule: the budget buys seconds x peak x utilization FLOPs (BUDGET_UTILIZATION of the probed peak, measured
    at these sizes); at each depth (budget_shape) that is a number of tokens, and the depth chosen is the one whose
    tokens per non-embedding parameter come nearest BUDGET_TOKENS_PER_PARAM (in log scale, so a bigger budget or a
    faster machine never picks a smaller model). The batch is the power of two of tokens that spends the budget in
    about BUDGET_STEPS steps; the model, its optimizer state and a micro-batch's activations must fit in
    BUDGET_MEMORY_SHARE of memory_bytes (if given), else the micro-batch halves, then the depth falls. The
    optimizer is Muon (lr 5e-3) for the hidden matrices with AdamW for the rest, or AdamW (lr from_depth's)
    where muon is False (FSDP); warmup-stable-decay; an evaluation every tenth of the budget.
    """
    from lmforge.info import model_info
    from lmforge.model.config import ModelConfig

    if not seconds > 0 or not peak_flops > 0:
        raise LMForgeError(f"a time budget needs a positive time and speed, not {seconds} s at {peak_flops} FLOP/s")
    utilization = BUDGET_UTILIZATION.get(device_type, BUDGET_UTILIZATION["cpu"])
    compute = seconds * peak_flops * utilization
    dtype = "fp32" if precision == "fp32" else "bf16"

    def info(depth: int, batch: int = 1):
        shape = budget_shape(depth, vocab_size)
        config = ModelConfig(**{k.split(".")[1]: v for k, v in shape.items()})
        return model_info(config, batch_size=batch, dtype=dtype)

    def miss(depth: int) -> float:
        sized = info(depth)
        tokens = compute / sized.train_flops_per_token
        return abs(math.log(tokens / (BUDGET_TOKENS_PER_PARAM * sized.non_embedding_params)))

    depth = min(range(1, BUDGET_MAX_DEPTH + 1), key=miss)
    while True:
        sized = info(depth)
        tokens = compute / sized.train_flops_per_token
        seq_len = sized.config.seq_len
        batch_tokens = 2 ** min(19, max(round(math.log2(seq_len)) + 2, round(math.log2(tokens / BUDGET_STEPS))))
        batch = max(1, batch_tokens // seq_len)
        micro = batch
        while memory_bytes and micro > 1 and info(depth, micro).train_bytes > BUDGET_MEMORY_SHARE * memory_bytes:
            micro //= 2
        if not memory_bytes or info(depth, micro).train_bytes <= BUDGET_MEMORY_SHARE * memory_bytes or depth == 1:
            break
        depth -= 1
    steps = max(1, round(tokens / (batch * seq_len)))
    overrides = {
        **budget_shape(depth, vocab_size),
        "train.batch_size": batch,
        "train.batch_tokens": 0,
        "train.micro_batch_size": micro if micro < batch else 0,
        "train.eval_interval": float(f"{seconds / 10:.3g}"),
        "optim.name": "muon" if muon else "adamw",
        "optim.lr": 5e-3 if muon else adamw_lr(HEAD_SIZE * depth),
        "optim.schedule": "wsd",
        "optim.decay_fraction": 0.4,
        "optim.min_lr_ratio": 0.0,
        "optim.warmup_steps": max(10, min(200, steps // 50)),
    }
    del overrides["model.vocab_size"]
    reasons = [
        f"a {seconds:g} s budget at {peak_flops / 1e12:.3g} TFLOP/s ({precision} matmul peak on {device_type}) "
        f"x {utilization:g} utilization = {compute / 1e12:.3g} "
        "TFLOP to spend",
        f"depth {depth}: {depth} layers x {HEAD_SIZE * depth} wide, {depth} head(s) of {HEAD_SIZE}, context "
        f"{seq_len}, GPT-2 layout; {sized.non_embedding_params / 1e6:.3g}M non-embedding parameters, "
        f"{sized.params / 1e6:.3g}M in all, {sized.train_flops_per_token / 1e6:.3g} MFLOP per token",
        f"expected {tokens / 1e6:.3g}M tokens ({tokens / sized.non_embedding_params:.3g} per non-embedding "
        f"parameter; the rule aims at {BUDGET_TOKENS_PER_PARAM:g}) in about {steps:,} steps of {batch} x {seq_len} "
        "tokens" + (f" in micro-batches of {micro} (memory)" if micro < batch else ""),
        f"optimizer {overrides['optim.name']} lr {overrides['optim.lr']:g}, warmup {overrides['optim.warmup_steps']}"
        " steps, then stable, decaying over the last 40% of the budget; an evaluation every "
        f"{overrides['train.eval_interval']:g} s of training (not counted in the budget)",
    ]
    return overrides, reasons
