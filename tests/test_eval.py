"""lmforge eval: loss, perplexity, bits per byte and loss by position; task reports; scoring given tokens (the engine's
echo prefill) and multiple-choice records; errors."""

import json
import math
import random
from pathlib import Path

import pytest
import torch

from conftest import quiet
from lmforge.api import LM
from lmforge.cli import main
from lmforge.config import RunConfig
from lmforge.data.loader import DataDir
from lmforge.data.prepare import prepare
from lmforge.data.tokenizer import Tokenizer, bpe_tokenizer, char_tokenizer_from_chars
from lmforge.errors import LMForgeError
from lmforge.eval.lm import text_batches, token_bytes
from lmforge.eval.report import evaluate
from lmforge.eval.tasks import encode_pair, evaluate_text
from lmforge.generate import SamplingParams, continuation_logprobs, generate, score
from lmforge.model.gpt import GPT, ModelConfig
from lmforge.train import checkpoint
from lmforge.train.trainer import finetune, train


def zero_run(root: Path, tokenizer: Tokenizer, zero: bool = True, **fields) -> Path:
    """A run whose every weight is zero: its logits are all equal, so each token costs exactly ln(vocab) nats.

    zero=False keeps the random initialisation (a base to fine-tune)."""
    config = RunConfig(model=ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=16, n_layer=1, n_head=2, n_embd=8,
                                         **fields), preset="test")  # fmt: skip
    torch.manual_seed(0)
    model = GPT(config.model)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(0.0 if zero else 1.0)
    root.mkdir(parents=True)
    config.save(root / "config.json")
    tokenizer.save(root / "tokenizer.json")
    checkpoint.save(root, 0, model, None, {}, keep_last=1)
    return root


def test_bits_per_byte_of_a_uniform_model_by_hand(tmp_path):
    text = "héllo wörld, 東京 🙂 and some plain ascii text to fill more than one window.\n" * 3
    tokenizer = char_tokenizer_from_chars(text)
    run = zero_run(tmp_path / "run", tokenizer)
    path = tmp_path / "text.txt"
    path.write_text(text, encoding="utf-8")
    result = evaluate_text(run, path, batch_size=4)
    vocab = tokenizer.vocab_size
    # every character is one token, predicted once (the first after an end-of-text token), at ln(vocab) nats each
    assert result["tokens"] == len(text) and result["bytes"] == len(text.encode("utf-8"))
    assert result["loss"] == pytest.approx(math.log(vocab), rel=1e-6)
    assert result["perplexity"] == pytest.approx(vocab, rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(len(text) * math.log2(vocab) / len(text.encode("utf-8")), rel=1e-6)
    assert len(result["loss_by_position"]) == 16
    assert all(v == pytest.approx(math.log(vocab), rel=1e-6) for v in result["loss_by_position"])


def test_text_windows_predict_every_token_once():
    ids = list(range(100, 100 + 1 + 3 * 16 + 5))
    batches = list(text_batches(ids, 16, 2))
    assert [tuple(x.shape) for x, _ in batches] == [(2, 16), (1, 16), (1, 5)]
    targets = [t for _, y in batches for row in y.tolist() for t in row]
    assert targets == ids[1:]
    for x, y in batches:  # each target is the token after its input
        assert torch.equal(x[:, 1:], y[:, :-1])


def test_token_bytes_spell_the_text():
    text = "café naïve 東京 🙂 tab\there, and more words: the quick brown fox.\n"
    bpe = bpe_tokenizer(iter([text] * 30), vocab_size=300)
    table = token_bytes(bpe, bpe.vocab_size)
    assert table[bpe.encode(text)].sum() == len(text.encode("utf-8"))
    assert table[bpe.eot_id] == 0
    char = char_tokenizer_from_chars(text)
    assert token_bytes(char, char.vocab_size)[char.encode(text)].sum() == len(text.encode("utf-8"))


@pytest.fixture(scope="module")
def periodic(tmp_path_factory) -> tuple[Path, Path]:
    """(data dir, run) of text that repeats 3 random letters 20 times: the next letter needs 3 letters of context."""
    root = tmp_path_factory.mktemp("periodic")
    rng = random.Random(0)
    (root / "p.txt").write_text("".join("".join(rng.sample("abcdefghij", 3)) * 20 for _ in range(300)))
    prepare([str(root / "p.txt")], root / "data", progress=False)
    overrides = {"train.max_steps": 150, "train.threads": 1, "optim.lr": 1e-2, "train.eval_every": 1000}
    train(str(root / "data"), root / "run", preset="tiny", overrides=overrides, progress_bar=False, echo=quiet)
    return root / "data", root / "run"


def test_data_dir_scores_and_report(tmp_path, periodic, capsys):
    char_data, tiny_run = periodic
    out = tmp_path / "report"
    assert main(["eval", str(tiny_run), "--data", str(char_data), "--out", str(out), "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert "bits per byte" in printed and "lm_eval.md" in printed
    result = json.loads((out / "lm_eval.json").read_text())
    # the bytes are those of the predicted tokens' text: decode the same windows here
    data, tokenizer = DataDir(char_data), Tokenizer.load(tiny_run / "tokenizer.json")
    spelled = sum(len(tokenizer.decode(row).encode("utf-8")) for _, y in data.eval_batches(32, 4) for row in y.tolist())
    assert result["bytes"] == spelled and result["tokens"] == sum(y.numel() for _, y in data.eval_batches(32, 4))
    assert result["bits_per_byte"] == pytest.approx(result["loss"] * result["tokens"] / (math.log(2) * spelled))
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    # loss by position: the mean loss of the tokens at each window position, here computed one window at a time
    model = LM.load(tiny_run).model
    windows = [(x[i : i + 1], y[i]) for x, y in data.eval_batches(32, 4) for i in range(len(x))]
    with torch.no_grad():
        each = torch.stack([torch.nn.functional.cross_entropy(model(x)[0][0], y, reduction="none") for x, y in windows])
    assert result["loss_by_position"] == pytest.approx(each.double().mean(dim=0).tolist(), abs=1e-5)
    assert (out / "loss_by_position.png").stat().st_size > 1000
    report = (out / "lm_eval.md").read_text()
    assert "bits per byte" in report and "![loss by position](loss_by_position.png)" in report
    # a text file scores the same way
    text_file = tmp_path / "t.txt"
    text_file.write_text("abcabcabcijeijeijee", encoding="utf-8")
    from_text = evaluate_text(tiny_run, text_file)
    assert from_text["tokens"] == from_text["bytes"] == 19


def test_eval_errors(tmp_path, tiny_run, char_data, capsys):
    other = zero_run(tmp_path / "other", char_tokenizer_from_chars("xyz"))
    cases = [
        ([str(other), "--data", str(char_data)], "prepared with another tokenizer"),
        ([str(tiny_run), "--data", str(tmp_path / "none")], "does not exist"),
        ([str(tiny_run), "--data", str(char_data), "--split", "test"], "no split 'test'"),
        ([str(tiny_run)], "give --data"),
        ([str(tmp_path)], "give --data"),
    ]
    for args, message in cases:
        assert main(["eval", *args]) == 2
        assert message in capsys.readouterr().err
    encoder = zero_run(tmp_path / "enc", char_tokenizer_from_chars("xyz"), causal=False)
    (tmp_path / "x.txt").write_text("xyz")
    with pytest.raises(LMForgeError, match="encoder"):
        evaluate_text(encoder, tmp_path / "x.txt")
    char = char_tokenizer_from_chars("xyz")
    with pytest.raises(LMForgeError, match="character vocabulary lacks"):
        evaluate_text(zero_run(tmp_path / "z", char), char_data / "meta.json")


def test_classification_task_report(tmp_path):
    tokenizer = char_tokenizer_from_chars("abc")
    base = tmp_path / "base"
    zero_run(base, tokenizer, zero=False)
    rng = random.Random(0)
    records = [{"text": "".join(rng.choice("abc") for _ in range(6))} for _ in range(300)]
    for r in records:
        r["label"] = max("abc", key=r["text"].count)  # three classes: the most frequent letter
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    overrides = {"train.max_steps": 30, "optim.lr": 1e-2, "train.threads": 1, "train.batch_size": 16}
    finetune(base, data, tmp_path / "clf", task="classify", overrides=overrides, progress_bar=False, echo=quiet)
    result = evaluate(tmp_path / "clf", task=data, out=tmp_path / "out", limit=120)
    m = result["task"]["metrics"]
    assert m["labels"] == ["a", "b", "c"] and m["examples"] == 120
    assert sum(map(sum, m["confusion_matrix"])) == 120
    assert m["accuracy"] == pytest.approx(sum(m["confusion_matrix"][i][i] for i in range(3)) / 120)
    assert 0 <= m["roc_auc"] <= 1 and set(m["roc_curves"]) == {"a", "b", "c"}
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["predictions.jsonl", "roc.png", "task_eval.json", "task_eval.md"]
    report = (tmp_path / "out" / "task_eval.md").read_text()
    assert "Confusion matrix" in report and "ROC-AUC" in report
    predictions = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 120 and all(sum(p["probabilities"]) == pytest.approx(1, abs=1e-5) for p in predictions)


# ----------------------------------------------------------------------------------------- scoring given tokens


def forward_logprobs(model, ids: list[int]) -> list[float | None]:
    """Each token's log-probability after those before it, from one plain forward pass (not the engine's)."""
    if len(ids) < 2:
        return [None]
    with torch.no_grad():
        logp = model(torch.tensor([ids[:-1]]))[0][0].float().log_softmax(dim=-1)
    return [None] + [logp[i, t].item() for i, t in enumerate(ids[1:])]


@pytest.fixture(scope="module")
def small_model() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=40, seq_len=16, n_layer=2, n_head=2, n_embd=16)).eval()


def test_echo_scores_every_prompt_token_as_a_forward_pass_does(small_model):
    rng = random.Random(0)
    texts = [[rng.randrange(40) for _ in range(n)] for n in (1, 2, 5, 16, 17)]  # 17: the context and one predicted
    scoring = SamplingParams(max_new_tokens=0, echo=True, logprobs=3)
    for use_cache in (True, False):  # the cached, batched prefill and the reference decoder
        for ids, c in zip(texts, generate(small_model, None, texts, scoring, use_cache=use_cache)):
            assert (c.prompt_ids, c.token_ids, c.finish_reason, c.completion_tokens) == (ids, [], "length", 0)
            assert c.prompt_logprobs[0] is None and c.prompt_top_logprobs[0] == []
            assert c.prompt_logprobs[1:] == pytest.approx(forward_logprobs(small_model, ids)[1:], abs=1e-5)
            for logprob, top in zip(c.prompt_logprobs[1:], c.prompt_top_logprobs[1:]):
                values = [v for _, v in top]
                assert len(top) == 3 and values == sorted(values, reverse=True) and values[0] >= logprob - 1e-6
    alone = score(small_model, None, [texts[3]], top=1)[0]
    assert alone.prompt_logprobs[1:] == pytest.approx(score(small_model, None, texts)[3].prompt_logprobs[1:], abs=1e-5)
    with pytest.raises(LMForgeError, match="scores at most 17"):
        score(small_model, None, [[1] * 18])
    with pytest.raises(LMForgeError, match="0 with echo"):
        SamplingParams(max_new_tokens=0)


def test_echo_with_generation_keeps_the_output_and_its_stop_token(small_model):
    prompt = [3, 1, 4, 1, 5]
    greedy = {"max_new_tokens": 4, "temperature": 0.0, "logprobs": 0}
    plain = generate(small_model, None, [prompt], SamplingParams(**greedy, stop_token_ids=()))[0]
    echoed = generate(small_model, None, [prompt], SamplingParams(**greedy, stop_token_ids=(), echo=True))[0]
    assert echoed.token_ids == plain.token_ids and echoed.logprobs == pytest.approx(plain.logprobs, abs=1e-6)
    assert echoed.prompt_logprobs[1:] == pytest.approx(forward_logprobs(small_model, prompt)[1:], abs=1e-5)
    # the first greedy token made a stop token: echo shows it (every token the model produced), plain output does not
    stop = (plain.token_ids[0],)
    kept = generate(small_model, None, [prompt], SamplingParams(**greedy, stop_token_ids=stop, echo=True))[0]
    dropped = generate(small_model, None, [prompt], SamplingParams(**greedy, stop_token_ids=stop))[0]
    assert (kept.token_ids, kept.finish_reason) == ([*stop], "stop")
    assert (dropped.token_ids, dropped.finish_reason) == ([], "stop")
    assert kept.logprobs == pytest.approx(plain.logprobs[:1], abs=1e-6)


def test_continuation_logprobs_sum_the_continuation_and_say_if_it_is_greedy(small_model):
    context = [5, 6, 7, 8]
    greedy = SamplingParams(max_new_tokens=3, temperature=0.0, stop_token_ids=())
    best = generate(small_model, None, [context], greedy)[0].token_ids
    other = [*best[:2], (best[2] + 1) % 40]
    long_context = [i % 40 for i in range(30)]  # with its continuation, cut to 17 tokens from the left
    pairs = [(context, best), (context, other), (long_context, [1, 2])]
    results = continuation_logprobs(small_model, None, pairs)
    for (before, after), (total, _) in zip(pairs, results):
        whole = (before + after)[-17:]
        assert total == pytest.approx(sum(forward_logprobs(small_model, whole)[-len(after) :]), abs=1e-4)
    assert [is_greedy for _, is_greedy in results[:2]] == [True, False]
    with pytest.raises(LMForgeError, match="context of at least one token"):
        continuation_logprobs(small_model, None, [([], [1])])


def test_encode_pair_splits_text_as_the_harness_does():
    text = "hello world, hello there; the quick brown fox jumps over the lazy dog.\n"
    bpe = bpe_tokenizer(iter([text] * 30), vocab_size=300)
    before, after = encode_pair(bpe, "hello ", "world")  # the context's trailing space goes to the continuation
    assert before == bpe.encode("hello") and before + after == bpe.encode("hello world")
    empty_before, empty_after = encode_pair(bpe, "", "hello")  # an empty context is the document-start token
    assert (empty_before, empty_after) == ([bpe.eot_id], bpe.encode("hello"))


def test_multiple_choice_records_are_scored_by_log_likelihood(tmp_path, periodic, capsys):
    _, run = periodic
    text = (run.parent / "p.txt").read_text()
    records = []
    for start in range(0, 300 * 60, 60 * 25):  # the next letters of one repeating triple, and two wrong ones
        prompt, right = text[start : start + 7], text[start + 7 : start + 9]
        wrong = [c + c for c in "abcdefghij" if c + c != right][:2]
        records.append({"prompt": prompt, "choices": [wrong[0], right, wrong[1]], "answer": 1})
    records.append({"prompt": "", "choices": ["abc", "jihgf"], "answer": 0})  # after the document-start token
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["eval", str(run), "--task", str(path), "--out", str(tmp_path / "out"), "--batch-size", "4"]) == 0
    assert f"{len(records)} records: accuracy" in capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "task_eval.json").read_text())
    scored = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    lm = LM.load(run)
    for record, example in zip(records, scored):
        by_hand = []
        for choice in record["choices"]:  # the choice's tokens after the prompt's, from a plain forward pass
            start = lm.tokenizer.encode_prompt(record["prompt"]) or [lm.tokenizer.document_start]
            ids = start + lm.tokenizer.encode(choice)
            by_hand.append(sum(forward_logprobs(lm.model, ids)[len(start) :]))
        assert example["loglikelihoods"] == pytest.approx(by_hand, abs=1e-4)
        lls, lengths = example["loglikelihoods"], [len(c) for c in record["choices"]]
        assert example["predicted"] == max(range(len(lls)), key=lambda i: lls[i])
        assert example["predicted_norm"] == max(range(len(lls)), key=lambda i: lls[i] / lengths[i])
    m = summary["metrics"]
    assert summary["kind"] == "multiple_choice" and m["examples"] == len(records)
    assert m["accuracy"] == pytest.approx(sum(e["predicted"] == e["answer"] for e in scored) / len(records))
    assert m["accuracy_norm"] == pytest.approx(sum(e["predicted_norm"] == e["answer"] for e in scored) / len(records))
    assert "multiple-choice records" in (tmp_path / "out" / "task_eval.md").read_text()
    for bad, message in [({"answer": 3}, "answer must be the index"), ({"choices": ["a"]}, "two or more choices")]:
        path.write_text(json.dumps({**records[0], **bad}) + "\n")
        assert main(["eval", str(run), "--task", str(path)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
