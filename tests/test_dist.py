"""Real torchrun with two gloo processes: DDP and FSDP2 match one process with the same global batch."""

import subprocess
import sys

import pytest

from conftest import losses, quiet
from lmforge.errors import LMForgeError
from lmforge.train.trainer import train as run_in_process

# fp32: split batches sum to the same gradient only to fp32's rounding; in bf16 (precision auto on an AMX CPU) each
# shape of matrix product rounds its own way, and the processes' losses part by 5e-5 within 8 steps.
COMMON = ["--preset", "tiny", "--train.batch_size", "8", "--train.log_every", "1", "--train.eval_every", "4",
          "--train.save_every", "4", "--optim.schedule", "constant", "--train.threads", "1", "--quiet",
          "--train.precision", "fp32"]  # fmt: skip


def train(data, out, steps, *extra, nproc=1):
    cli = ["--module", "lmforge.cli"] if nproc > 1 else ["-m", "lmforge.cli"]
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else []
    args = ["train", "--data", str(data), "--out", str(out), "--max-steps", str(steps), *COMMON, *extra]
    result = subprocess.run([sys.executable, *launcher, *cli, *args], capture_output=True, text=True, timeout=300)
    return result


@pytest.fixture(scope="module")
def single(tmp_path_factory, char_data):
    out = tmp_path_factory.mktemp("single") / "run"
    result = train(char_data, out, 8, "--train.micro_batch_size", "4")
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one_and_resume(tmp_path, char_data, single, mode):
    out = tmp_path / mode
    first = train(char_data, out, 4, "--train.dist", mode, nproc=2)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("done:") == 1  # only rank 0 reports
    resumed = train(char_data, out, 8, "--train.dist", mode, nproc=2)  # a checkpoint saved by 2 ranks resumes
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at step 4" in resumed.stdout
    ours, theirs = losses(out), losses(single)
    assert sorted(ours) == sorted(theirs) == list(range(1, 9))
    for step in theirs:
        assert abs(ours[step] - theirs[step]) < 1e-5, (step, ours[step], theirs[step])
    # resuming it in one process is refused, and changes nothing
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(LMForgeError, match="trained with 2 process\\(es\\), not 1; resume with torchrun"):
        run_in_process(None, out, progress_bar=False, echo=quiet)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
