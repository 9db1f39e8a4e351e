import pytest
import torch

from lmforge.errors import LMForgeError
from lmforge.model.gpt import GPT, ModelConfig

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
    assert loss.item() < 0.05


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
