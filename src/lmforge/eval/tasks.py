"""`lmforge eval --data` and `--task`: a run's language-model scores on text, and its scores on a task.

`evaluate_text` scores a run on a data dir's split (its tokens must be the run's tokenizer's) or on a text file
(read whole, one document after an end-of-text token, or after the beginning-of-sequence token of a model that has
one, as transformers scores `tokenizer(text)`; every token of it predicted once): loss, perplexity, bits per byte,
loss by position (eval/lm.py).

`evaluate_task` reads records like the ones fine-tuning reads (data/sft.py, data/classify.py, with the run's own
format, field mapping and template) and
- for a generating run: greedily (or with beam search) continues each record's prompt until its end marker, and
  scores the texts against the references: BLEU, chrF, ROUGE, exact match, token F1 (eval/metrics.py);
- for a classification run: takes the head's class probabilities and scores accuracy, precision/recall/F1,
  ROC-AUC and the confusion matrix;
- for multiple-choice records, `{"prompt": ..., "choices": [...], "answer": i}` (any causal run): scores each choice
  as the continuation of the prompt (nothing is put between them: a choice that needs a leading space has one) by
  its log-likelihood, and reports accuracy (the highest total log-likelihood is the answer) and accuracy_norm
  (log-likelihood per character of the choice), as lm-evaluation-harness computes acc and acc_norm.
Decoding uses `lmforge.generate.generate` with SamplingParams (temperature 0, or num_beams beams); choices are
scored by `lmforge.generate.continuation_logprobs`, the prefill that also serves the server's echo and the
lm-evaluation-harness adapter (eval/harness.py), after `encode_pair` splits the text as the harness does.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmforge.chat import IM_END
from lmforge.config import RunConfig
from lmforge.data import classify, sft
from lmforge.data.loader import DataDir
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import LMForgeError
from lmforge.eval.lm import score, text_batches, token_bytes
from lmforge.eval.metrics import classification_metrics, text_metrics
from lmforge.model.gpt import GPT
from lmforge.train import checkpoint
from lmforge.train.objectives import read_labels, task_module


def load_run(run_dir: Path, device: str = "cpu", step: int | None = None):
    """(LM, config) of a run dir: the plain model that generation reads."""
    from lmforge.api import LM

    lm = LM.load(run_dir, device=device, step=step)
    return lm, RunConfig.load(Path(run_dir) / "config.json")


def evaluate_text(
    run_dir: str | Path,
    data: str | Path,
    split: str = "val",
    batch_size: int = 8,
    max_batches: int | None = None,
    device: str = "cpu",
    step: int | None = None,
) -> dict:
    """Loss, perplexity, bits per byte and loss by position of the run on a data dir's split or a text file."""
    run_dir, data = Path(run_dir), Path(data)
    lm, config = load_run(run_dir, device, step)
    if not config.model.causal:
        raise LMForgeError(f"{run_dir} is an encoder; lmforge eval --data scores next-token prediction (causal models)")
    seq_len = lm.model.config.seq_len
    table = token_bytes(lm.tokenizer, lm.model.config.vocab_size)
    if data.is_dir():
        if not (data / "meta.json").is_file():
            raise LMForgeError(f"{data} is not a data dir (no meta.json); give a data dir or a text file")
        data_dir = DataDir(data)
        if data_dir.tokenizer_path.read_bytes() != (run_dir / "tokenizer.json").read_bytes():
            raise LMForgeError(
                f"{data} was prepared with another tokenizer than {run_dir}'s; prepare it with "
                f"--tokenizer {run_dir / 'tokenizer.json'} or evaluate a text file"
            )
        if split not in data_dir.splits:
            raise LMForgeError(f"{data} has no split {split!r}; it has {', '.join(data_dir.splits)}")
        batches = data_dir.eval_batches(seq_len, batch_size, max_batches, split=split)
        source = f"{data} ({split} split)"
    elif data.is_file():
        try:
            text = data.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise LMForgeError(f"cannot read {data} as UTF-8 text: {exc}") from exc
        batches = text_batches([lm.tokenizer.document_start] + lm.tokenizer.encode(text), seq_len, batch_size)
        if max_batches:
            batches = (b for i, b in zip(range(max_batches), batches))
        source = str(data)
    else:
        raise LMForgeError(f"{data} does not exist; give a data dir or a text file")
    result = score(lm.model, batches, table, next(lm.model.parameters()).device)
    if not result:
        raise LMForgeError(f"{source} has no tokens to predict")
    return {"run_dir": str(run_dir), "data": source, "context": seq_len, **result}


def evaluate_task(
    run_dir: str | Path,
    path: str | Path,
    max_new_tokens: int = 128,
    batch_size: int = 32,
    num_beams: int = 1,
    limit: int = 0,
    device: str = "cpu",
    step: int | None = None,
) -> dict:
    """The run's task scores on the records in path (JSONL); see the module docstring."""
    run_dir = Path(run_dir)
    config = RunConfig.load(run_dir / "config.json") if (run_dir / "config.json").is_file() else None
    if config is None:
        raise LMForgeError(f"{run_dir} is not a run dir (no config.json)")
    if config.train.objective == "classify":
        return _classification(run_dir, config, Path(path), batch_size, limit, device, step)
    records = sft.read_records(path)[: limit or None]
    if "choices" in records[0].data:
        return _multiple_choice(run_dir, Path(path), records, batch_size, device, step)
    return _generation(run_dir, Path(path), records, max_new_tokens, batch_size, num_beams, device, step)


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and of continuation after it, split as lm-evaluation-harness splits them: spaces that
    end the context move to the continuation, the two are encoded together (as a sequence's start, so after the
    beginning-of-sequence token of a model that has one) and the context's own tokens are cut off the front. An
    empty context is the token documents start after."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        after = tokenizer.encode(continuation)
        start = tokenizer.document_start
        return ([start], after) if after[:1] != [start] else (after[:1], after[1:])
    before = tokenizer.encode_prompt(context)
    return before, tokenizer.encode_prompt(context + continuation)[len(before) :]


def choice_records(records: list[sft.Record]) -> list[tuple[str, list[str], int]]:
    """(prompt, choices, answer) of each multiple-choice record, or an error naming the first bad one."""
    items = []
    for record in records:
        data = record.data
        prompt, choices, answer = data.get("prompt"), data.get("choices"), data.get("answer")
        if not isinstance(prompt, str) or not isinstance(choices, list) or len(choices) < 2:
            raise LMForgeError(f"{record.where}: a multiple-choice record has a prompt text and two or more choices")
        if not all(isinstance(c, str) and c for c in choices):
            raise LMForgeError(f"{record.where}: every choice must be a non-empty text")
        if not (isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices)):
            raise LMForgeError(f"{record.where}: answer must be the index of the right choice, 0 to {len(choices) - 1}")
        items.append((prompt, choices, answer))
    return items


def _multiple_choice(run_dir, path, records, batch_size, device, step) -> dict:
    from lmforge.generate import continuation_logprobs

    lm, config = load_run(run_dir, device, step)
    if not config.model.causal:
        raise LMForgeError(f"{run_dir} is an encoder; multiple-choice scoring needs a causal model")
    items = choice_records(records)
    pairs = [encode_pair(lm.tokenizer, prompt, choice) for prompt, choices, _ in items for choice in choices]
    scores = iter(continuation_logprobs(lm.model, lm.tokenizer, pairs, max_batch=batch_size))
    examples, right, right_norm = [], 0, 0
    for prompt, choices, answer in items:
        lls = [next(scores)[0] for _ in choices]
        best = max(range(len(choices)), key=lambda i: lls[i])  # the first of equal ones, as numpy's argmax
        best_norm = max(range(len(choices)), key=lambda i: lls[i] / len(choices[i]))
        right, right_norm = right + (best == answer), right_norm + (best_norm == answer)
        examples.append({"prompt": prompt, "choices": choices, "answer": answer, "loglikelihoods": lls,
                         "predicted": best, "predicted_norm": best_norm})  # fmt: skip
    n = len(items)
    return {
        "run_dir": str(run_dir),
        "task": str(path),
        "kind": "multiple_choice",
        "metrics": {"examples": n, "accuracy": right / n, "accuracy_norm": right_norm / n},
        "examples": examples,
    }


def _generation(run_dir, path, records, max_new_tokens, batch_size, num_beams, device, step) -> dict:
    from lmforge.generate import SamplingParams, generate

    lm, config = load_run(run_dir, device, step)
    if not config.model.causal:
        raise LMForgeError(f"{run_dir} is an encoder, which does not generate; fine-tune it with --task classify")
    recipe = sft.Recipe.from_config(config.finetune, records[0])
    tokenizer = lm.tokenizer
    prompts = [recipe.prompt_ids(r, tokenizer) for r in records]
    references = [recipe.references(r) for r in records]
    stops = [tokenizer.eot_id]
    if recipe.chat and tokenizer.hf.token_to_id(IM_END) is not None:
        stops.append(tokenizer.hf.token_to_id(IM_END))
    params = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=0.0,
        stop_token_ids=tuple(stops),
        truncate="left",
        num_beams=num_beams,
    )
    completions = generate(lm.model, tokenizer, prompts, params, max_batch=batch_size)
    predictions = [c.text.strip() for c in completions]
    scores = text_metrics(predictions, references)
    examples = [
        {"prompt": tokenizer.decode(p, skip_special_tokens=False), "prediction": pred, "references": refs}
        for p, pred, refs in zip(prompts, predictions, references)
    ]
    return {
        "run_dir": str(run_dir),
        "task": str(path),
        "kind": "generation",
        "format": recipe.format,
        "decoding": f"beam search, {num_beams} beams" if num_beams > 1 else "greedy",
        "metrics": scores,
        "examples": examples,
    }


@torch.no_grad()
def _classification(run_dir, config: RunConfig, path, batch_size, limit, device, step) -> dict:
    labels = read_labels(run_dir)
    tokenizer = Tokenizer.load(run_dir / "tokenizer.json")
    module = task_module(config, GPT(config.model), len(labels))
    if step is not None:
        where = run_dir / checkpoint.CHECKPOINTS / checkpoint.step_name(step)
        if not (where / "state.json").is_file():
            raise LMForgeError(f"{run_dir} has no complete checkpoint for step {step}")
        checkpoint.load(where, module, training=True)
    elif checkpoint.load_latest(run_dir, module, training=True) is None:
        raise LMForgeError(f"{run_dir} has no usable checkpoint; fine-tune it first")
    module.to(device).eval()
    data = classify.load_classify(
        config.finetune, tokenizer, config.model.seq_len, config.train.seed, labels=labels, path=str(path)
    )
    items = data.val[: limit or None]
    if not items:
        raise LMForgeError(f"{path} has no record that fits the model's context")
    probabilities = []
    for begin in range(0, len(items), batch_size):
        x, lengths, _ = classify.collate(items[begin : begin + batch_size], tokenizer.eot_id)
        probabilities.append(torch.softmax(module(x.to(device), lengths.to(device)).float(), dim=-1).cpu())
    probs = torch.cat(probabilities).numpy()
    y_true = [item.label for item in items]
    scores = classification_metrics(y_true, probs, labels)
    examples = [
        {"label": labels[y], "predicted": labels[int(p.argmax())], "probabilities": [round(float(v), 6) for v in p]}
        for y, p in zip(y_true, probs)
    ]
    return {
        "run_dir": str(run_dir),
        "task": str(path),
        "kind": "classification",
        "metrics": scores,
        "notes": data.notes,
        "examples": examples,
    }
