import pytest
import torch

from lmforge.api import LM
from lmforge.errors import LMForgeError
from lmforge.generate import TextStream, generate_tokens, sample
from lmforge.model.gpt import GPT, ModelConfig

LLAMA = {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "n_head": 4, "n_kv_head": 2}


def model_for(**fields) -> GPT:
    torch.manual_seed(0)
    config = {"vocab_size": 40, "seq_len": 24, "n_layer": 2, "n_head": 2, "n_embd": 32, **fields}
    return GPT(ModelConfig(**config)).eval()


@pytest.mark.parametrize("fields", [{}, LLAMA, {"pos_emb": "sinusoidal"}], ids=["gpt2", "llama", "sinusoidal"])
def test_cached_equals_uncached_through_window_slides(fields):
    model = model_for(**fields)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    # 60 new tokens in a 24-token context: the window slides several times on both paths.
    for temperature in (0.0, 1.0):
        cached = torch.stack(list(generate_tokens(model, prompt, 60, temperature, seed=7, num_samples=3)), 1)
        uncached = torch.stack(
            list(generate_tokens(model, prompt, 60, temperature, seed=7, num_samples=3, use_cache=False)), 1
        )
        assert torch.equal(cached, uncached)


def test_seed_reproduces_and_greedy_is_repeatable():
    model = model_for()
    runs = [torch.stack(list(generate_tokens(model, [1, 2], 20, 1.0, seed=s)), 1) for s in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    greedy = [torch.stack(list(generate_tokens(model, [1, 2], 20, 0.0)), 1) for _ in range(2)]
    assert torch.equal(*greedy)


def test_sample_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample(logits, 1.0, top_k=2, generator=g).tolist()) == {2, 3}
    # probabilities 0.032, 0.087, 0.237, 0.644: top_p 0.7 keeps tokens 3 and 2
    assert set(sample(logits, 1.0, top_p=0.7, generator=g).tolist()) == {2, 3}
    assert set(sample(logits, 1.0, top_p=0.5, generator=g).tolist()) == {3}
    assert sample(logits[:1], 0.0).item() == 3
    assert set(sample(logits, 1.0, generator=g).tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
    ],
)
def test_bad_sampling_parameters(kwargs, message):
    args = {"max_new_tokens": 5, "temperature": 1.0, **kwargs}
    with pytest.raises(LMForgeError, match=message):
        next(generate_tokens(model_for(), [1], **args))


def test_prompt_longer_than_context_is_refused():
    with pytest.raises(LMForgeError, match="context"):
        next(generate_tokens(model_for(), list(range(25)), 5))


def test_lm_stream_equals_generate(tiny_run):
    lm = LM.load(tiny_run)
    streamed = "".join(lm.stream("First", max_new_tokens=40, temperature=0.9, seed=3))
    assert streamed == lm.generate("First", max_new_tokens=40, temperature=0.9, seed=3)[0]
    assert len(streamed) > 0
    assert len(lm.generate("First", max_new_tokens=10, seed=1, num_samples=3)) == 3


def test_text_stream_holds_back_partial_characters():
    from lmforge.data.tokenizer import bpe_tokenizer

    tok = bpe_tokenizer(iter(["plain ascii text " * 50]), 270)
    ids = tok.encode("a🙂b東")
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == "a🙂b東"
    assert all("\ufffd" not in p for p in pieces)
