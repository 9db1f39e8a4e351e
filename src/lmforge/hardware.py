"""What the machine at hand computes per second, measured once and cached.

On a CPU, bf16 matrix products are 7x faster than fp32 where the cores have AMX and a hundred times slower where
they have neither AMX nor AVX-512 bf16 instructions, so no rule written in advance picks the precision: a probe
times fp32 and bf16 matrix products (a second or two), and the result is kept in a cache file keyed by the CPU
model, its instruction sets, the thread count and the torch version. On a CUDA device the datasheet decides.

Read by training's `--train.precision auto` (bf16 where it is measured faster), by MFU (against the peak of the
precision in use) and by the time-budget sizing rule (presets.for_time_budget). The cache lives in
$LMFORGE_CACHE (else $XDG_CACHE_HOME/lmforge, else ~/.cache/lmforge), file hardware.json.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lmforge.files import write_text_atomic

# Dense bf16 peak FLOP/s of common accelerators (vendor datasheets, without sparsity).
ACCELERATOR_PEAKS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
    "4090": 165e12,
    "3090": 71e12,
    "V100": 125e12,
    "T4": 65e12,
}
BF16_MARGIN = 1.2  # bf16 must be this much faster than fp32 to be picked: autocast has costs a matmul probe lacks
PROBE_SIZE = 1024  # the side of the probe's square matrices: the size of a small model's larger products
PROBE_SECONDS = 0.25  # per timing; each precision is timed 3 times and the best kept (load only slows a probe)


@dataclass(frozen=True)
class Speed:
    """Measured matmul FLOP/s per precision on one device, with the key it is cached under."""

    key: str
    fp32: float
    bf16: float

    def peak(self, precision: str) -> float:
        return self.bf16 if precision in ("bf16", "fp16") else self.fp32

    @property
    def bf16_faster(self) -> bool:
        return self.bf16 > BF16_MARGIN * self.fp32


def cache_file() -> Path:
    root = os.environ.get("LMFORGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lmforge"
    )
    return Path(root) / "hardware.json"


def _cpu_model() -> str:
    """The CPU's model name and the instruction sets that decide bf16 speed (AMX, AVX-512 bf16, AVX-512)."""
    name, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "model name" and not name:
                name = value
            elif key == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    name = name or platform.processor() or platform.machine()
    marks = sorted(f for f in flags if f.startswith("amx") or f in ("avx512_bf16", "avx512f", "avx2"))
    return f"{name} [{' '.join(marks)}]"


def device_key(device) -> str:
    import torch

    if device.type == "cuda":
        return f"cuda {torch.cuda.get_device_name(device)}"
    return f"cpu {_cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def _matmul_rate(dtype, device, seconds: float = PROBE_SECONDS) -> float:
    """Best FLOP/s of square products of PROBE_SIZE, or of 256 where one of those would take over 50 ms (bf16 on
    a CPU without bf16 instructions runs at about 1 GFLOP/s)."""
    import torch

    def rate(size: int, seconds: float) -> float:
        a = torch.ones(size, size, dtype=dtype, device=device)  # no random numbers: the probe moves no RNG
        b = torch.ones(size, size, dtype=dtype, device=device)
        a @ b
        best = 0.0
        for _ in range(3):
            runs, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                a @ b
                runs += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = max(best, 2 * size**3 * runs / (time.perf_counter() - start))
        return best

    small = rate(256, seconds / 4)
    return small if 2 * PROBE_SIZE**3 / small > 0.05 else max(small, rate(PROBE_SIZE, seconds))


def _read_cache() -> dict:
    try:
        data = json.loads(cache_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def speed(device) -> Speed:
    """The device's matmul FLOP/s in fp32 and bf16: the datasheet of a known CUDA device, else the cached or a new
    probe."""
    import torch

    key = device_key(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        bf16 = next((peak for known, peak in ACCELERATOR_PEAKS.items() if known in name), 0.0)
        if bf16:
            return Speed(key, fp32=bf16 / 2, bf16=bf16)  # TF32 tensor cores: half the bf16 rate
    elif device.type != "cpu":
        return Speed(key, 0.0, 0.0)
    cached = _read_cache().get(key)
    if isinstance(cached, dict) and cached.get("fp32", 0) > 0 and cached.get("bf16", 0) > 0:
        return Speed(key, float(cached["fp32"]), float(cached["bf16"]))
    measured = Speed(key, _matmul_rate(torch.float32, device), _matmul_rate(torch.bfloat16, device))
    remember(measured)
    return measured


def remember(measured: Speed) -> None:
    """Store a probe result in the cache (a file shared by every run on this machine; best effort)."""
    entries = _read_cache()
    entries[measured.key] = {k: v for k, v in asdict(measured).items() if k != "key"}
    try:
        cache_file().parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(cache_file(), json.dumps(entries, indent=1, sort_keys=True) + "\n")
    except OSError:
        pass  # a read-only home: probe again next time


def auto_precision(device) -> str:
    """bf16 where this device multiplies bf16 matrices measurably faster than fp32, else fp32."""
    import torch

    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type != "cpu":
        return "fp32"
    return "bf16" if speed(device).bf16_faster else "fp32"


def memory_bytes(device) -> int:
    """The device's memory in bytes: a GPU's own, else the machine's RAM (0 where it cannot be read)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0
