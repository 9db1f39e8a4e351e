"""TensorBoard and Weights & Biases (offline) receive the same records as metrics.jsonl."""

import json
import os
import subprocess
import sys


def test_wandb_offline_and_tensorboard(tmp_path, char_data):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONWARNINGS": "ignore"}
    args = ["train", "--data", str(char_data), "--out", str(tmp_path / "run"), "--preset", "tiny", "--max-steps", "4",
            "--train.log", "wandb,tensorboard", "--train.log_every", "1", "--quiet"]  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "lmforge.cli", *args], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps[:4] == [1, 2, 3, 4]


def test_unknown_logger_is_refused(tmp_path, char_data):
    args = [
        "train",
        "--data",
        str(char_data),
        "--out",
        str(tmp_path / "r"),
        "--preset",
        "tiny",
        "--train.log",
        "mlflow",
    ]
    result = subprocess.run([sys.executable, "-m", "lmforge.cli", *args], capture_output=True, text=True)
    assert result.returncode == 2 and "train.log takes tensorboard, wandb" in result.stderr
