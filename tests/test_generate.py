import itertools
import warnings

import pytest
import torch

from lmforge.api import LM
from lmforge.errors import LMForgeError
from lmforge.generate import (
    Engine,
    SamplingParams,
    TextStream,
    beam_search,
    generate,
    sample,
)
from lmforge.model.gpt import GPT, ModelConfig
from lmforge.model.kv_cache import KVCache

LLAMA = {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "n_head": 4, "n_kv_head": 2}
VARIANTS = {
    "gpt2": {},
    "llama": LLAMA,
    "sinusoidal": {"pos_emb": "sinusoidal"},
    "qknorm-untied": {"qk_norm": True, "tie_embeddings": False, "mlp": "relu2", "n_kv_head": 1},
}
PROMPTS = [[3, 1, 4, 1, 5], [2, 7], [9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3]]  # different lengths in one batch


pytestmark = pytest.mark.usefixtures("one_thread")


def model_for(**fields) -> GPT:
    torch.manual_seed(0)
    config = {"vocab_size": 40, "seq_len": 24, "n_layer": 2, "n_head": 2, "n_embd": 32, **fields}
    return GPT(ModelConfig(**config)).eval()


def tokens(completions) -> list[list[int]]:
    return [c.token_ids for c in completions]


@pytest.mark.parametrize("fields", VARIANTS.values(), ids=VARIANTS.keys())
def test_rows_at_different_positions_equal_one_row_at_a_time(fields):
    """Rows at different positions in cache slots, prefilled together then decoded a token at a time, give the
    logits each row gets alone with no cache."""
    model = model_for(**fields)
    full = [p + [7, 1, 8, 2, 8, 1, 8] for p in PROMPTS]
    lengths = [len(p) for p in PROMPTS]
    width = max(lengths)
    # slots not consecutive and not in order (rows are gathered), then consecutive (the cache is read as a view)
    # and a cache that starts at 2 positions and grows as the rows get longer
    for slots, initial in (([3, 0, 2], 256), ([1, 2, 3], 256), ([1, 2, 3], 2)):
        cache = KVCache.for_model(model, 4, initial=initial)
        with torch.no_grad():
            ids = torch.tensor([p + [0] * (width - len(p)) for p in PROMPTS])
            logits, _ = model(ids, cache=cache, pos=[0, 0, 0], slots=slots)
            for row, length in enumerate(lengths):
                want = model(torch.tensor([full[row][:length]]))[0][0]
                assert torch.allclose(logits[row, :length], want, atol=1e-5)
            for step in range(5):
                ids = torch.tensor([[f[n + step]] for f, n in zip(full, lengths)])
                logits = model(ids, cache=cache, pos=[n + step for n in lengths], slots=slots)[0][:, 0]
                for row, n in enumerate(lengths):
                    want = model(torch.tensor([full[row][: n + step + 1]]))[0][0, -1]
                    assert torch.allclose(logits[row], want, atol=1e-5)
            # two new tokens per row at different positions: the masked path
            ids = torch.tensor([[f[n + 5], f[n + 6]] for f, n in zip(full, lengths)])
            logits = model(ids, cache=cache, pos=[n + 5 for n in lengths], slots=slots)[0]
            for row, n in enumerate(lengths):
                want = model(torch.tensor([full[row][: n + 7]]))[0][0, -2:]
                assert torch.allclose(logits[row], want, atol=1e-5)
        assert cache.capacity == (24 if initial == 256 else 22)  # the context; or 2, 11 for the prompts, doubled


@pytest.mark.parametrize("fields", VARIANTS.values(), ids=VARIANTS.keys())
@pytest.mark.parametrize("overflow", ["stop", "slide"])
def test_cached_uncached_batched_and_single_agree(fields, overflow):
    model = model_for(**fields)
    # 40 new tokens in a 24-token context: "stop" ends each row at the context, "slide" slides its window.
    for temperature in (0.0, 1.0):
        params = SamplingParams(40, temperature, seed=7, overflow=overflow, stop_token_ids=(), logprobs=0)
        batched = generate(model, None, PROMPTS, params)
        uncached = generate(model, None, PROMPTS, params, use_cache=False)
        single = [generate(model, None, [p], params)[0] for p in PROMPTS]
        assert tokens(batched) == tokens(uncached) == tokens(single)
        for a, b in zip(batched, uncached):
            assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4)
        for prompt, c in zip(PROMPTS, batched):
            if overflow == "stop":
                assert len(prompt) + c.completion_tokens == 24 and c.finish_reason == "length"
            else:
                assert c.completion_tokens == 40 and c.finish_reason == "length"


def test_sequences_joining_a_running_batch_decode_as_if_alone():
    """Continuous batching: a sequence added while others are mid-way gets the same tokens as on its own."""
    model = model_for(**LLAMA)
    params = [SamplingParams(15, 1.0, seed=s, stop_token_ids=()) for s in (1, 2, 3)]
    alone = [generate(model, None, [p], q)[0].token_ids for p, q in zip(PROMPTS, params)]
    engine = Engine(model, None, max_batch=3)
    seqs = [engine.sequence(p, q) for p, q in zip(PROMPTS, params)]
    engine.add(seqs[0])
    for step in range(40):
        if step == 3:
            engine.add(seqs[1])
        if step == 6:
            engine.add(seqs[2])
        if step == 8:
            engine.cancel(seqs[0])  # frees its slot mid-way; the others go on undisturbed
            assert engine.free == 1 and seqs[0].finish_reason == "cancelled"
        engine.step()
    assert [s.output for s in seqs[1:]] == alone[1:]
    assert seqs[0].output == alone[0][: len(seqs[0].output)] and len(seqs[0].output) == 8
    assert engine.active == 0


def test_seed_reproduces_and_greedy_is_repeatable():
    model = model_for()

    def run(seed, prompts=([1, 2],), temperature=1.0):
        return tokens(generate(model, None, list(prompts), SamplingParams(20, temperature, seed=seed)))

    assert run(1) == run(1) and run(1) != run(2)
    # a seeded row draws the same sample whatever else is in its batch
    assert run(1, prompts=([1, 2], [5, 5, 5]))[0] == run(1)[0]
    assert run(None, temperature=0.0) == run(None, temperature=0.0) == run(5, temperature=0.0)


def test_sample_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample(logits, 1.0, top_k=2, generator=g).tolist()) == {2, 3}
    # probabilities 0.032, 0.087, 0.237, 0.644: top_p 0.7 keeps tokens 3 and 2
    assert set(sample(logits, 1.0, top_p=0.7, generator=g).tolist()) == {2, 3}
    assert set(sample(logits, 1.0, top_p=0.5, generator=g).tolist()) == {3}
    # min_p 0.3 keeps tokens at least 0.3 x 0.644 likely: 2 and 3
    assert set(sample(logits, 1.0, min_p=0.3, generator=g).tolist()) == {2, 3}
    assert sample(logits[:1], 0.0).item() == 3
    drawn = sample(logits, 1.0, generator=g)
    assert set(drawn.tolist()) == {0, 1, 2, 3}
    assert abs((drawn == 3).float().mean().item() - 0.644) < 0.05
    # per-row settings: row 0 greedy, row 1 top-k 1, row 2 free; per-row generators
    rows = sample(
        logits[:3] * torch.tensor([[1.0], [-1.0], [1.0]]),
        temperature=torch.tensor([0.0, 1.0, 1e-4]),
        top_k=torch.tensor([0, 1, 0]),
        generator=[torch.Generator().manual_seed(i) for i in range(3)],
    )
    assert rows.tolist() == [3, 0, 3]


def test_penalties_change_what_is_repeated():
    model = model_for()
    plain = generate(model, None, [[1, 2]], SamplingParams(20, 0.0, stop_token_ids=()))[0].token_ids
    assert len(set(plain)) < len(plain)  # an untrained greedy model repeats itself
    punished = SamplingParams(20, 0.0, frequency_penalty=2.0, presence_penalty=2.0, stop_token_ids=())
    out = generate(model, None, [[1, 2]], punished)[0].token_ids
    assert len(set(out)) == len(out) == 20  # every token generated once is pushed below the unused ones
    repeated = SamplingParams(20, 0.0, repetition_penalty=1e6, stop_token_ids=())
    out = generate(model, None, [[1, 2]], repeated)[0].token_ids
    assert out != plain and 1 not in out[:5]


def test_stop_token_ids_and_max_new_tokens_hold():
    model = model_for()
    plain = generate(model, None, [[1, 2]], SamplingParams(20, 0.0, stop_token_ids=()))[0]
    assert plain.completion_tokens == 20 and plain.finish_reason == "length"
    stopper = plain.token_ids[4]
    cut = generate(model, None, [[1, 2]], SamplingParams(20, 0.0, stop_token_ids=(stopper,)))[0]
    assert cut.token_ids == plain.token_ids[: plain.token_ids.index(stopper)]
    assert cut.finish_reason == "stop" and cut.completion_tokens == len(cut.token_ids) + 1
    for n in (1, 3, 7):
        c = generate(model, None, [[1, 2]], SamplingParams(n, 1.0, seed=n, stop_token_ids=()))[0]
        assert c.completion_tokens == len(c.token_ids) == n


def test_prompt_must_leave_room_in_the_context_unless_truncated():
    model = model_for()
    with pytest.raises(LMForgeError, match="context"):
        generate(model, None, [list(range(24))], SamplingParams(5))
    with pytest.raises(LMForgeError, match="empty"):
        generate(model, None, [[]], SamplingParams(5))
    with pytest.raises(LMForgeError, match="vocabulary"):
        generate(model, None, [[1, 40]], SamplingParams(5))
    long = list(range(30))
    c = generate(model, None, [long], SamplingParams(5, 0.0, truncate="left", stop_token_ids=()))[0]
    assert c.prompt_tokens == 19 and c.completion_tokens == 5  # room left for the 5 new tokens
    want = generate(model, None, [long[-19:]], SamplingParams(5, 0.0, stop_token_ids=()))[0]
    assert c.token_ids == want.token_ids
    c = generate(model, None, [long], SamplingParams(100, 0.0, truncate="left", stop_token_ids=()))[0]
    assert c.prompt_tokens == 12 and c.completion_tokens == 12 and c.finish_reason == "length"


def test_logprobs_are_the_models():
    model = model_for(**LLAMA)
    c = generate(model, None, [[4, 2]], SamplingParams(6, 1.0, seed=0, logprobs=3, stop_token_ids=()))[0]
    sequence = [4, 2] + c.token_ids
    with torch.no_grad():
        reference = model(torch.tensor([sequence]))[0][0].log_softmax(-1)
    for i, token in enumerate(c.token_ids):
        want = reference[1 + i]
        assert abs(c.logprobs[i] - want[token].item()) < 1e-5
        top_ids = [t for t, _ in c.top_logprobs[i]]
        assert top_ids == want.topk(3).indices.tolist()
        assert [lp for _, lp in c.top_logprobs[i]] == sorted((lp for _, lp in c.top_logprobs[i]), reverse=True)


def test_beam_search_finds_the_most_likely_sequence():
    model = model_for(vocab_size=6)
    prompt, n = [1, 2], 3
    with torch.no_grad():
        best = max(
            itertools.product(range(6), repeat=n),
            key=lambda seq: (
                model(torch.tensor([prompt + list(seq)]))[0][0, len(prompt) - 1 : -1]
                .log_softmax(-1)
                .gather(-1, torch.tensor(seq)[:, None])
                .sum()
                .item()
            ),
        )
    exact = beam_search(model, None, prompt, SamplingParams(n, num_beams=36, stop_token_ids=()))
    assert tuple(exact.token_ids) == best
    greedy = generate(model, None, [prompt], SamplingParams(n, 0.0, stop_token_ids=()))[0]
    one_beam = beam_search(model, None, prompt, SamplingParams(n, num_beams=1, stop_token_ids=()))
    assert one_beam.token_ids == greedy.token_ids
    # a stop token ends a beam; the result never runs past the context
    stopped = beam_search(model, None, prompt, SamplingParams(50, num_beams=4, stop_token_ids=(best[0],)))
    assert best[0] not in stopped.token_ids and len(prompt) + stopped.completion_tokens <= 24


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 2.5}, "max_new_tokens"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"frequency_penalty": 3.0}, "frequency_penalty"),
        ({"seed": -1}, "seed"),
        ({"stop": ("",)}, "stop"),
        ({"logprobs": 21}, "logprobs"),
        ({"num_beams": 0}, "num_beams"),
        ({"truncate": "right"}, "truncate"),
        ({"overflow": "wrap"}, "overflow"),
    ],
)
def test_bad_sampling_parameters(kwargs, message):
    with pytest.raises(LMForgeError, match=message):
        SamplingParams(**{"max_new_tokens": 5, **kwargs})


def test_text_stream_holds_back_partial_characters_and_stop_strings():
    from lmforge.data.tokenizer import bpe_tokenizer

    tok = bpe_tokenizer(iter(["plain ascii text " * 50]), 270)
    ids = tok.encode("a🙂b東")
    stream_ = TextStream(tok)
    pieces = [stream_.push(i) for i in ids] + [stream_.flush()]
    assert "".join(pieces) == "a🙂b東"
    assert all("\ufffd" not in p for p in pieces)
    ids = tok.encode("plain text STOP more")
    stream_ = TextStream(tok, stop=("STOP", "xyz"))
    pieces = [stream_.push(i) for i in ids]
    assert "".join(pieces) == "plain text " and stream_.stopped
    assert all("S" not in p for p in pieces)  # the start of a stop string is held back until it is decided
    stream_ = TextStream(tok, stop=("STOP",))
    pieces = [stream_.push(i) for i in tok.encode("a ST")] + [stream_.flush()]
    assert pieces[-1] == "ST" and "".join(pieces) == "a ST"  # a held-back tail comes out at the end


def test_stop_strings_streaming_and_batching_on_a_trained_model(tiny_run):
    lm = LM.load(tiny_run)
    # 25 tokens whatever the model says (no end-of-text stop); the stop string is cut from them
    full = lm.complete("First", max_new_tokens=25, temperature=0.0, stop_token_ids=())[0]
    stop = full.text[6:9]
    assert len(stop) == 3
    cut = lm.complete("First", max_new_tokens=25, temperature=0.0, stop=[stop, "never"], stop_token_ids=())[0]
    assert cut.text == full.text[: full.text.index(stop)] and cut.finish_reason == "stop"
    pieces = list(lm.stream("First", max_new_tokens=25, temperature=0.0, stop=[stop], stop_at_eot=False))
    assert "".join(pieces) == cut.text and all(stop not in p for p in pieces)
    # batched prompts of different lengths, sampled: equal to one at a time
    prompts = ["First", "All:\nSpeak", "Before we proceed"]
    batch = lm.complete(prompts, max_new_tokens=12, temperature=0.9, seed=4)
    alone = [lm.complete(p, max_new_tokens=12, temperature=0.9, seed=4)[0] for p in prompts]
    assert [c.text for c in batch] == [c.text for c in alone]


def test_lm_stream_equals_generate(tiny_run):
    lm = LM.load(tiny_run)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 20 new tokens fit the 32-token context: no warning
        streamed = "".join(lm.stream("First", max_new_tokens=20, temperature=0.9, seed=3, stop_at_eot=False))
        assert streamed == lm.generate("First", max_new_tokens=20, temperature=0.9, seed=3, stop_token_ids=())[0]
    assert len(streamed) > 10
    samples = lm.generate("First", max_new_tokens=10, seed=1, num_samples=3)
    assert len(samples) == 3 and samples[1] == lm.generate("First", max_new_tokens=10, seed=2)[0]


def test_generation_never_runs_past_the_context_silently(tiny_run):
    lm = LM.load(tiny_run)
    with pytest.warns(UserWarning, match="context of 32 tokens"):
        text = lm.generate("First", max_new_tokens=100, temperature=0.0, stop_token_ids=())[0]
    c = lm.complete("First", max_new_tokens=100, temperature=0.0, stop_token_ids=())[0]
    assert c.text == text and c.prompt_tokens + c.completion_tokens == 32 and c.finish_reason == "length"
    with pytest.warns(UserWarning, match="context"):
        assert "".join(lm.stream("First", max_new_tokens=100, temperature=0.0, stop_at_eot=False)) == text
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the sliding window is asked for: no warning, all 100 tokens
        slid = lm.complete("First", max_new_tokens=100, temperature=0.0, overflow="slide", stop_token_ids=())[0]
    assert slid.completion_tokens == 100 and slid.text.startswith(text)


def test_stream_yields_chunks_with_logprobs(tiny_run):
    lm = LM.load(tiny_run)
    chunks = list(lm.stream_chunks("First", max_new_tokens=10, temperature=0.0, logprobs=2))
    assert chunks[-1].finish_reason in ("stop", "length")
    assert all(len(c.logprobs) == len(c.token_ids) for c in chunks)
    whole = lm.complete("First", max_new_tokens=10, temperature=0.0, logprobs=2)[0]
    assert [lp for c in chunks for lp in c.logprobs] == pytest.approx(whole.logprobs, abs=1e-5)
    assert "".join(c.text for c in chunks) == whole.text
    beams = lm.complete("First", max_new_tokens=10, num_beams=3)[0]
    assert beams.completion_tokens <= 10 and beams.finish_reason in ("stop", "length")
