"""The whole transformer in one file: norm, attention, MLP, block, GPT (its config is in model/config.py).

Every architecture lmforge trains is this one module; the variants (GPT-2, Llama, BERT-style encoder) are
config fields, not subclasses. The module holds no infrastructure: no optimizer, I/O, logging or
distributed code lives here (see `lmforge.train`), and sampling lives in `lmforge.generate`. The one forward
pass serves training and decoding alike: rows of a batch may stand at different positions and write their keys
and values to chosen rows of a `KVCache`, which is what continuous batching needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.errors import LMForgeError
from lmforge.model.config import ModelConfig
from lmforge.model.kv_cache import KVCache, Placement


def sinusoidal_table(seq_len: int, dim: int) -> torch.Tensor:
    """The fixed positional encoding of "Attention Is All You Need": sin on even, cos on odd channels."""
    position = torch.arange(seq_len, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(seq_len, dim)
    table[:, 0::2] = torch.sin(position * div)
    table[:, 1::2] = torch.cos(position * div)[:, : dim // 2]
    return table


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, (seq_len, head_dim/2), in the half-split layout Llama uses."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, n_head, T, head_dim); cos/sin: (T, head_dim/2). Rotates pairs (i, i + head_dim/2).
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


def qkv_sizes(config: ModelConfig) -> list[int]:
    """Output widths of the query, key and value slices of the fused qkv_proj."""
    kv = config.kv_heads * config.head_dim
    return [config.n_head * config.head_dim, kv, kv]


def fuse_qkv(state: dict, prefix: str, join=torch.cat) -> None:
    """In place: separate `{prefix}q_proj`, `k_proj` and `v_proj` entries become one `{prefix}qkv_proj` entry.

    Checkpoints from before the fused projection, and imports whose maps name the three projections, load so.
    join stacks the three entries: tensors by default; checkpoint.py passes one for optimizer states.
    """
    for leaf in ("weight", "bias"):
        names = [f"{prefix}{part}_proj.{leaf}" for part in "qkv"]
        if all(name in state for name in names):
            state[f"{prefix}qkv_proj.{leaf}"] = join([state.pop(name) for name in names])


def split_qkv(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """A copy of a GPT state dict with each qkv_proj cut into q_proj, k_proj and v_proj (views, no copies)."""
    out = {}
    for name, tensor in state.items():
        owner, _, leaf = name.rpartition(".")
        if owner.endswith("qkv_proj"):
            base = owner[: -len("qkv_proj")]
            for part, piece in zip("qkv", tensor.split(qkv_sizes(config))):
                out[f"{base}{part}_proj.{leaf}"] = piece
        else:
            out[name] = tensor
    return out


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """F.scaled_dot_product_attention, except that on CPU attention trained in bf16 is computed in fp32.

    PyTorch's CPU flash-attention kernels are slower in bf16 than in fp32, the backward most of all (2.4x at
    12x2x64x64, bench/throughput.py records the effect on a training step), so under bf16 autocast on CPU the
    scores are computed from fp32 copies of q, k and v and the output is cast back. Inference keeps bf16: there
    the casts of a long KV cache cost more than they save.
    """
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.requires_grad:
        with torch.autocast("cpu", enabled=False):
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs)
        return y.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout, skipped outright when off: a plain call, not an nn.Dropout module, whose call per layer costs a
    decoding step measurable time."""
    return F.dropout(x, p, training=True) if p and training else x


@dataclass
class Context:
    """What every layer of one forward pass shares: rotary tables, the attention mask, the cache placement."""

    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin: (T, head_dim/2) or (B, 1, T, head_dim/2)
    mask: torch.Tensor | None = None  # bool, True where a query may attend to a key; broadcast to (B, heads, T, keys)
    is_causal: bool = False
    cache: KVCache | None = None
    place: Placement | None = None


class Norm(nn.Module):
    def __init__(self, dim: int, kind: str, eps: float, bias: bool):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias and kind == "layernorm" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "rmsnorm":
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)
        return F.layer_norm(x, (x.size(-1),), self.weight, self.bias, self.eps)


class Attention(nn.Module):
    """Multi-head self-attention with one fused input projection: q, k and v come from a single matmul.

    `qkv_proj` stacks the query (n_head heads), key and value (n_kv_head heads each) projections along its
    output dimension, in that order. Checkpoints written with three separate q/k/v projections load unchanged:
    `_load_from_state_dict` stacks them (see `fuse_qkv`).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        self.dropout = config.dropout
        self.sizes = qkv_sizes(config)
        self.qkv_proj = nn.Linear(config.n_embd, sum(self.sizes), bias=config.bias)
        self.o_proj = nn.Linear(config.n_head * self.head_dim, config.n_embd, bias=config.bias)
        self.q_norm = Norm(self.head_dim, "rmsnorm", config.norm_eps, False) if config.qk_norm else None
        self.k_norm = Norm(self.head_dim, "rmsnorm", config.norm_eps, False) if config.qk_norm else None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        fuse_qkv(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor, ctx: Context, layer: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.sizes, dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv_head, T, head_dim)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if ctx.rope is not None:
            q, k = apply_rope(q, *ctx.rope), apply_rope(k, *ctx.rope)
        if ctx.cache is not None:
            k, v = ctx.cache.update(layer, k, v, ctx.place)  # (B, n_kv_head, keys so far, head_dim)
        # The mask is applied to the scores before the softmax, inside scaled_dot_product_attention.
        y = attend(
            q,
            k,
            v,
            attn_mask=ctx.mask,
            is_causal=ctx.is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head,
        )  # (B, n_head, T, head_dim)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.kind = config.mlp
        hidden = config.mlp_hidden
        self.up_proj = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.gate_proj = nn.Linear(config.n_embd, hidden, bias=config.bias) if self.kind == "swiglu" else None
        self.down_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        elif self.kind == "relu2":
            h = F.relu(self.up_proj(x)).square()
        else:
            h = F.gelu(self.up_proj(x), approximate="tanh")
        return self.down_proj(h)


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attn_norm = Norm(config.n_embd, config.norm, config.norm_eps, config.bias)
        self.attn = Attention(config)
        self.mlp_norm = Norm(config.n_embd, config.norm, config.norm_eps, config.bias)
        self.mlp = MLP(config)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, ctx: Context, layer: int = 0) -> torch.Tensor:
        x = x + dropout(self.attn(self.attn_norm(x), ctx, layer), self.dropout, self.training)
        return x + dropout(self.mlp(self.mlp_norm(x)), self.dropout, self.training)


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.vocab_size < 1:
            raise LMForgeError("model.vocab_size is not set; it comes from the data dir's tokenizer")
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.seq_len, config.n_embd) if config.pos_emb == "learned" else None
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = Norm(config.n_embd, config.norm, config.norm_eps, config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        # Fixed tables are buffers, not parameters, and are not saved: they are a function of the config.
        if config.pos_emb == "sinusoidal":
            self.register_buffer("sin_table", sinusoidal_table(config.seq_len, config.n_embd), persistent=False)
        if config.pos_emb == "rope":
            cos, sin = rope_tables(config.seq_len, config.head_dim, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter; called once at construction, never when weights are loaded.

        - Linear weights and embeddings: normal(0, 0.02), as GPT-2.
        - Output projections of attention and MLP (o_proj, down_proj): normal(0, 0.02 / sqrt(2 * n_layer)),
          so the residual stream's variance does not grow with depth (GPT-2).
        - Biases: zero. Norm weights: one, norm biases: zero.
        - An untied lm_head: normal(0, 0.02) like the rest.
        """
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, param in self.named_parameters():
            if name.endswith("o_proj.weight") or name.endswith("down_proj.weight"):
                param.copy_(torch.randn(param.shape) * residual_std)
            elif param.dim() >= 2:
                param.copy_(torch.randn(param.shape) * 0.02)
            elif "norm" in name and name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.zero_()

    def num_params(self, non_embedding: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.tok_emb.weight.numel()
            if self.pos_emb is not None:
                total -= self.pos_emb.weight.numel()
        return total

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward): 6 per weight plus attention's score and value matmuls."""
        c = self.config
        weights = self.num_params(non_embedding=True)
        if not c.tie_embeddings:
            weights -= self.lm_head.weight.numel()
        weights += c.vocab_size * c.n_embd  # the output projection is a matmul per token, tied or not
        attention = 12 * c.n_layer * c.n_embd * c.seq_len // (2 if c.causal else 1)
        return 6 * weights + attention

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        pos: int | list[int] = 0,
        attention_mask: torch.Tensor | None = None,
        return_hidden: bool = False,
        slots: list[int] | None = None,
    ):
        """idx: (B, T) token ids. Returns logits (B, T, vocab) and the loss if targets.

        Row b holds positions pos..pos+T-1, or pos[b]..pos[b]+T-1 when pos is a list: rows of a batch may stand at
        different positions (prompts of different lengths, requests that joined a batch at different steps).
        With a cache, row b's keys and values are written to cache row slots[b] (default b) at its positions, and
        its queries see that row's cached keys up to their own position; rows may be right-padded, since a padded
        position's key is seen only by later positions, which overwrite it before any real query reads it.
        With targets, the loss is the mean cross-entropy over targets that are not -100. attention_mask (B, T) is
        False at padding, which no position attends to (right-padded rows for an encoder; no cache). return_hidden
        gives the final normed hidden states (B, T, n_embd) in place of logits, for a task head or a sampler.
        """
        B, T = idx.shape
        device = idx.device
        shared = isinstance(pos, int) or all(p == pos[0] for p in pos)
        first = pos if isinstance(pos, int) else pos[0]
        end = (first if shared else max(pos)) + T
        if end > self.config.seq_len:
            raise LMForgeError(f"sequence of {end} tokens is longer than the model's context of {self.config.seq_len}")
        if shared:
            positions = torch.arange(first, end, device=device)  # (T,): the same for every row
        else:
            positions = torch.tensor(pos, device=device)[:, None] + torch.arange(T, device=device)  # (B, T)
        x = self.tok_emb(idx)  # (B, T, n_embd)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        elif self.config.pos_emb == "sinusoidal":
            x = x + self.sin_table[positions].to(x.dtype)
        x = dropout(x, self.config.dropout, self.training)
        ctx = self.context(B, T, positions, end, cache, slots, attention_mask)
        for layer, block in enumerate(self.blocks):
            x = block(x, ctx, layer)
        x = self.norm(x)
        if return_hidden:
            return x, None
        if targets is None:
            return self.lm_head(x), None
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def context(self, B, T, positions, end, cache, slots, attention_mask) -> Context:
        """The rotary tables, mask and cache placement of one forward pass, made once for all its layers."""
        ctx = Context()
        if self.config.pos_emb == "rope":
            ctx.rope = (self.rope_cos[positions], self.rope_sin[positions])
            if positions.dim() == 2:  # (B, T, head_dim/2) -> (B, 1, T, head_dim/2), broadcast over heads
                ctx.rope = (ctx.rope[0][:, None], ctx.rope[1][:, None])
        if cache is not None:
            if attention_mask is not None:
                raise ValueError("attention_mask is for padded encoder batches; a cached decoder takes pos instead")
            ctx.cache, ctx.place = cache, cache.place(list(range(B)) if slots is None else slots, positions, end)
        if attention_mask is not None:  # (B, T), False at padding: no query attends to a padded key
            ctx.mask = attention_mask[:, None, None, :]  # (B, 1, 1, T)
            if self.config.causal:
                ctx.mask = ctx.mask & torch.ones(T, T, dtype=torch.bool, device=positions.device).tril()
        elif self.config.causal:
            if cache is None or end == T:  # the keys are this pass's own tokens: plain causal attention
                ctx.is_causal = True
            elif T > 1 or positions.dim() == 2:  # new queries after cached keys: each sees keys up to its position
                key_pos = torch.arange(end, device=positions.device)
                ctx.mask = key_pos <= positions[..., None]  # (T, end) or (B, T, end)
                if positions.dim() == 2:
                    ctx.mask = ctx.mask[:, None]  # (B, 1, T, end)
            # else one new token per row at one shared position: it sees every cached key, no mask needed
        return ctx
