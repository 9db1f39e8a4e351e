"""The Python half of bench/gpu.sh: CUDA path checks, the MFU summary of a run, GPU decoding, a torchrun FSDP run.

    python bench/gpu_checks.py checks --device cuda --json checks.json        # PASS/FAIL lines, one per check
    python bench/gpu_checks.py mfu RUN_DIR --json mfu.json                    # median tokens/s and MFU after warm-up
    python bench/gpu_checks.py decode RUN_DIR --device cuda --json decode.json
    python -m torch.distributed.run --standalone --nproc_per_node 1 bench/gpu_checks.py dist-train -- train ...

Every subcommand prints its figures as it goes and writes them as JSON. `checks` exits 1 if any check FAILs (a
WARN or SKIP does not). `dist-train` runs `lmforge.cli` with the process group and FSDP/DDP wrapping that lmforge
turns on only for two or more processes, so one GPU exercises the NCCL path: lmforge.train.dist.Dist.enabled is
made true for this process alone (nothing in src/ changes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

# torch (and torch.nn.functional as F) are imported by main(), except for collect and losses-match: gpu.sh runs
# collect after every step, and importing torch would cost it a second or two each time.

# MFU is reported against two peaks, each named with its value: the trainer's (lmforge.hardware.speed: the
# datasheet figure of the GPU at hand from ACCELERATOR_PEAKS, or on a CPU its cached probe), and the bf16 matmul rate
# this run's checks measured on the same device (bf16_matmul_peak), which no datasheet figure is.


class Report:
    """Named results, printed one line each as they come, and kept for the JSON file."""

    def __init__(self):
        self.results: dict[str, dict] = {}

    def add(self, name: str, status: str, detail: str = "", **values) -> None:
        self.results[name] = {"status": status, "detail": detail, **values}
        print(f"{status:5} {name}: {detail}", flush=True)

    def run(self, name: str, fn, informational: bool = False) -> None:
        """fn() -> (status, detail, values); an exception is a FAIL (a WARN if informational) with its message."""
        try:
            status, detail, values = fn()
        except Exception as exc:  # one broken check must not hide the others
            status, detail, values = ("WARN" if informational else "FAIL"), f"{type(exc).__name__}: {exc}", {}
        self.add(name, status, detail, **values)

    @property
    def failed(self) -> list[str]:
        return [name for name, r in self.results.items() if r["status"] == "FAIL"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int, seconds: float = 0.5) -> float:
    """FLOP/s of size x size x size matmuls in dtype, measured for about `seconds`."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10):
            a @ b
        sync(device)
        runs += 10
    return 2 * size**3 * runs / (time.perf_counter() - start)


@contextlib.contextmanager
def tf32(enabled: bool):
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def tflops(rate: float) -> str:
    return f"{rate / 1e12:.{1 if rate >= 1e13 else 3}f} TFLOP/s"


def max_err(got: list[torch.Tensor], ref: list[torch.Tensor]) -> list[float]:
    return [(a.float() - b.float()).abs().max().item() for a, b in zip(got, ref)]


# --- checks --------------------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict:
    from lmforge.hardware import speed

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": str(device),
        "cpus": os.cpu_count(),
    }
    with contextlib.suppress(ImportError):
        import transformers

        env["transformers"] = transformers.__version__
    env["triton"] = None
    with contextlib.suppress(ImportError):
        import triton

        env["triton"] = triton.__version__
    # Triton builds its small C launcher with the system compiler the first time torch.compile runs on a GPU.
    env["c_compiler"] = os.environ.get("CC") or next(filter(None, map(shutil.which, ("cc", "gcc", "clang"))), None)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device_name=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            sms=props.multi_processor_count,
            bf16_supported=torch.cuda.is_bf16_supported(),
            driver_visible_devices=torch.cuda.device_count(),
        )
    else:
        env.update(device_name=platform.processor() or platform.machine(), bf16_supported=True)
    env["trainer_peak_flops"] = speed(device).peak("bf16")  # what the trainer divides by for bf16 MFU (0: unknown)
    return env


def check_bf16_peak(device: torch.device, smoke: bool):
    from lmforge.hardware import speed

    rate = matmul_rate(device, torch.bfloat16, 256 if smoke else 8192, 0.2 if smoke else 1.0)
    detail = f"{tflops(rate)} bf16 matmul ({256 if smoke else 8192}^3)"
    trainer_peak = speed(device).peak("bf16")
    if trainer_peak:
        detail += f" = {rate / trainer_peak:.0%} of the trainer's peak ({tflops(trainer_peak)})"
    return "INFO", detail, {"bf16_matmul_flops": rate, "trainer_peak_flops": trainer_peak}


def check_tf32(device: torch.device, smoke: bool):
    from lmforge.train.trainer import setup_precision

    setup_precision("bf16", device)  # the trainer turns TF32 on here, for CUDA only
    flags = {
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if device.type != "cuda":
        return "SKIP", f"TF32 is set for CUDA only; flags here {flags}", flags
    size = 256 if smoke else 4096
    with tf32(False):
        plain = matmul_rate(device, torch.float32, size, 0.3)
    with tf32(True):
        fast = matmul_rate(device, torch.float32, size, 0.3)
    ok = flags["matmul_allow_tf32"] and flags["cudnn_allow_tf32"] and fast > 1.5 * plain
    detail = (
        f"after setup_precision: {flags}; fp32 matmul {plain / 1e12:.1f} TFLOP/s without TF32, "
        f"{fast / 1e12:.1f} with ({fast / plain:.1f}x)"
    )
    return ("PASS" if ok else "FAIL"), detail, {**flags, "fp32_flops": plain, "tf32_flops": fast}


def sdpa_run(backend, q, k, v, dout, dtype, **kwargs) -> list[torch.Tensor]:
    from torch.nn.attention import sdpa_kernel

    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    with sdpa_kernel(backend):
        out = F.scaled_dot_product_attention(*leaves, **kwargs)
    out.backward(dout.to(dtype))
    return [out.detach()] + [t.grad for t in leaves]


def check_sdpa(device: torch.device, smoke: bool, backend_name: str, gqa: bool = False):
    """A backend's bf16 forward and backward against fp32 math.

    Each of out, dq, dk, dv passes if its largest error is within 4x that of the math backend in bf16, or within 2%
    of the reference's largest magnitude (bf16 keeps about 3 significant digits), plus 1e-3: a wrong mask or scale
    is off by far more.
    """
    from torch.nn.attention import SDPBackend

    backend = getattr(SDPBackend, backend_name, None)
    if backend is None:
        return "SKIP", f"SDPBackend.{backend_name} does not exist in torch {torch.__version__}", {}
    B, H, T, D = (2, 4, 64, 16) if smoke else (4, 12, 1024, 64)
    kv_heads = H // 2 if gqa else H
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, T, D, generator=generator).to(device)
    k, v = (torch.randn(B, kv_heads, T, D, generator=generator).to(device) for _ in range(2))
    dout = torch.randn(B, H, T, D, generator=generator).to(device)
    kwargs = {"is_causal": True, "enable_gqa": gqa}
    with tf32(False):
        ref = sdpa_run(SDPBackend.MATH, q, k, v, dout, torch.float32, **kwargs)
        scale = [t.abs().max().item() for t in ref]
        base = max_err(sdpa_run(SDPBackend.MATH, q, k, v, dout, torch.bfloat16, **kwargs), ref)
        try:
            got = max_err(sdpa_run(backend, q, k, v, dout, torch.bfloat16, **kwargs), ref)
        except RuntimeError as exc:
            if not any(m in str(exc) for m in ("No available kernel", "No viable backend", "not supported")):
                raise
            # Flash must run on CUDA for the model's default attention (no GQA); the others are optional.
            required = device.type == "cuda" and backend_name == "FLASH_ATTENTION" and not gqa
            reason = str(exc).strip().splitlines()[0][:160]
            return ("FAIL" if required else "SKIP"), f"no {backend_name} kernel for this input: {reason}", {}
    names = ("out", "dq", "dk", "dv")
    tolerance = [max(4 * b, 0.02 * m) + 1e-3 for b, m in zip(base, scale)]
    ok = all(g <= t for g, t in zip(got, tolerance))
    shape = f"B{B} H{H}{f'/kv{kv_heads}' if gqa else ''} T{T} D{D} causal"
    errs = ", ".join(f"{n} {g:.2e} (math bf16 {b:.2e}, tol {t:.1e})" for n, g, b, t in zip(names, got, base, tolerance))
    values = {
        "shape": shape,
        "max_abs_err": dict(zip(names, got)),
        "math_bf16_max_abs_err": dict(zip(names, base)),
        "tolerance": dict(zip(names, tolerance)),
    }
    return ("PASS" if ok else "FAIL"), f"{shape}, bf16 vs fp32 math: {errs}", values


def check_default_attention_ops(device: torch.device, smoke: bool):
    """Which SDPA backend the model's own attend() dispatches to by default in bf16 training (no backend forced).

    Read from the profiler's operator names (aten::_scaled_dot_product_flash_attention, ..._cudnn_attention,
    ..._efficient_attention, or the math fallback), for plain attention and for GQA (the llama presets).
    """
    from torch.profiler import ProfilerActivity, profile

    from lmforge.model.gpt import attend

    B, H, T, D = (2, 4, 64, 16) if smoke else (4, 12, 1024, 64)
    found = {}
    for label, kv in (("mha", H), ("gqa", H // 2 if smoke else 4)):
        q = torch.randn(B, H, T, D, device=device, dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(B, kv, T, D, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in "kv")
        attend(q, k, v, is_causal=True, enable_gqa=kv != H).sum().backward()  # warm-up
        sync(device)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            attend(q, k, v, is_causal=True, enable_gqa=kv != H).sum().backward()
            sync(device)
        names = {e.name for e in prof.events()}
        keys = ("scaled_dot_product", "flash", "efficient_attention", "cudnn_attention", "_softmax", "bmm")
        found[label] = sorted(n for n in names if any(key in n for key in keys) and "Backward" not in n)
    fused = all(any(k in n for n in found[label] for k in ("flash", "cudnn", "efficient")) for label in found)
    detail = "; ".join(f"{label}: {', '.join(names) or 'none matched'}" for label, names in found.items())
    if device.type != "cuda":
        detail += " (CPU: attend() computes bf16 training attention in fp32 by design)"
    return ("INFO" if fused else "WARN"), detail, {"ops": found, "fused": fused}


def check_compile(device: torch.device, smoke: bool):
    """Our GPT eager vs torch.compile in bf16 autocast: logits, loss and grad norm against an fp32 eager reference."""
    from lmforge.eval.lm import lm_loss
    from lmforge.model.gpt import GPT, ModelConfig

    if smoke:
        config = ModelConfig(vocab_size=512, seq_len=64, n_layer=2, n_head=2, n_embd=32)
        batch = 2
    else:
        config = ModelConfig(vocab_size=50304, seq_len=512, n_layer=2, n_head=12, n_embd=768)
        batch = 8
    torch.manual_seed(0)
    model = GPT(config).to(device)
    x = torch.randint(0, config.vocab_size, (batch, config.seq_len), device=device)
    y = torch.randint(0, config.vocab_size, (batch, config.seq_len), device=device)

    def run(fn, autocast: bool):
        model.zero_grad(set_to_none=True)
        context = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with context:
            logits, _ = fn(x)
        loss = lm_loss(logits, y)
        loss.backward()
        grad = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
        return logits.detach().float(), loss.item(), grad

    with tf32(False):
        ref_logits, ref_loss, ref_grad = run(model, False)
    eager_logits, eager_loss, eager_grad = run(model, True)
    compiled = torch.compile(model)
    start = time.perf_counter()
    run(compiled, True)  # compiles forward and backward
    compile_s = time.perf_counter() - start
    comp_logits, comp_loss, comp_grad = run(compiled, True)

    def errs(logits, loss, grad):
        return ((logits - ref_logits).abs().max().item(), abs(loss - ref_loss), (grad - ref_grad).norm().item())

    eager, comp = errs(eager_logits, eager_loss, eager_grad), errs(comp_logits, comp_loss, comp_grad)
    vs_eager = (comp_logits - eager_logits).abs().max().item(), abs(comp_loss - eager_loss)
    # Within 3x eager bf16's error, or bf16's own precision: 2% of the largest logit / of the gradient's norm, 0.1% of
    # the loss.
    floors = (0.02 * ref_logits.abs().max().item(), 1e-3 * abs(ref_loss), 0.02 * ref_grad.norm().item())
    ok = all(c <= max(3 * e, f) + 1e-6 for c, e, f in zip(comp, eager, floors))
    detail = (
        f"{config.n_layer}x{config.n_embd}, context {config.seq_len}, vocab {config.vocab_size}, batch {batch}; "
        f"loss fp32 {ref_loss:.5f} eager-bf16 {eager_loss:.5f} compiled-bf16 {comp_loss:.5f}; vs fp32: "
        f"logits max err eager {eager[0]:.2e} compiled {comp[0]:.2e}, grad err norm eager {eager[2]:.2e} compiled "
        f"{comp[2]:.2e} (grad norm {ref_grad.norm().item():.2e}); compiled vs eager logits {vs_eager[0]:.2e}; "
        f"compile {compile_s:.1f}s"
    )
    values = {
        "loss_fp32": ref_loss,
        "loss_eager_bf16": eager_loss,
        "loss_compiled_bf16": comp_loss,
        "logits_err_eager": eager[0],
        "logits_err_compiled": comp[0],
        "grad_err_eager": eager[2],
        "grad_err_compiled": comp[2],
        "logits_compiled_vs_eager": vs_eager[0],
        "compile_s": compile_s,
        "compile_ok": True,
    }
    return ("PASS" if ok else "FAIL"), detail, values


def check_fp16_scaler(device: torch.device, smoke: bool):
    """A few fp16 steps the way the trainer takes them: autocast, scaled backward, unscale, clip, step, update."""
    from lmforge.config import OptimConfig
    from lmforge.eval.lm import lm_loss
    from lmforge.model.gpt import GPT, ModelConfig
    from lmforge.train.optim import build_optimizers
    from lmforge.train.trainer import clip_gradients, setup_precision

    if device.type == "cuda":
        _, autocast, scaler = setup_precision("fp16", device)
        how = "trainer's setup_precision"
    else:  # the trainer refuses fp16 on CPU; the same calls on torch's CPU scaler still exercise this code
        autocast, scaler = torch.autocast("cpu", dtype=torch.float16), torch.amp.GradScaler("cpu")
        how = "CPU autocast + GradScaler('cpu') (the trainer refuses fp16 on CPU)"
    torch.manual_seed(0)
    size = dict(n_layer=2, n_head=2, n_embd=32) if smoke else dict(n_layer=2, n_head=4, n_embd=256)
    model = GPT(ModelConfig(vocab_size=256, seq_len=64, **size)).to(device)
    (optimizer,) = build_optimizers(model, OptimConfig(lr=3e-3, warmup_steps=0), device.type)
    x = torch.randint(0, 256, (8, 64), device=device)
    losses, scales, norms = [], [], []
    for _ in range(8):  # one fixed batch: the loss must fall
        with autocast:
            logits, _ = model(x[:, :-1])
        loss = lm_loss(logits, x[:, 1:])
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        norms.append(clip_gradients(model, 1.0))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        scales.append(scaler.get_scale())
    ok = all(math.isfinite(v) for v in losses) and losses[-1] < losses[0] and math.isfinite(scales[-1])
    detail = f"{how}: loss {losses[0]:.4f} -> {losses[-1]:.4f} in 8 steps, scale {scales[0]:g} -> {scales[-1]:g}"
    return ("PASS" if ok else "FAIL"), detail, {"losses": losses, "scales": scales, "grad_norms": norms}


def cmd_checks(args) -> int:
    device = torch.device(args.device)
    report = Report()
    env = {}
    try:
        env = environment(device)
        report.add("environment", "INFO", ", ".join(f"{k}={v}" for k, v in env.items()), **env)
        if device.type == "cuda" and not env.get("bf16_supported"):
            report.add("bf16", "FAIL", "torch.cuda.is_bf16_supported() is False")
    except Exception as exc:
        report.add("environment", "FAIL", f"{type(exc).__name__}: {exc}")
    report.run("bf16_matmul_peak", lambda: check_bf16_peak(device, args.smoke), informational=True)
    report.run("tf32", lambda: check_tf32(device, args.smoke))
    for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
        report.run(f"sdpa_{name.lower()}", lambda name=name: check_sdpa(device, args.smoke, name))
    report.run("sdpa_flash_attention_gqa", lambda: check_sdpa(device, args.smoke, "FLASH_ATTENTION", gqa=True))
    report.run("default_attention_ops", lambda: check_default_attention_ops(device, args.smoke), informational=True)
    report.run("gpt_eager_vs_compile", lambda: check_compile(device, args.smoke))
    report.run("fp16_gradscaler", lambda: check_fp16_scaler(device, args.smoke))
    failed = report.failed
    print(
        f"checks: {len(report.results) - len(failed)} of {len(report.results)} without FAIL"
        + (f"; FAILED: {', '.join(failed)}" if failed else ""),
        flush=True,
    )
    compile_ok = report.results.get("gpt_eager_vs_compile", {}).get("compile_ok", False)
    write_json(args.json, {"env": env, "checks": report.results, "failed": failed, "compile_ok": compile_ok})
    return 1 if failed else 0


# --- mfu -----------------------------------------------------------------------------------------------------------


def cmd_mfu(args) -> int:
    from lmforge.config import RunConfig
    from lmforge.model.gpt import GPT

    run = Path(args.run_dir)
    config = RunConfig.load(run / "config.json")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "tokens_per_s" in r]
    if not steps:
        print(f"no step records in {run / 'metrics.jsonl'}", flush=True)
        return 1
    warmup = max(args.warmup, len(steps) // 10)
    kept = steps[warmup:] or steps[-1:]
    with torch.device("cpu"):
        flops_per_token = GPT(config.model).flops_per_token()
    rate = statistics.median(r["tokens_per_s"] for r in kept)
    mfu = statistics.median(r["mfu"] for r in kept)
    checks = (
        json.loads(Path(args.checks_json).read_text()) if args.checks_json and Path(args.checks_json).is_file() else {}
    )
    probe = checks.get("checks", {}).get("bf16_matmul_peak", {}).get("bf16_matmul_flops")
    # The peak the trainer divided by: its mfu = tokens/s x FLOPs/token / peak (on CUDA, ACCELERATOR_PEAKS' entry).
    best = max(kept, key=lambda r: r["mfu"])
    peak = best["tokens_per_s"] * flops_per_token / best["mfu"] if best["mfu"] else None
    device_name = checks.get("env", {}).get("device_name") or "this device"
    result = {
        "run_dir": str(run),
        "steps_logged": len(steps),
        "warmup_steps_dropped": warmup,
        "steps_measured": len(kept),
        "first_measured_step": kept[0]["step"],
        "last_step": steps[-1]["step"],
        "seconds_to_first_measured_step": kept[0].get("elapsed"),
        "tokens_per_step": (steps[-1]["tokens"] - steps[0]["tokens"]) // max(1, steps[-1]["step"] - steps[0]["step"])
        if len(steps) > 1
        else steps[0]["tokens"],
        "flops_per_token": flops_per_token,
        "median_tokens_per_s": rate,
        "min_tokens_per_s": min(r["tokens_per_s"] for r in kept),
        "max_tokens_per_s": max(r["tokens_per_s"] for r in kept),
        "median_mfu_trainer": mfu,
        "trainer_peak_flops": peak,
        "device_name": device_name,
        "mfu_vs_probe": rate * flops_per_token / probe if probe else None,
        "probe_bf16_flops": probe,
        "final_loss": steps[-1]["loss"],
        "target_mfu": args.target,
        "target_met": mfu >= args.target,
    }
    print(
        f"MFU over steps {kept[0]['step']}..{steps[-1]['step']} ({len(kept)} of {len(steps)} logged, first "
        f"{warmup} dropped as warm-up/compile): median {rate:,.0f} tokens/s (min {result['min_tokens_per_s']:,.0f}, "
        f"max {result['max_tokens_per_s']:,.0f}); {flops_per_token / 1e6:.1f} MFLOPs/token",
        flush=True,
    )
    print(
        f"MFU {mfu:.1%} vs the trainer's peak for {device_name} ({tflops(peak) if peak else 'unknown'})"
        + (f"; {result['mfu_vs_probe']:.1%} vs the bf16 matmul rate measured on it ({tflops(probe)})" if probe else "")
        + f"; target {args.target:.0%} (vs the trainer's peak): {'met' if result['target_met'] else 'NOT met'}",
        flush=True,
    )
    write_json(args.json, result)
    return 0


# --- decode --------------------------------------------------------------------------------------------------------


def cmd_decode(args) -> int:
    """lmforge's KV-cached decoding on the device, and transformers' generate() on the same weights there."""
    import transformers

    from lmforge.api import LM
    from lmforge.generate import SamplingParams, generate
    from lmforge.interop.hf import export_hf

    device = torch.device(args.device)
    lm = LM.load(args.run_dir, device=str(device))
    new = min(args.new_tokens, lm.model.config.seq_len - 16)
    prompt = [
        int(i) for i in torch.randint(1, lm.tokenizer.vocab_size, (16,), generator=torch.Generator().manual_seed(0))
    ]
    with tempfile.TemporaryDirectory() as tmp:
        exported = export_hf(args.run_dir, Path(tmp) / "hf")
        hf = transformers.AutoModelForCausalLM.from_pretrained(exported["out_dir"], dtype=torch.float32)
    hf = hf.to(device).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    result = {"device": str(device), "new_tokens": new, "dtype": "fp32"}
    out: dict[str, list[int]] = {}

    def timed(name, fn):
        fn()  # warm-up
        best = math.inf
        for _ in range(args.repeats):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            best = min(best, time.perf_counter() - start)
        return best

    def ours(batch):
        params = SamplingParams(new, 0.0, stop_token_ids=())
        out["ours"] = generate(lm.model, lm.tokenizer, [prompt] * batch, params)[0].token_ids

    def theirs(batch):
        ids = torch.tensor([prompt] * batch, device=device)
        with torch.inference_mode():
            tokens = hf.generate(ids, max_new_tokens=new, do_sample=False, use_cache=True)
        out["theirs"] = tokens[0, len(prompt) :].tolist()

    for batch in args.batch_sizes:
        a, b = timed("ours", lambda batch=batch: ours(batch)), timed("theirs", lambda batch=batch: theirs(batch))
        same = out["ours"] == out["theirs"]
        result[f"batch_{batch}"] = {
            "lmforge_tokens_per_s": batch * new / a,
            "transformers_tokens_per_s": batch * new / b,
            "speedup": b / a,
            "same_tokens": same,
        }
        print(
            f"decode on {device}, {batch} stream(s) x {new} greedy tokens: lmforge {batch * new / a:,.0f} tokens/s "
            f"({a / new * 1000:.2f} ms/step), transformers {batch * new / b:,.0f} tokens/s "
            f"({b / new * 1000:.2f} ms/step), speed-up {b / a:.2f}x, same tokens: {'yes' if same else 'no'}",
            flush=True,
        )
    write_json(args.json, result)
    return 0


# --- dist-train ----------------------------------------------------------------------------------------------------


def cmd_dist_train(args) -> int:
    """lmforge.cli with lmforge's process-group path on even for one process (NCCL on CUDA, gloo on CPU)."""
    import torch.distributed as dist

    import lmforge.train.dist as lmdist
    from lmforge import cli

    lmdist.Dist.enabled = property(lambda self: True)
    seen: dict = {}
    init, wrap = dist.init_process_group, lmdist.wrap

    def init_process_group(*a, **kw):
        init(*a, **kw)
        device = torch.device("cuda", torch.cuda.current_device()) if kw.get("backend") == "nccl" else None
        tensor = torch.ones(1, device=device) * (dist.get_rank() + 1)
        dist.all_reduce(tensor)
        seen.update(backend=dist.get_backend(), world_size=dist.get_world_size(), all_reduce=tensor.item())
        print(
            f"process group: backend {seen['backend']}, world size {seen['world_size']}, "
            f"all_reduce -> {seen['all_reduce']:g}",
            flush=True,
        )

    def wrapped(model, mode, info, device):
        model = wrap(model, mode, info, device)
        seen.update(wrapped_as=type(model).__name__, mode=mode)
        print(f"model wrapped for --train.dist {mode}: {type(model).__name__}", flush=True)
        return model

    dist.init_process_group = init_process_group  # lmforge.train.dist calls it, and wrap, through module attributes
    lmdist.wrap = wrapped
    argv = args.cli[1:] if args.cli[:1] == ["--"] else args.cli
    code = cli.main(argv)
    if args.json and os.environ.get("RANK", "0") == "0":
        write_json(args.json, {**seen, "exit_code": code})
    if code == 0 and not seen.get("backend"):
        print("the process group was never set up", flush=True)
        return 1
    return code


# --- losses-match, collect -----------------------------------------------------------------------------------------


def step_losses(run_dir: str) -> dict[int, float]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, filter(None, lines)) if "loss" in r}


def cmd_losses_match(args) -> int:
    a, b = step_losses(args.run_a), step_losses(args.run_b)
    common = sorted(set(a) & set(b))
    diff = max((abs(a[s] - b[s]) for s in common), default=math.inf)
    ok = bool(common) and sorted(a) == sorted(b) and diff <= args.tol
    print(
        f"{'PASS' if ok else 'FAIL'}  losses of {args.run_b} vs {args.run_a}: {len(common)} common steps "
        f"(of {len(a)} and {len(b)}), max abs difference {diff:.2e} (tolerance {args.tol:g})",
        flush=True,
    )
    write_json(args.json, {"steps": len(common), "max_abs_diff": diff, "tolerance": args.tol, "match": ok})
    return 0 if ok else 1


def last_json_object(text: str) -> dict | None:
    """The JSON object that ends a command's output (a line "{" to the end), or None."""
    lines = text.splitlines()
    for start in range(len(lines) - 1, -1, -1):
        if lines[start] == "{":
            with contextlib.suppress(json.JSONDecodeError):
                return json.loads("\n".join(lines[start:]))
    return None


def cmd_collect(args) -> int:
    """results.json from the work folder: each step's status and the figures the steps wrote."""
    work = Path(args.work)

    def load(name: str):
        path = work / name
        with contextlib.suppress(OSError, json.JSONDecodeError):
            return json.loads(path.read_text())
        return None

    def tail(name: str, lines: int) -> list[str] | None:
        path = work / name
        if not path.is_file():
            return None
        return [line.rstrip() for line in path.read_text(errors="replace").splitlines() if line.strip()][-lines:]

    steps = []
    if (work / "steps.jsonl").is_file():
        steps = [json.loads(line) for line in (work / "steps.jsonl").read_text().splitlines() if line.strip()]
    throughput_out = work / "throughput.out"
    result = {
        "mode": args.mode,
        "budget_s": args.budget,
        "settings": load("settings.json"),
        "elapsed_s": args.elapsed,
        "steps": steps,
        "failed_steps": [s["name"] for s in steps if s["status"] != "ok"],
        "checks": load("checks.json"),
        "train_mfu": load("mfu.json"),
        "generate_cpu": tail("generate.out", 16),
        "decode": load("decode.json"),
        "torchrun_fsdp_nccl": load("dist.json"),
        "torchrun_losses_match": load("match.json"),
        "throughput": last_json_object(throughput_out.read_text(errors="replace"))
        if throughput_out.is_file()
        else None,
    }
    write_json(args.json, result)
    if args.print:
        print(f"\nsummary ({args.mode}, {args.elapsed:.0f}s of a {args.budget:.0f}s budget):")
        for s in steps:
            print(f"  {s['status']:8} {s['name']:22} {s['seconds']:4d}s  (rc {s['rc']}, limit {s['limit']}s)")
        mfu = result["train_mfu"]
        if mfu:
            peak, probe = mfu["trainer_peak_flops"], mfu["probe_bf16_flops"]
            print(
                f"  train gpt2: {mfu['median_tokens_per_s']:,.0f} tokens/s, MFU {mfu['median_mfu_trainer']:.1%} vs "
                f"the trainer's peak ({tflops(peak) if peak else 'unknown'})"
                + (f", {mfu['mfu_vs_probe']:.1%} vs the measured bf16 matmul rate ({tflops(probe)})" if probe else "")
                + f"; target {mfu['target_mfu']:.0%} {'met' if mfu['target_met'] else 'NOT met'}"
            )
        for row in (result["throughput"] or {}).get("results", []):
            ratios = ", ".join(f"{k.removeprefix('ratio_')} {v:.2f}x" for k, v in row.items() if k.startswith("ratio_"))
            print(
                f"  throughput {row['size']} batch {row['batch']}: reference fp32 {row['reference_fp32']:,.0f} "
                f"tokens/s; vs it: {ratios}"
            )
        print(f"  failed or skipped steps: {', '.join(result['failed_steps']) or 'none'}")
    return 0


def write_json(path: str | None, data: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(data, indent=2, default=str) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("checks", help="environment and CUDA path checks")
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="tiny sizes")
    p.add_argument("--json")
    p = sub.add_parser("mfu", help="median tokens/s and MFU of a run dir's metrics.jsonl after warm-up")
    p.add_argument("run_dir")
    p.add_argument("--warmup", type=int, default=5, help="logged steps to drop (at least 10%% of them are)")
    p.add_argument("--target", type=float, default=0.45)
    p.add_argument("--checks-json", help="the checks' JSON, for the probed bf16 peak")
    p.add_argument("--json")
    p = sub.add_parser("decode", help="lmforge vs transformers greedy decoding on the device")
    p.add_argument("run_dir")
    p.add_argument("--device", default="cuda")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch-sizes", type=lambda s: [int(b) for b in s.split(",")], default=[1, 16])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json")
    p = sub.add_parser("dist-train", help="lmforge.cli ARGS with the process group on for one process")
    p.add_argument("--json")
    p.add_argument("cli", nargs=argparse.REMAINDER)
    p = sub.add_parser("losses-match", help="two run dirs logged the same step losses")
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.add_argument("--tol", type=float, default=2e-3)
    p.add_argument("--json")
    p = sub.add_parser("collect", help="results.json from gpu.sh's work folder")
    p.add_argument("work")
    p.add_argument("--json", required=True)
    p.add_argument("--mode", default="gpu")
    p.add_argument("--budget", type=float, default=0)
    p.add_argument("--elapsed", type=float, default=0)
    p.add_argument("--print", action="store_true", help="also print a summary")
    args = parser.parse_args()
    if args.command not in ("collect", "losses-match"):
        global torch, F
        import torch
        import torch.nn.functional as F
    commands = {
        "checks": cmd_checks,
        "mfu": cmd_mfu,
        "decode": cmd_decode,
        "dist-train": cmd_dist_train,
        "losses-match": cmd_losses_match,
        "collect": cmd_collect,
    }
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
