"""What a model costs before it is trained: parameters, FLOPs per token, and memory for training and inference.

`lmforge info RUN_DIR` or `lmforge info --preset NAME` prints these for a batch and context. Parameters and
FLOPs come from the model itself, built on PyTorch's meta device (no memory, no time), so they cannot drift from
gpt.py. Memory is an estimate, written term by term so it can be checked:

- training: fp32 weights, fp32 gradients and AdamW's two fp32 moments (16 bytes per parameter), plus the
  activations kept for the backward pass at the compute dtype, plus the loss's fp32 log-probabilities and,
  while its backward runs, their gradient;
- inference: the weights at the compute dtype, the KV cache for the whole context, and one step's logits; an
  encoder (causal false) keeps no cache and reads the whole sequence at once, with logits at every position.

Activations count what each block keeps for backward, per token: the inputs and outputs of its two norms (4 x
n_embd), q, k and v, the attention output, and the MLP's hidden tensors (2 x hidden for GELU and ReLU^2, 4 for
SwiGLU). Attention is assumed to run in a fused kernel (flash or memory-efficient) that stores no T x T scores;
dropout masks and allocator slack are not counted, so leave some headroom. On a CPU in fp32 the estimate is
tested against the bytes autograd actually saves.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from lmforge.errors import LMForgeError
from lmforge.model.gpt import GPT, ModelConfig

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ADAMW_BYTES_PER_PARAM = 16  # fp32 weight + gradient + two moments
MLP_SAVED = {"gelu": 2, "relu2": 2, "swiglu": 4}  # hidden-width tensors each MLP keeps for backward


@dataclass
class ModelInfo:
    config: ModelConfig
    batch_size: int
    context: int
    dtype: str
    params: int
    non_embedding_params: int
    train_flops_per_token: int  # forward + backward
    forward_flops_per_token: int
    train_state_bytes: int  # weights, gradients, optimizer moments
    activation_bytes: int  # kept for backward, the loss's log-probabilities included
    logits_grad_bytes: int  # the gradient of the logits, fp32, at the start of the backward pass
    inference_weight_bytes: int
    kv_cache_bytes: int
    logits_bytes: int  # one decoding step's logits (an encoder's: every position's), fp32

    @property
    def train_bytes(self) -> int:
        return self.train_state_bytes + self.activation_bytes + self.logits_grad_bytes

    @property
    def inference_bytes(self) -> int:
        return self.inference_weight_bytes + self.kv_cache_bytes + self.logits_bytes

    def report(self) -> str:
        c = self.config
        layout = (
            f"{c.n_layer} layers, {c.n_head} heads ({c.kv_heads} kv), {c.n_embd} wide, MLP {c.mlp} {c.mlp_hidden}, "
            f"{c.pos_emb} positions, {c.norm}, vocab {c.vocab_size}, {'causal' if c.causal else 'bidirectional'}"
        )
        return "\n".join(
            [
                f"model:      {layout}",
                f"parameters: {human(self.params)} ({self.params:,}; {human(self.non_embedding_params)} non-embedding)",
                f"FLOPs/token: {human(self.train_flops_per_token)} training (forward + backward), "
                f"{human(self.forward_flops_per_token)} forward, at context {self.context}",
                f"memory at batch {self.batch_size}, context {self.context}, {self.dtype} compute:",
                f"  training:  {gib(self.train_bytes)} = {gib(self.train_state_bytes)} weights, gradients and AdamW "
                f"state (fp32) + {gib(self.activation_bytes)} activations + {gib(self.logits_grad_bytes)} logits "
                "gradient",
                f"  inference: {gib(self.inference_bytes)} = {gib(self.inference_weight_bytes)} weights + "
                f"{gib(self.kv_cache_bytes)} KV cache + {gib(self.logits_bytes)} logits",
            ]
        )


def human(n: float) -> str:
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def gib(n: int) -> str:
    if n >= 2**27:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def model_info(config: ModelConfig, batch_size: int = 1, context: int | None = None, dtype: str = "bf16") -> ModelInfo:
    """Parameters, FLOPs per token and memory estimates for `config` at batch_size sequences of `context` tokens.

    context defaults to config.seq_len; dtype is the compute dtype (bf16, fp16 or fp32) of activations, inference
    weights and the KV cache. Training keeps fp32 weights whatever the compute dtype (mixed precision).
    """
    if dtype not in DTYPE_BYTES:
        raise LMForgeError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, not {dtype!r}")
    if batch_size < 1:
        raise LMForgeError(f"batch size must be at least 1, not {batch_size}")
    if config.vocab_size < 1:
        raise LMForgeError("model.vocab_size is not set; give --vocab-size (it comes from the tokenizer)")
    config = replace(config, seq_len=config.seq_len if context is None else context)  # validated like any value
    with torch.device("meta"):
        model = GPT(config)
    c, size = config, DTYPE_BYTES[dtype]
    params = model.num_params()
    tokens = batch_size * c.seq_len
    kv_width = c.kv_heads * c.head_dim
    per_layer = 4 * c.n_embd + (c.n_embd + 2 * kv_width) + c.n_embd + MLP_SAVED[c.mlp] * c.mlp_hidden
    hidden_states = c.n_layer * per_layer + 2 * c.n_embd  # plus the final norm's input and output
    log_probs = 4 * c.vocab_size  # the loss computes in fp32 and keeps its log-softmax output
    train_flops = model.flops_per_token()
    return ModelInfo(
        config=c,
        batch_size=batch_size,
        context=c.seq_len,
        dtype=dtype,
        params=params,
        non_embedding_params=model.num_params(non_embedding=True),
        train_flops_per_token=train_flops,
        forward_flops_per_token=train_flops // 3,
        train_state_bytes=ADAMW_BYTES_PER_PARAM * params,
        activation_bytes=tokens * (hidden_states * size + log_probs),
        logits_grad_bytes=tokens * 4 * c.vocab_size,
        inference_weight_bytes=params * size,
        kv_cache_bytes=2 * c.n_layer * batch_size * c.seq_len * kv_width * size if c.causal else 0,
        logits_bytes=batch_size * (1 if c.causal else c.seq_len) * c.vocab_size * 4,
    )
