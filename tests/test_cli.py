"""The lmforge command as a user runs it: a real subprocess, exit codes, one-line errors."""

import argparse
import concurrent.futures
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from lmforge.cli import main

LMFORGE = [sys.executable, "-m", "lmforge.cli"]


def run(*args, timeout=180, **kwargs):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([*LMFORGE, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, corpus_file):
    """lmforge prepare, then lmforge train for 12 steps: (the folder holding data/ and run/, their results)."""
    root = tmp_path_factory.mktemp("cli")
    prepared = run("prepare", corpus_file, "--out", root / "data", "--quiet")
    assert prepared.returncode == 0, prepared.stderr
    args = ["--data", root / "data", "--out", root / "run", "--preset", "tiny", "--max-steps", 12, "--quiet"]
    trained = run("train", *args)
    assert trained.returncode == 0, trained.stderr
    return root, {"prepare": prepared, "train": trained}


def test_prepare_train_generate(cli_run):
    root, results = cli_run
    assert "train:" in results["prepare"].stdout and "tokenizer: char" in results["prepare"].stdout
    assert "parameters" in results["train"].stdout and "checkpoint:" in results["train"].stdout
    result = run("generate", root / "run", "--prompt", "First", "--max-new-tokens", 30, "--seed", 1, "--num-samples", 2)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("First") >= 2 and "sample 2" in result.stdout
    # rerunning the finished command resumes, finds nothing to do, and succeeds
    args = ["--data", root / "data", "--out", root / "run", "--preset", "tiny", "--max-steps", 12, "--quiet"]
    result = run("train", *args)
    assert result.returncode == 0, result.stderr
    assert "resuming at step 12" in result.stdout


def commands() -> list[str]:
    from lmforge.cli import build_parser

    parser = build_parser()
    (subcommands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return list(subcommands.choices)


def test_every_subcommand_has_help():
    names = commands()
    assert len(names) == 11 and {"prepare", "train", "finetune", "serve", "export", "import"} <= set(names)
    overview = run("--help")
    assert overview.returncode == 0 and all(name in overview.stdout for name in names)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # each is a process of its own: run a few at once
        results = dict(zip(names, pool.map(lambda name: run(name, "--help"), names)))
    for name, result in results.items():
        assert result.returncode == 0 and not result.stderr, (name, result.stderr)
        assert result.stdout.startswith(f"usage: lmforge {name}") and "--help" in result.stdout, name
    assert "--model.n_layer" in results["train"].stdout and "--lora.rank" in results["finetune"].stdout


def bad_cases(root):
    (root / "binary.txt").write_bytes(b"\xff\xfe\x00" * 10)
    return [
        (["prepare", root / "nope.txt", "--out", root / "o1"], "not found"),
        (["prepare", root / "empty-dir-none", "--out", root / "o2"], "not found"),
        (["prepare", "pydocs", "--out", root / "o3", "--tokenizer", "wordpiece"], "--tokenizer"),
        (["prepare", "pydocs", "--out", root / "o4", "--val-fraction", "1.5"], "val-fraction"),
        (["train", "--data", root / "data", "--out", root / "r1", "--preset", "huge"], "invalid choice"),
        (["train", "--data", root / "data", "--out", root / "r2", "--model.n_layr", "2"], "unrecognized"),
        (["train", "--data", root / "data", "--out", root / "r3", "--model.n_layer", "two"], "integer"),
        (["train", "--data", root / "nodata", "--out", root / "r4"], "not a data dir"),
        (["train", "--out", root / "r5"], "--data is required"),
        (["train", "--data", root / "data", "--out", root / "run", "--model.n_embd", "64"], "differs"),
        (["train", "--data", root / "data", "--out", root / "r6", "--time", "soon"], "duration"),
        (["generate", root / "run", "--prompt", "\u2603 snowman"], "character"),
        (["generate", root / "run", "--temperature", "-1"], "temperature"),
        (["generate", root / "nothing"], "not a run dir"),
    ]


def test_bad_input_gets_one_line_and_exit_2(cli_run, capsys):
    """Every case in this process through main(), as the command runs it; three also as real commands."""
    root, _ = cli_run
    cases = bad_cases(root)
    for args, message in cases:
        assert main([str(a) for a in args]) == 2, args
        captured = capsys.readouterr()
        lines = [line for line in captured.err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("lmforge: error:"), (args, captured.err)
        assert message in lines[0], (args, lines[0])
    real = [cases[0], cases[5], cases[-1]]  # prepare, train (a flag), generate
    assert [args[0] for args, _ in real] == ["prepare", "train", "generate"]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda case: run(*case[0]), real))
    for (args, message), result in zip(real, results):
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("lmforge: error:") and message in lines[0], result.stderr
    assert not any((root / name).exists() for name in ("o1", "o2", "o3", "o4"))
    assert not any((root / name / "checkpoints").exists() for name in ("r1", "r2", "r3", "r4", "r5", "r6"))


def last_step(run_dir) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return json.loads(line)["step"]
        except (ValueError, KeyError):
            continue
    return 0


def test_sigkill_during_training_then_resume_matches_straight(tmp_path, char_data):
    """Kill the trainer at random moments (including mid-save); the resumed run equals the straight one."""

    common = ["--data", char_data, "--preset", "tiny", "--max-steps", 300, "--train.save_every", 7,
              "--train.log_every", 1, "--train.eval_every", 50, "--train.threads", 1, "--quiet"]  # fmt: skip
    # the straight run goes on beside the killed ones (its own process: a second core, where there is one)
    errors = open(tmp_path / "straight.err", "w")
    straight = subprocess.Popen(
        [*LMFORGE, "train", "--out", str(tmp_path / "straight"), *map(str, common)],
        stdout=subprocess.DEVNULL,
        stderr=errors,
    )
    out = tmp_path / "killed"
    rng = random.Random(0)
    kills, target = 0, 0
    for _ in range(4):
        target += rng.randint(20, 60)
        proc = subprocess.Popen([*LMFORGE, "train", "--out", str(out), *map(str, common)], stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while proc.poll() is None and time.time() < deadline and last_step(out) < target:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.03))  # land anywhere in a step, a log write or a checkpoint save
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    final = run("train", "--out", out, *common)
    assert final.returncode == 0, final.stderr
    assert kills == 4
    code = straight.wait(timeout=180)
    errors.close()
    assert code == 0, (tmp_path / "straight.err").read_text()

    def read(path):
        return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]

    ours = {r["step"]: r["loss"] for r in read(out) if "loss" in r}
    theirs = {r["step"]: r["loss"] for r in read(tmp_path / "straight") if "loss" in r}
    assert ours == theirs
    a = (out / "checkpoints" / "step_000300" / "model.safetensors").read_bytes()
    b = (tmp_path / "straight" / "checkpoints" / "step_000300" / "model.safetensors").read_bytes()
    assert a == b


def test_the_cli_and_prepare_do_not_import_torch(tmp_path):
    """Starting the CLI and preparing data need no torch: a second and 280 MiB less per process (and per worker)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("To be, or not to be, that is the question.\n" * 50)
    code = (
        "import sys\n"
        "from lmforge.cli import main\n"
        f"main(['prepare', {str(corpus)!r}, '--out', {str(tmp_path / 'data')!r}, '--quiet', '--workers', '2'])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "data" / "meta.json").is_file()


def test_a_command_whose_extra_is_missing_says_which_to_install(tiny_run, monkeypatch, capsys):
    """issue 15 item 10: `lmforge serve` without the serve extra; sys.modules[name] = None makes its import fail
    as it does where the package is not installed."""
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    monkeypatch.delitem(sys.modules, "lmforge.serve.app", raising=False)  # imported afresh, it imports uvicorn
    assert main(["serve", str(tiny_run), "--port", "0"]) == 2
    assert capsys.readouterr().err.strip() == (
        "lmforge: error: lmforge serve needs the serve extra (uvicorn is not installed): pip install 'lmforge[serve]'"
    )
