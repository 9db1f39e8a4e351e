"""lm-evaluation-harness both ways, with the real `lm_eval`: its tasks on a run dir (`lmforge eval --harness`), on the
run's export (its `hf` model) and against `lmforge serve` (its `local-completions` model) give the same numbers.

Every harness run is a subprocess: lm_eval's logging handlers and progress-bar threads outlive an evaluation, and
in pytest's process they would write to a test's captured stderr after pytest has closed it. The tasks are YAML
files over local JSONL data, as the hub is not reachable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.eval.report import evaluate
from lmforge.interop import export_hf
from test_serve import lmforge_serve

CHOICES = [  # (prompt, choices, answer): text of the corpus the tiny run learnt, every item within 31 characters
    ("First Citizen:\nSpeak,", [" speak.", " die.", " famish?"], 0),
    ("All:\nSpeak, ", ["speak.", "hear.", "die."], 0),
    ("You are all resolved", [" rather", " café", " here"], 0),
    ("Before we proceed any", [" further", " tab", " line"], 0),
    ("hear me ", ["speak.", "naïve", "emoji"], 0),
    ("First Citizen:\n", ["Before", "All:", "Speak"], 0),
    ("Ünïcödé line: café,", [" naïve", " speak", " 東京"], 0),
    ("", ["First", "Speak", "café"], 0),  # an empty context: after the document-start token
]
TEXTS = [  # longer than the context of 32: scored in several windows
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n",
    "You are all resolved rather to die than to famish?\n\nÜnïcödé line: café, naïve, 東京\n",
]
PROMPTS = ["First Citizen:\n", "All:\nSpeak", "You are all", "café, naïve, "]


def task_yaml(name: str, data: Path, kind: str, fields: str) -> str:
    return (
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        f"output_type: {kind}\n{fields}"
    )


@pytest.fixture(scope="module")
def tasks(tmp_path_factory, tiny_run) -> tuple[Path, Path, dict[str, Path]]:
    """(folder, export of the tiny run, task files): multiple choice, rolling log-likelihood, greedy generation."""
    root = tmp_path_factory.mktemp("harness")
    export_hf(tiny_run, root / "hf")
    rows = {
        "choice": [{"prompt": p, "choices": c, "answer": a} for p, c, a in CHOICES],
        "rolling": [{"text": t} for t in TEXTS],
        "generate": [{"prompt": p, "target": ""} for p in PROMPTS],
    }
    fields = {
        "choice": "doc_to_text: prompt\ndoc_to_choice: choices\ndoc_to_target: answer\ntarget_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n",
        "rolling": "doc_to_text: ''\ndoc_to_target: text\nmetric_list:\n  - metric: word_perplexity\n",
        "generate": "doc_to_text: prompt\ndoc_to_target: target\ngeneration_kwargs:\n"
        '  until: ["\\n\\n", " e"]\n'  # YAML's double quotes read \n as a line break
        "  max_gen_toks: 8\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n",
    }
    kinds = {"choice": "multiple_choice", "rolling": "loglikelihood_rolling", "generate": "generate_until"}
    files = {}
    for name, records in rows.items():
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        files[name] = root / f"lmforge_{name}.yaml"
        files[name].write_text(task_yaml(f"lmforge_{name}", data, kinds[name], fields[name]), encoding="utf-8")
    return root, root / "hf", files


def run(args: list[str], cwd: Path, timeout: float = 300) -> str:
    """python -m ARGS offline, with caches in cwd; its output, after asserting it exited 0."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(cwd / "hf_home"), "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    command = [sys.executable, "-m", *args]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    return done.stdout + done.stderr


def harness_samples(out: Path) -> dict[str, dict[int, list]]:
    """{task: {doc_id: responses}} from lm_eval's --log_samples files (which write numbers as strings)."""
    found = {}
    for path in out.rglob("samples_*.jsonl"):
        task = path.name.removeprefix("samples_").rsplit("_", 1)[0]
        found[task] = {s["doc_id"]: s["filtered_resps"] for s in map(json.loads, path.read_text().splitlines())}
    return found


def ours_samples(out: Path) -> dict[str, dict[int, list]]:
    found: dict[str, dict[int, list]] = {}
    for sample in map(json.loads, (out / "harness_samples.jsonl").read_text().splitlines()):
        found.setdefault(sample["task"], {})[sample["doc_id"]] = sample["filtered_resps"]
    return found


def metrics(results: dict, task: str) -> dict[str, float]:
    return {k.split(",")[0]: float(v) for k, v in results[task].items() if "," in k and "_stderr" not in k}


def test_harness_numbers_agree_through_the_adapter_the_export_and_the_server(tasks, tiny_run):
    root, hf, files = tasks
    names = ",".join(str(files[name]) for name in ("choice", "rolling", "generate"))
    run(["lmforge.cli", "eval", str(tiny_run), "--harness", names, "--out", str(root / "ours")], root)
    ours = ours_samples(root / "ours")
    ours_results = json.loads((root / "ours" / "harness.json").read_text())["results"]
    assert "| lmforge_choice | 0 | acc |" in (root / "ours" / "harness.md").read_text()

    hf_args = f"pretrained={hf},dtype=float32,max_length=32"
    lm_eval = ["lm_eval", "--tasks", names, "--log_samples", "--output_path"]
    run([*lm_eval, str(root / "hf_out"), "--model", "hf", "--model_args", hf_args, "--device", "cpu"], root)
    exported = harness_samples(root / "hf_out")

    with lmforge_serve(tiny_run) as (_, url):  # the API model keeps one token of max_length for its reply
        api_args = f"base_url={url}/v1/completions,tokenizer={hf},tokenizer_backend=huggingface,max_length=32"
        names_api = f"{files['choice']},{files['generate']}"  # its rolling windows are 2 tokens shorter than hf's
        lm_eval_api = ["lm_eval", "--tasks", names_api, "--log_samples", "--output_path"]
        run([*lm_eval_api, str(root / "api_out"), "--model", "local-completions", "--model_args", api_args], root)
    served = harness_samples(root / "api_out")
    api_results = next((root / "api_out").rglob("results_*.json"))
    hf_results = next((root / "hf_out").rglob("results_*.json"))

    # each choice's log-likelihood agrees, so accuracies do: the three paths score the same tokens the same way
    for other in (exported, served):
        assert set(other["lmforge_choice"]) == set(ours["lmforge_choice"]) == set(range(len(CHOICES)))
        for doc, responses in ours["lmforge_choice"].items():
            theirs = [float(r[0]) for r in other["lmforge_choice"][doc]]
            assert [r[0] for r in responses] == pytest.approx(theirs, abs=1e-4), doc
    for results in (json.loads(hf_results.read_text())["results"], json.loads(api_results.read_text())["results"]):
        assert metrics(results, "lmforge_choice") == metrics(ours_results, "lmforge_choice")
    # whole texts in the harness's windows, against transformers; greedy generations through all three
    for doc, responses in ours["lmforge_rolling"].items():
        assert float(responses[0]) == pytest.approx(float(exported["lmforge_rolling"][doc][0]), abs=1e-4)
    for doc, responses in ours["lmforge_generate"].items():
        assert responses == exported["lmforge_generate"][doc] == served["lmforge_generate"][doc], doc

    # lmforge eval --task on the same records scores them as the harness does
    choice_records = root / "choice.jsonl"
    task = evaluate(tiny_run, task=choice_records, out=root / "task")["task"]
    for example, (_, responses) in zip(task["examples"], sorted(ours["lmforge_choice"].items())):
        assert example["loglikelihoods"] == pytest.approx([r[0] for r in responses], abs=1e-6)
    assert task["metrics"]["accuracy"] == metrics(ours_results, "lmforge_choice")["acc"]
    assert task["metrics"]["accuracy_norm"] == metrics(ours_results, "lmforge_choice")["acc_norm"]


def test_harness_in_bf16_and_its_errors(tasks, tiny_run):
    root, _, files = tasks
    out = root / "bf16"
    run(["lmforge.cli", "eval", str(tiny_run), "--harness", str(files["choice"]), "--dtype", "bf16", "--limit", "3",
         "--out", str(out)], root)  # fmt: skip
    report = json.loads((out / "harness.json").read_text())
    assert report["dtype"] == "bf16" and report["results"]["lmforge_choice"]["sample_len"] == 3
    samples = ours_samples(out)["lmforge_choice"]
    assert len(samples) == 3 and all(r[0] < 0 for responses in samples.values() for r in responses)
    args = [sys.executable, "-m", "lmforge.cli", "eval", str(tiny_run), "--harness", "no_such_task_anywhere"]
    done = subprocess.run(args, capture_output=True, text=True, cwd=root, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "lmforge: error: lm-evaluation-harness has no task no_such_task_anywhere" in done.stderr
