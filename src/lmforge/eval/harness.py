"""`lmforge eval --harness`: lm-evaluation-harness (`lm_eval`) tasks on a run dir, through an `LM` adapter.

The harness asks a model three things, and `HarnessLM` answers each with lmforge's own code, in the run's own
tokenizer and in any dtype, with no export:
- loglikelihood: (context, continuation) texts, split into tokens as the harness splits them (eval/tasks.py's
  `encode_pair`), scored by `lmforge.generate.continuation_logprobs`: the engine's prefill, the same numbers the
  server's `echo` and `lmforge eval --task` on multiple-choice records give;
- loglikelihood_rolling: a whole text in the harness's disjoint windows of the model's context, every token
  predicted once;
- generate_until: greedy (or sampled) decoding until one of the task's stop strings or end of text.

Tasks are names the installed harness knows, or YAML task files (with local data: the hub may not be reachable).
This module imports `lm_eval`, an optional extra (`pip install 'lmforge[eval]'`); report.py imports it only when
--harness is asked for.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from lm_eval import simple_evaluate, utils
from lm_eval.api.model import LM as HarnessBase
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml

from lmforge.errors import LMForgeError
from lmforge.eval.tasks import encode_pair, load_run
from lmforge.generate import SamplingParams, continuation_logprobs, generate

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class HarnessLM(HarnessBase):
    """A run dir as lm-evaluation-harness sees a model (see the module docstring)."""

    def __init__(self, run_dir: str | Path, device: str = "cpu", dtype: str = "fp32", batch_size: int = 32, step=None):
        super().__init__()
        if dtype not in DTYPES:
            raise LMForgeError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
        self.lm, config = load_run(Path(run_dir), device, step)
        if not config.model.causal:
            raise LMForgeError(f"{run_dir} is an encoder; lm-evaluation-harness tasks need a causal model")
        self.lm.model.to(DTYPES[dtype])
        self.batch_size = batch_size
        self._device = torch.device(device)

    @property
    def tokenizer_name(self) -> str:
        return str(self.lm.run_dir)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self.lm.tokenizer, context, continuation) for context, continuation in _args(requests)]
        return continuation_logprobs(self.lm.model, self.lm.tokenizer, pairs, max_batch=self.batch_size)

    def loglikelihood_rolling(self, requests) -> list[float]:
        tokenizer, context = self.lm.tokenizer, self.lm.context
        totals = []
        for (text,) in _args(requests):
            ids = tokenizer.encode(text)
            windows = utils.get_rolling_token_windows(ids, tokenizer.document_start, max_seq_len=context, context_len=1)
            pairs = [utils.make_disjoint_window(window) for window in windows]
            scores = continuation_logprobs(self.lm.model, tokenizer, pairs, max_batch=self.batch_size)
            totals.append(sum(score for score, _ in scores))
        return totals

    def generate_until(self, requests) -> list[str]:
        tokenizer = self.lm.tokenizer
        prompts, params = [], []
        for context, options in _args(requests):
            options = dict(options or {})
            until = options.pop("until", None) or []
            sampled = options.pop("do_sample", False)
            temperature = float(options.pop("temperature", 1.0 if sampled else 0.0))
            prompts.append(self.lm.encode_prompt(context))
            params.append(
                SamplingParams(
                    max_new_tokens=int(options.pop("max_gen_toks", 256)),
                    temperature=temperature if sampled else 0.0,
                    top_p=options.pop("top_p", None),
                    top_k=options.pop("top_k", None),
                    stop=(until,) if isinstance(until, str) else tuple(until),
                    truncate="left",  # the harness cuts long contexts from the left too
                )
            )
            if options:
                warnings.warn(f"generation options {', '.join(sorted(options))} are ignored", stacklevel=2)
        completions = generate(self.lm.model, tokenizer, prompts, params, max_batch=self.batch_size)
        return [c.text for c in completions]


def _args(requests) -> list[tuple]:
    return [request.args for request in requests]


def resolve_tasks(tasks: str) -> tuple[list, TaskManager]:
    """The harness's task list for comma-separated names and YAML task files, and its task manager."""
    manager = TaskManager()
    resolved, unknown = [], []
    for name in (part.strip() for part in tasks.split(",") if part.strip()):
        if name.endswith((".yaml", ".yml")):
            path = Path(name)
            if not path.is_file():
                raise LMForgeError(f"task file {path} does not exist")
            resolved.append(load_yaml(str(path.resolve()), resolve_func=True))
        elif manager.match_tasks([name]):
            resolved += manager.match_tasks([name])
        else:
            unknown.append(name)
    if unknown:
        raise LMForgeError(
            f"lm-evaluation-harness has no task {', '.join(unknown)}; give task names `lm_eval ls tasks` lists, "
            "or YAML task files"
        )
    if not resolved:
        raise LMForgeError("--harness names no task; give task names or YAML task files, comma-separated")
    return resolved, manager


def evaluate_harness(
    run_dir: str | Path,
    tasks: str,
    num_fewshot: int | None = None,
    limit: int = 0,
    batch_size: int = 32,
    dtype: str = "fp32",
    device: str = "cpu",
    step: int | None = None,
) -> dict:
    """lm-evaluation-harness's results for tasks on the run: {"results", "versions", "n-shot", "samples", ...}."""
    resolved, manager = resolve_tasks(tasks)
    model = HarnessLM(run_dir, device, dtype, batch_size, step)
    out = simple_evaluate(
        model=model,
        tasks=resolved,
        num_fewshot=num_fewshot,
        limit=limit or None,
        task_manager=manager,
        log_samples=True,
    )
    return {
        "run_dir": str(run_dir),
        "tasks": tasks,
        "dtype": dtype,
        "results": out["results"],
        "versions": out.get("versions", {}),
        "n-shot": out.get("n-shot", {}),
        "higher_is_better": out.get("higher_is_better", {}),
        "samples": out.get("samples", {}),
    }
