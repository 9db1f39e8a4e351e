"""`lmforge eval`: run the evaluations asked for and write them as JSON, a short markdown report and plots.

Into the output folder (default RUN_DIR/eval):
- `--data`: lm_eval.json, lm_eval.md and loss_by_position.png;
- `--task`: task_eval.json, task_eval.md, predictions.jsonl (each record's prompt, output and references, label
  and probabilities, or choices and their log-likelihoods) and, for classification, roc.png;
- `--harness`: harness.json (lm-evaluation-harness's results, versions and shots per task), harness.md and
  harness_samples.jsonl (each document's requests, responses and scores, as the harness logs them).
Each file is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lmforge.errors import LMForgeError
from lmforge.eval.tasks import evaluate_task, evaluate_text
from lmforge.files import write_text_atomic


def evaluate(
    run_dir: str | Path,
    data: str | Path | None = None,
    task: str | Path | None = None,
    harness: str | None = None,
    out: str | Path | None = None,
    split: str = "val",
    batch_size: int = 8,
    max_batches: int | None = None,
    max_new_tokens: int = 128,
    num_beams: int = 1,
    limit: int = 0,
    device: str = "cpu",
    step: int | None = None,
    num_fewshot: int | None = None,
    dtype: str = "fp32",
) -> dict:
    """Same as `lmforge eval`: {"lm": ..., "task": ..., "harness": ...} for what was asked, and "files" written."""
    if data is None and task is None and harness is None:
        raise LMForgeError(
            "give --data DATA_DIR|TEXT_FILE (language-model scores), --task FILE.jsonl, --harness TASKS, or several"
        )
    out = Path(out) if out is not None else Path(run_dir) / "eval"
    results: dict = {"files": []}
    if data is not None:
        results["lm"] = evaluate_text(run_dir, data, split, batch_size, max_batches, device, step)
    if task is not None:
        results["task"] = evaluate_task(run_dir, task, max_new_tokens, batch_size, num_beams, limit, device, step)
    if harness is not None:
        try:
            from lmforge.eval.harness import evaluate_harness
        except ImportError as exc:
            raise LMForgeError(
                f"--harness runs lm-evaluation-harness, which is not installed ({exc}); pip install 'lmforge[eval]'"
            ) from None
        results["harness"] = evaluate_harness(run_dir, harness, num_fewshot, limit, batch_size, dtype, device, step)
    out.mkdir(parents=True, exist_ok=True)
    if "lm" in results:
        results["files"] += write_lm_report(results["lm"], out)
    if "task" in results:
        results["files"] += write_task_report(results["task"], out)
    if "harness" in results:
        results["files"] += write_harness_report(results["harness"], out)
    return results


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, plt, path: Path) -> Path:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_lm_report(result: dict, out: Path) -> list[Path]:
    plt = _figure()
    losses = result["loss_by_position"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(range(1, len(losses) + 1), losses, linewidth=1.2)
    ax.set_xlabel("tokens of context seen")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("loss by position in the context")
    ax.grid(alpha=0.3)
    plot = _save(fig, plt, out / "loss_by_position.png")
    middle = len(losses) // 2
    bpb = f"{result['bits_per_byte']:.4f}" if result["bits_per_byte"] is not None else "n/a (no text bytes)"
    lines = [
        "# Language-model evaluation",
        "",
        f"Run `{result['run_dir']}` on `{result['data']}`: {result['tokens']:,} tokens predicted "
        f"({result['bytes']:,} bytes of text), context {result['context']}.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| loss (nats/token) | {result['loss']:.4f} |",
        f"| perplexity | {result['perplexity']:.3f} |",
        f"| bits per byte | {bpb} |",
        "",
        f"Loss by position: {losses[0]:.4f} with 1 token of context, {losses[middle]:.4f} with {middle + 1}, "
        f"{losses[-1]:.4f} with {len(losses)}: longer context is worth {losses[0] - losses[-1]:.4f} nats/token.",
        "",
        f"![loss by position]({plot.name})",
        "",
    ]
    report = write_text_atomic(out / "lm_eval.md", "\n".join(lines))
    data = write_text_atomic(out / "lm_eval.json", json.dumps(result, indent=2) + "\n")
    return [data, report, plot]


def write_task_report(result: dict, out: Path) -> list[Path]:
    summary = {k: v for k, v in result.items() if k != "examples"}
    files = [write_text_atomic(out / "task_eval.json", json.dumps(summary, indent=2) + "\n")]
    files.append(
        write_text_atomic(out / "predictions.jsonl", "".join(json.dumps(e) + "\n" for e in result["examples"]))
    )
    m = result["metrics"]
    lines = [f"# Task evaluation: {Path(result['task']).name}", "", f"Run `{result['run_dir']}`, "]
    if result["kind"] == "multiple_choice":
        lines[-1] += f"{m['examples']} multiple-choice records, each choice scored by its log-likelihood."
        lines += [
            "",
            "| accuracy | accuracy, per character of the choice |",
            "|---|---|",
            f"| {m['accuracy']:.4f} | {m['accuracy_norm']:.4f} |",
        ]
    elif result["kind"] == "generation":
        lines[-1] += f"{m['examples']} records ({result['format']} format), {result['decoding']} decoding."
        lines += [
            "",
            "| BLEU | chrF | ROUGE-1 | ROUGE-2 | ROUGE-L | exact match | token F1 |",
            "|---|---|---|---|---|---|---|",
            f"| {m['bleu']:.2f} | {m['chrf']:.2f} | {m['rouge1']:.2f} | {m['rouge2']:.2f} | {m['rougeL']:.2f} "
            f"| {m['exact_match']:.2f} | {m['token_f1']:.2f} |",
            "",
            "All on a 0-100 scale. First examples:",
            "",
        ]
        for example in result["examples"][:5]:
            lines.append(f"- prediction {example['prediction']!r}, reference {example['references'][0]!r}")
    else:
        auc = f"{m['roc_auc']:.4f}" if m["roc_auc"] is not None else "n/a (not every label occurs)"
        lines[-1] += f"{m['examples']} records, {len(m['labels'])} labels."
        lines += [
            "",
            f"Accuracy {m['accuracy']:.4f}; macro precision {m['macro_precision']:.4f}, recall {m['macro_recall']:.4f}"
            f", F1 {m['macro_f1']:.4f}; ROC-AUC {auc}.",
            "",
            "| label | precision | recall | F1 | support |",
            "|---|---|---|---|---|",
        ]
        for name, c in m["per_class"].items():
            lines.append(f"| {name} | {c['precision']:.4f} | {c['recall']:.4f} | {c['f1']:.4f} | {c['support']} |")
        lines += ["", "Confusion matrix (rows: true label, columns: predicted):", ""]
        lines += ["| | " + " | ".join(m["labels"]) + " |", "|---" * (len(m["labels"]) + 1) + "|"]
        for name, row in zip(m["labels"], m["confusion_matrix"]):
            lines.append(f"| **{name}** | " + " | ".join(str(v) for v in row) + " |")
        if m["roc_curves"]:
            plt = _figure()
            fig, ax = plt.subplots(figsize=(5, 5), dpi=110)
            for name, curve in m["roc_curves"].items():
                ax.plot(curve["fpr"], curve["tpr"], label=f"{name} vs rest" if len(m["labels"]) > 2 else name)
            ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8)
            ax.set_xlabel("false positive rate")
            ax.set_ylabel("true positive rate")
            ax.set_title(f"ROC, AUC {auc}")
            ax.legend()
            files.append(_save(fig, plt, out / "roc.png"))
            lines += ["", "![ROC curve](roc.png)"]
    for note in result.get("notes", []):
        lines += ["", f"Note: {note}"]
    files.append(write_text_atomic(out / "task_eval.md", "\n".join(lines) + "\n"))
    return files


def write_harness_report(result: dict, out: Path) -> list[Path]:
    summary = {k: v for k, v in result.items() if k != "samples"}
    files = [write_text_atomic(out / "harness.json", json.dumps(summary, indent=2, default=str) + "\n")]
    samples = "".join(
        json.dumps({"task": task, **sample}, default=str) + "\n"
        for task, task_samples in result["samples"].items()
        for sample in task_samples
    )
    files.append(write_text_atomic(out / "harness_samples.jsonl", samples))
    lines = [
        "# lm-evaluation-harness",
        "",
        f"Run `{result['run_dir']}` in {result['dtype']}, tasks `{result['tasks']}`.",
        "",
        "| task | shots | metric | value | stderr |",
        "|---|---|---|---|---|",
    ]
    for task, metrics in result["results"].items():
        for key, value in metrics.items():
            metric, _, flt = key.partition(",")
            if metric.endswith("_stderr") or not isinstance(value, int | float) or isinstance(value, bool):
                continue
            stderr = metrics.get(f"{metric}_stderr,{flt}")
            shown = f"{stderr:.4f}" if isinstance(stderr, int | float) else "n/a"
            lines.append(f"| {task} | {result['n-shot'].get(task, '')} | {metric} | {value:.4f} | {shown} |")
    files.append(write_text_atomic(out / "harness.md", "\n".join(lines) + "\n"))
    return files
