"""Presets, the depth dial and `lmforge info`: sizes against known models, and estimates against exact counts."""

import math
from dataclasses import replace

import pytest
import torch

from lmforge import presets
from lmforge.cli import main
from lmforge.config import RunConfig, apply_overrides
from lmforge.errors import LMForgeError
from lmforge.info import model_info
from lmforge.model.gpt import GPT, ModelConfig


def resolved(overrides: dict, vocab_size: int) -> RunConfig:
    config = apply_overrides(RunConfig(), overrides)
    return replace(config, model=replace(config.model, vocab_size=vocab_size))


def meta_model(config: ModelConfig) -> GPT:
    with torch.device("meta"):
        return GPT(config)


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_every_preset_resolves_and_builds(name):
    config = resolved(presets.get(name), 1000)
    assert config.preset == name
    assert meta_model(config.model).num_params() > 0
    assert config.train.max_steps or config.train.time  # a run must have an end


@pytest.mark.parametrize(
    "name, vocab_size, params",
    [
        ("gpt2", 50257, 124_439_808),  # GPT-2 small as published (tied embeddings, 1024 positions)
        ("gpt2-medium", 50257, 354_823_168),
    ],
)
def test_gpt2_presets_have_gpt2_parameter_counts(name, vocab_size, params):
    assert meta_model(resolved(presets.get(name), vocab_size).model).num_params() == params


@pytest.mark.parametrize("name, millions", [("llama-20m", 20), ("llama-60m", 60), ("llama-150m", 150)])
def test_llama_presets_are_the_size_they_are_named(name, millions):
    c = resolved(presets.get(name), 32000).model
    assert (c.pos_emb, c.norm, c.mlp, c.bias) == ("rope", "rmsnorm", "swiglu", False)
    assert 1 < c.kv_heads < c.n_head  # grouped-query attention
    assert abs(meta_model(c).num_params() / 1e6 - millions) / millions < 0.1


def test_bert_preset_is_a_masked_lm_encoder():
    config = resolved(presets.get("bert"), 30522)
    assert not config.model.causal and config.train.objective == "mlm"
    assert (config.model.n_layer, config.model.n_embd, config.model.n_head) == (12, 768, 12)


@pytest.mark.parametrize("depth", [1, 2, 4, 6, 12, 20, 32])
def test_depth_dial_derives_every_size(depth):
    overrides = presets.from_depth(depth)
    assert overrides == presets.from_depth(depth)  # pure
    config = apply_overrides(RunConfig(), overrides)
    c = config.model
    assert (c.n_layer, c.n_embd, c.head_dim) == (depth, 64 * depth, 64)
    batch_tokens = config.train.batch_tokens
    assert 2**12 <= batch_tokens <= 2**19 and batch_tokens & (batch_tokens - 1) == 0
    tokens = 20 * 12 * depth * c.n_embd**2
    assert config.train.max_steps == math.ceil(tokens / batch_tokens)
    assert 0 < config.optim.warmup_steps < config.train.max_steps


def test_depth_12_is_gpt2_small_and_lr_falls_with_width():
    c = apply_overrides(RunConfig(), presets.from_depth(12))
    gpt2 = apply_overrides(RunConfig(), presets.get("gpt2"))
    assert (c.model.n_layer, c.model.n_head, c.model.n_embd) == (gpt2.model.n_layer, gpt2.model.n_head, 768)
    assert c.optim.lr == gpt2.optim.lr == 6e-4
    lrs = [presets.from_depth(d)["optim.lr"] for d in range(1, 33)]
    assert lrs == sorted(lrs, reverse=True) and len(set(lrs)) == len(lrs)


@pytest.mark.parametrize("depth", [0, -3, 2.5, True])
def test_depth_must_be_a_positive_whole_number(depth):
    with pytest.raises(LMForgeError, match="depth"):
        presets.from_depth(depth)


LLAMA = {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "n_kv_head": 2}


@pytest.mark.parametrize("fields", [{}, LLAMA, {"mlp": "relu2", "causal": False}], ids=["gpt2", "llama", "relu2"])
def test_info_counts_equal_a_real_model(fields):
    config = ModelConfig(vocab_size=100, seq_len=32, n_layer=2, n_head=4, n_embd=64, **fields)
    info = model_info(config, batch_size=3, context=16, dtype="fp32")
    model = GPT(replace(config, seq_len=16))
    assert info.params == model.num_params() and info.train_flops_per_token == model.flops_per_token()
    assert info.non_embedding_params == model.num_params(non_embedding=True)
    assert info.forward_flops_per_token * 3 == info.train_flops_per_token
    assert info.train_state_bytes == 16 * info.params
    assert info.inference_weight_bytes == 4 * info.params
    # the KV cache our decoder allocates for this batch and context, byte for byte; an encoder keeps none
    kv_width = config.kv_heads * config.head_dim
    assert info.kv_cache_bytes == (2 * config.n_layer * 3 * 16 * kv_width * 4 if config.causal else 0)
    assert info.logits_bytes == 3 * (1 if config.causal else 16) * 100 * 4


@pytest.mark.parametrize(
    "fields",
    [{}, LLAMA, {"mlp": "relu2", "vocab_size": 3000}, {"causal": False, "n_embd": 128, "n_head": 8}],
    ids=["gpt2", "llama", "relu2_big_vocab", "encoder"],
)
def test_activation_estimate_is_close_to_what_autograd_saves(fields):
    """fp32 on a CPU: every tensor saved for backward that is not a parameter (or a view of one), counted once."""
    config = ModelConfig(**{"vocab_size": 100, "seq_len": 32, "n_layer": 3, "n_head": 4, "n_embd": 64, **fields})
    torch.manual_seed(0)
    model = GPT(config).train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    idx = torch.randint(0, config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(idx, idx)
    estimate = model_info(config, batch_size=4, dtype="fp32").activation_bytes
    assert 0.8 < estimate / sum(saved.values()) < 1.2


def test_info_memory_scales_with_batch_context_and_dtype():
    config = ModelConfig(vocab_size=1000, seq_len=128, n_layer=4, n_head=4, n_embd=128)
    base = model_info(config, batch_size=2, context=64)
    double_batch = model_info(config, batch_size=4, context=64)
    assert double_batch.activation_bytes == 2 * base.activation_bytes
    assert double_batch.kv_cache_bytes == 2 * base.kv_cache_bytes
    assert double_batch.train_state_bytes == base.train_state_bytes
    assert model_info(config, 2, 128).activation_bytes == 2 * base.activation_bytes
    fp32 = model_info(config, batch_size=2, context=64, dtype="fp32")
    assert (
        fp32.kv_cache_bytes == 2 * base.kv_cache_bytes
        and fp32.inference_weight_bytes == 2 * base.inference_weight_bytes
    )
    assert fp32.activation_bytes > base.activation_bytes
    assert base.train_bytes > base.inference_bytes
    for bad, message in [({"dtype": "int3"}, "dtype"), ({"batch_size": 0}, "batch"), ({"context": 0}, "seq_len")]:
        with pytest.raises(LMForgeError, match=message):
            model_info(config, **{"batch_size": 1, **bad})


def test_cli_info(tmp_path, capsys):
    assert main(["info", "--preset", "gpt2", "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "124.4M (124,439,808" in out and "batch 8, context 1024" in out and "KV cache" in out
    assert main(["info", "--depth", "4", "--vocab-size", "100", "--context", "64", "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "4 layers, 4 heads (4 kv), 256 wide" in out and "context 64, fp32" in out
    assert main(["info", str(tmp_path)]) == 2
    assert "not a run dir" in capsys.readouterr().err
    RunConfig(model=ModelConfig(vocab_size=77, n_layer=3)).save(tmp_path / "config.json")
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "3 layers" in out and "vocab 77" in out
