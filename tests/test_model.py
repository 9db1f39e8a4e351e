import dataclasses
import math

import pytest
import torch

from lmforge.errors import LMForgeError
from lmforge.model.gpt import GPT, MLP, ModelConfig, Norm, apply_rope, rope_tables, sinusoidal_table, split_qkv

VARIANTS = {
    "gpt2": {},
    "sinusoidal": {"pos_emb": "sinusoidal"},
    "llama": {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "n_kv_head": 1},
    "gqa_qknorm_relu2": {"pos_emb": "rope", "n_head": 4, "n_kv_head": 2, "qk_norm": True, "mlp": "relu2"},
    "untied_nopos": {"tie_embeddings": False, "pos_emb": "none"},
}


def tiny_model(seed: int = 0, **fields) -> GPT:
    torch.manual_seed(seed)
    config = {"vocab_size": 50, "seq_len": 16, "n_layer": 2, "n_head": 2, "n_embd": 32, **fields}
    return GPT(ModelConfig(**config)).eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_causal_mask_hides_the_future(variant):
    model = tiny_model(**VARIANTS[variant])
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    base, _ = model(idx)
    for t in (0, 7, 14):
        changed = idx.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 1) % 50
        logits, _ = model(changed)
        assert torch.equal(logits[:, : t + 1], base[:, : t + 1]), f"position <= {t} saw token {t + 1}"
        assert not torch.allclose(logits[:, t + 1 :], base[:, t + 1 :])


def test_encoder_sees_both_sides():
    model = tiny_model(causal=False)
    idx = torch.randint(0, 50, (1, 16), generator=torch.Generator().manual_seed(2))
    base, _ = model(idx)
    changed = idx.clone()
    changed[0, 10] = (changed[0, 10] + 1) % 50
    logits, _ = model(changed)
    assert not torch.allclose(logits[0, :10], base[0, :10])


@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_overfits_one_batch(variant):
    model = tiny_model(**VARIANTS[variant]).train()
    x = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(3))
    y = torch.roll(x, -1, dims=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1  # from ln(50) = 3.9; 0.002-0.024 over seeds 0-4


def test_loss_ignores_masked_targets():
    model = tiny_model()
    x = torch.randint(0, 50, (2, 16))
    y = torch.randint(0, 50, (2, 16))
    masked = y.clone()
    masked[:, :8] = -100
    logits, loss = model(x, masked)
    expected = torch.nn.functional.cross_entropy(logits[:, 8:].reshape(-1, 50), y[:, 8:].reshape(-1))
    assert torch.allclose(loss, expected)


def test_parameter_count_and_flops():
    model = tiny_model()
    c = model.config
    per_block = 4 * (c.n_embd * c.n_embd + c.n_embd) + 2 * c.n_embd * 4 * c.n_embd + 5 * c.n_embd + 4 * c.n_embd
    expected = c.vocab_size * c.n_embd + c.seq_len * c.n_embd + c.n_layer * per_block + 2 * c.n_embd
    assert model.num_params() == expected
    assert model.flops_per_token() > 6 * model.num_params(non_embedding=True)


def test_bad_configs_name_the_field():
    for fields, field in [
        ({"n_embd": 30, "n_head": 4}, "n_embd"),
        ({"pos_emb": "alibi"}, "pos_emb"),
        ({"n_head": 4, "n_kv_head": 3}, "n_kv_head"),
        ({"dropout": 1.5}, "dropout"),
    ]:
        with pytest.raises(LMForgeError, match=field):
            ModelConfig(**fields)


def test_longer_than_context_is_an_error():
    with pytest.raises(LMForgeError, match="context"):
        tiny_model()(torch.zeros(1, 17, dtype=torch.long))


# ---------------------------------------------------------------------------------------- every config field


def test_positions_break_permutation_symmetry_unless_there_are_none():
    """An encoder without positions is permutation-equivariant; every kind of position encoding breaks that."""
    idx = torch.randint(0, 50, (1, 16), generator=torch.Generator().manual_seed(4))
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(5))
    for pos_emb in ("none", "learned", "sinusoidal", "rope"):
        model = tiny_model(pos_emb=pos_emb, causal=False)
        logits, _ = model(idx)
        permuted, _ = model(idx[:, perm])
        assert torch.allclose(permuted, logits[:, perm], atol=1e-5) == (pos_emb == "none"), pos_emb
    assert tiny_model(pos_emb="learned").pos_emb.weight.shape == (16, 32)
    assert tiny_model(pos_emb="sinusoidal").pos_emb is None  # a fixed table, not a parameter


def test_sinusoidal_table_is_sin_on_even_cos_on_odd_channels():
    table = sinusoidal_table(10, 8)
    pos = torch.arange(10.0)
    for i in range(4):
        freq = 10000.0 ** (-2 * i / 8)
        assert torch.allclose(table[:, 2 * i], torch.sin(pos * freq), atol=1e-6)
        assert torch.allclose(table[:, 2 * i + 1], torch.cos(pos * freq), atol=1e-6)


def test_rope_scores_depend_only_on_relative_position():
    cos, sin = rope_tables(32, 8, theta=10000.0)
    g = torch.Generator().manual_seed(6)
    q, k = torch.randn(1, 1, 1, 8, generator=g), torch.randn(1, 1, 1, 8, generator=g)

    def score(m: int, n: int) -> torch.Tensor:
        return (apply_rope(q, cos[m : m + 1], sin[m : m + 1]) * apply_rope(k, cos[n : n + 1], sin[n : n + 1])).sum()

    assert torch.allclose(score(3, 1), score(20, 18), atol=1e-5)
    assert not torch.allclose(score(3, 1), score(3, 2), atol=1e-3)
    assert torch.allclose(apply_rope(q, cos[:1], sin[:1]), q)  # position 0 is not rotated


def test_rope_theta_sets_the_wavelengths():
    cos, _ = rope_tables(4, 8, theta=100.0)
    assert torch.allclose(cos[1], torch.cos(100.0 ** (-torch.arange(0, 8, 2) / 8)))
    idx = torch.randint(0, 50, (1, 16), generator=torch.Generator().manual_seed(7))
    a, _ = tiny_model(pos_emb="rope")(idx)
    b, _ = tiny_model(pos_emb="rope", rope_theta=100.0)(idx)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_norms_match_torch(kind):
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(8)) * 3 + 1
    norm = Norm(16, kind, eps=1e-5, bias=True)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        if norm.bias is not None:
            norm.bias.uniform_(-1, 1)
    reference = torch.nn.LayerNorm(16, eps=1e-5) if kind == "layernorm" else torch.nn.RMSNorm(16, eps=1e-5)
    reference.load_state_dict(norm.state_dict())
    assert torch.allclose(norm(x), reference(x), atol=1e-6)
    assert (norm.bias is None) == (kind == "rmsnorm")  # RMSNorm has no bias (Llama)
    model = tiny_model(norm=kind)
    assert all(block.attn_norm.kind == kind for block in model.blocks) and model.norm.kind == kind


@pytest.mark.parametrize("kind", ["gelu", "swiglu", "relu2"])
def test_mlp_kinds(kind):
    config = ModelConfig(vocab_size=50, n_embd=32, n_head=2, mlp=kind)
    torch.manual_seed(0)
    mlp = MLP(config)
    x = torch.randn(2, 3, 32)
    up = mlp.up_proj(x)
    expected = {
        "gelu": lambda: 0.5 * up * (1 + torch.tanh(math.sqrt(2 / math.pi) * (up + 0.044715 * up**3))),  # gelu_new
        "swiglu": lambda: torch.nn.functional.silu(mlp.gate_proj(x)) * up,
        "relu2": lambda: torch.relu(up) ** 2,
    }[kind]()
    assert torch.allclose(mlp(x), mlp.down_proj(expected), atol=1e-6)
    assert (mlp.gate_proj is None) == (kind != "swiglu")
    # SwiGLU's three matrices keep the parameter count of two at 4x, rounded up to a multiple of 64
    assert config.mlp_hidden == {"gelu": 128, "swiglu": 128, "relu2": 128}[kind]
    assert ModelConfig(n_embd=96, n_head=2, mlp=kind).mlp_hidden == {"gelu": 384, "swiglu": 256, "relu2": 384}[kind]
    assert ModelConfig(n_embd=32, n_head=2, mlp=kind, n_inner=37).mlp_hidden == 37  # explicit width wins


@pytest.mark.parametrize("n_kv_head", [1, 2])
def test_grouped_query_attention_equals_multi_head_with_shared_keys(n_kv_head):
    """GQA/MQA is MHA whose query heads in a group share one key and value head (query head h uses kv head
    h // (n_head / n_kv_head), as in transformers' repeat_kv)."""
    gqa = tiny_model(n_head=4, n_kv_head=n_kv_head, pos_emb="rope")
    assert gqa.blocks[0].attn.qkv_proj.weight.shape == ((4 + 2 * n_kv_head) * 8, 32)
    mha = tiny_model(n_head=4, pos_emb="rope")
    state = split_qkv(gqa.state_dict(), gqa.config)  # separate q/k/v tensors, as older checkpoints hold them
    for name, tensor in state.items():
        if ".k_proj." in name or ".v_proj." in name:  # (n_kv_head * head_dim, ...) -> (n_head * head_dim, ...)
            heads = tensor.view(n_kv_head, 8, *tensor.shape[1:])
            state[name] = heads.repeat_interleave(4 // n_kv_head, dim=0).reshape(32, *tensor.shape[1:])
    mha.load_state_dict(state)
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(9))
    assert torch.allclose(gqa(idx)[0], mha(idx)[0], atol=1e-5)
    assert gqa.num_params() < mha.num_params()


@pytest.mark.parametrize("bias", [True, False])
def test_bias_switches_every_bias(bias):
    names = [name for name, _ in tiny_model(bias=bias).named_parameters() if name.endswith(".bias")]
    assert bool(names) == bias
    if bias:  # every linear layer and every layernorm
        assert {
            "blocks.0.attn.qkv_proj.bias",
            "blocks.0.mlp.down_proj.bias",
            "blocks.1.attn_norm.bias",
            "norm.bias",
        } <= set(names)


def test_tie_embeddings():
    tied, untied = tiny_model(), tiny_model(tie_embeddings=False)
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert untied.lm_head.weight is not untied.tok_emb.weight
    assert untied.num_params() - tied.num_params() == 50 * 32
    assert "lm_head.weight" in dict(untied.named_parameters()) and "lm_head.weight" not in dict(tied.named_parameters())


def test_qk_norm_makes_attention_blind_to_query_and_key_scale():
    idx = torch.randint(0, 50, (1, 16), generator=torch.Generator().manual_seed(10))
    for qk_norm in (True, False):
        model = tiny_model(qk_norm=qk_norm, bias=False)
        before, _ = model(idx)
        with torch.no_grad():
            for block in model.blocks:
                block.attn.qkv_proj.weight[: 2 * 32].mul_(7.0)  # the query and key rows
        after, _ = model(idx)
        assert torch.allclose(before, after, atol=1e-4) == qk_norm
    assert tiny_model(qk_norm=True).blocks[0].attn.q_norm.weight.shape == (16,)  # per head: head_dim wide


def test_dropout_only_in_training():
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(11))
    model = tiny_model(dropout=0.3)
    assert torch.equal(model(idx)[0], model(idx)[0])  # eval: deterministic
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])
    plain = tiny_model().train()
    assert torch.equal(plain(idx)[0], plain(idx)[0])  # dropout 0 draws nothing


def test_encoder_is_not_causal_anywhere():
    """Bidirectional: changing the last token changes the first position's output, in every layer's attention."""
    model = tiny_model(causal=False, pos_emb="rope", norm="rmsnorm", mlp="swiglu")
    idx = torch.randint(0, 50, (1, 16), generator=torch.Generator().manual_seed(12))
    changed = idx.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 50
    assert not torch.allclose(model(idx)[0][0, 0], model(changed)[0][0, 0])
    causal = tiny_model(causal=True, pos_emb="rope", norm="rmsnorm", mlp="swiglu")
    causal.load_state_dict(model.state_dict())  # the same weights, masked: the first position cannot see the last
    assert torch.allclose(causal(idx)[0][0, 0], causal(changed)[0][0, 0])


def test_every_config_field_has_a_test():
    """A new ModelConfig field must come with a test in this file; this list is the reminder."""
    tested = {
        "vocab_size", "seq_len", "n_layer", "n_head", "n_kv_head", "n_embd", "mlp_ratio", "n_inner", "pos_emb",
        "rope_theta", "norm", "norm_eps", "mlp", "bias", "tie_embeddings", "qk_norm", "dropout", "causal",
    }  # fmt: skip
    assert {f.name for f in dataclasses.fields(ModelConfig)} == tested


def test_norm_eps_and_mlp_ratio_reach_the_model():
    model = tiny_model(norm_eps=0.5, mlp_ratio=2.0)
    assert model.blocks[0].attn_norm.eps == 0.5 and model.norm.eps == 0.5
    assert model.blocks[0].mlp.up_proj.weight.shape == (64, 32)
    with pytest.raises(LMForgeError, match="n_inner"):
        ModelConfig(n_inner=-1)
