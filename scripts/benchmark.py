"""Speed and memory of dVAE training, measured side by side in one process: prints a markdown table
and writes benchmark.json. Every figure is a median over repeats after warm-up, measured in this run.

    .venv/bin/python scripts/benchmark.py                  # CPU: the five measurements (about 2 minutes)
    .venv/bin/python scripts/benchmark.py --quick          # a smoke run with every key (well under a minute)
    .venv/bin/python scripts/benchmark.py --compile        # also the training step under torch.compile
    .venv/bin/python scripts/benchmark.py --device cuda --model dalle --size 256 --precision bf16-mixed

1. the logit-Laplace NLL, forward + backward, against the seed's formulation (32x3x64x64, float32, CPU);
2. training steps per second as dvae-train takes them (model forward, ELBO, backward, AdamW, EMA), with
   real data loading and with one preloaded batch;
3. FLOPs per training step (torch.utils.flop_counter) and achieved GFLOP/s as a fraction of the machine's
   limit: the higher of the best measured path (torch.mm, 1x1 and 3x3 convolutions, a linear layer) and the
   theoretical figure (cores x FLOPs per cycle x clock, from /proc/cpuinfo), both printed;
4. peak memory of a training step at K = 512 and K = 8192 (fused codebook, and the straightforward one at
   K = 8192): peak RSS of a child process on the CPU, max_memory_allocated on CUDA;
5. encode throughput (argmax tokens, no gradients), the export path.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import dvae  # noqa: F401  first: dvae turns on torch's huge-page allocation, which torch reads once

# isort: split
import torch
from torch.distributions import Laplace
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.flop_counter import FlopCounterMode

from dvae.losses import logit_laplace_nll

# training steps shorter than this, repeated `repeats` times, get more repeats (at most MAX_STEP_REPEATS)
MIN_STEP_SECONDS, MAX_STEP_REPEATS = 3.0, 40
PRECISIONS = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def compose_config(overrides: list[str]):
    from hydra import compose, initialize_config_module  # here, and Lightning below: a refused run exits fast

    with initialize_config_module(config_module="dvae.configs", version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, repeats: int, warmup: int, device: str = "cpu") -> float:
    """Median wall time of fn() over `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(fns: dict, repeats: int, warmup: int, device: str = "cpu") -> dict[str, float]:
    """Median seconds of each fn, the calls taken in turn so that load from elsewhere hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


class Timed:
    """A callable of known FLOPs."""

    flops: int

    def gflops(self, seconds: float) -> float:
        return self.flops / seconds / 1e9


class Matmul(Timed):
    """An n x n by n x n torch.mm: timed alongside the training steps, to see the machine's speed drift."""

    def __init__(self, device: str, dtype: torch.dtype, n: int):
        self.a, self.b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        self.flops = 2 * n**3

    def __call__(self) -> None:
        torch.mm(self.a, self.b)


class Convolution(Timed):
    """A k x k convolution of a (batch, c, h, w) input to c channels (oneDNN on a CPU, cuDNN on a GPU)."""

    def __init__(self, device: str, dtype: torch.dtype, batch: int, channels: int, size: int, kernel: int):
        self.x = torch.randn(batch, channels, size, size, device=device, dtype=dtype)
        self.w = torch.randn(channels, channels, kernel, kernel, device=device, dtype=dtype)
        self.padding = kernel // 2
        if device == "cpu":  # the layout dvae-train trains in (channels_last)
            self.x = self.x.contiguous(memory_format=torch.channels_last)
            self.w = self.w.contiguous(memory_format=torch.channels_last)
        self.flops = 2 * batch * size * size * channels * channels * kernel * kernel

    def __call__(self) -> None:
        torch.nn.functional.conv2d(self.x, self.w, padding=self.padding)


class Linear(Timed):
    """A large fully connected layer: (rows, n) x (n, n)."""

    def __init__(self, device: str, dtype: torch.dtype, rows: int, n: int):
        self.x = torch.randn(rows, n, device=device, dtype=dtype)
        self.w = torch.randn(n, n, device=device, dtype=dtype)
        self.flops = 2 * rows * n * n

    def __call__(self) -> None:
        torch.nn.functional.linear(self.x, self.w)


def measured_paths(device: str, dtype: torch.dtype, quick: bool) -> dict:
    """The ways this machine multiplies fastest, each sized to run near its best: a torch.mm, 1x1 and 3x3
    convolutions and a linear layer. A model's steps run on the same kernels, so none of them is a limit
    by itself: the limit is the best of them (or the theoretical figure, if that is higher)."""
    n = 512 if quick else 2048 if device == "cpu" else 8192
    batch, channels, size = (4, 128, 16) if quick else (32, 256, 32) if device == "cpu" else (64, 512, 64)
    return {
        f"torch.mm {n}x{n}": Matmul(device, dtype, n),
        f"1x1 convolution {channels} ch {size} px": Convolution(device, dtype, batch, channels, size, 1),
        f"3x3 convolution {channels} ch {size} px": Convolution(device, dtype, batch, channels, size, 3),
        f"linear {4 * n}x{n}": Linear(device, dtype, 4 * n, n),
    }


def cpu_flags() -> tuple[set[str], str, float | None]:
    """(/proc/cpuinfo flags, vendor, the highest clock in GHz the machine reports) on Linux."""
    flags, vendor, mhz = set(), "", []
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "flags" and not flags:
                flags = set(value.split())
            elif key == "vendor_id":
                vendor = value.strip()
            elif key == "cpu MHz":
                with contextlib.suppress(ValueError):
                    mhz.append(float(value))
    with contextlib.suppress(OSError, ValueError):  # the rated maximum, where the kernel exposes it
        mhz.append(int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) / 1000)
    return flags, vendor, (max(mhz) / 1000 if mhz else None)


def theoretical_cpu_peak(dtype: torch.dtype, cores: int, flags: set[str], vendor: str,
                         ghz: float | None, fma_units: int | None = None) -> dict | None:
    """cores x FLOPs per cycle per core x clock, from what the CPU says it has. float32: vector lanes (16
    with AVX-512, 8 with AVX2) x FMA units x 2 (an FMA is two FLOPs); FMA units are not reported by the
    CPU: 2 are assumed (1 for AVX-512 on AMD before Zen 5, which runs it on 256-bit units; 1 FMA's worth,
    a multiply and an add unit, without FMA). bfloat16: 1024 per cycle with AMX (Intel's figure for its
    tile unit in BF16), else twice the float32 lanes with AVX512-BF16. None when the clock is unknown.
    `cores` is the number of threads the benchmark runs."""
    if ghz is None:
        return None
    if dtype == torch.bfloat16 and "amx_bf16" in flags:
        per_cycle, how = 1024, "AMX-BF16 tiles: 1024 FLOPs/cycle"
    else:
        lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags or "avx" in flags else 4
        if dtype == torch.bfloat16 and "avx512_bf16" in flags:
            lanes *= 2
        if fma_units is None:
            zen4 = lanes >= 16 and vendor == "AuthenticAMD" and "avx512_vp2intersect" not in flags
            fma_units = 1 if zen4 or "fma" not in flags else 2
        per_cycle = lanes * fma_units * 2
        how = f"{lanes} lanes x {fma_units} FMA units x 2"
    return {"gflops": cores * per_cycle * ghz, "cores": cores, "ghz": ghz, "flops_per_cycle": per_cycle,
            "how": how}


def machine_limit(device: str, dtype: torch.dtype, repeats: int, quick: bool, cores: int,
                  fma_units: int | None = None) -> dict:
    """The machine's FP limit: the best measured path and the theoretical figure, the higher of the two."""
    paths = measured_paths(device, dtype, quick)
    measured = {name: path.gflops(median_seconds(path, repeats, warmup=2, device=device))
                for name, path in paths.items()}
    theory = None
    if device == "cpu":
        flags, vendor, ghz = cpu_flags()
        theory = theoretical_cpu_peak(dtype, cores, flags, vendor, ghz, fma_units)
    best = max(measured.values())
    return {"paths_gflops": measured, "best_measured_gflops": best,
            "best_measured_path": max(measured, key=measured.get), "theoretical": theory,
            "gflops": max(best, theory["gflops"] if theory else 0.0)}


def loss_benchmark(repeats: int) -> dict:
    """logit_laplace_nll forward + backward vs the seed's -Laplace(mu, b).log_prob(logit(x)).mean()."""
    shape = (32, 3, 64, 64)
    x = torch.rand(shape)
    mu = (torch.randn(shape) * 2).requires_grad_()
    log_scale = (torch.randn(shape) * 0.5 - 1).requires_grad_()

    def run(loss_fn):
        def step():
            mu.grad = log_scale.grad = None
            loss_fn().backward()
        return step

    def seed():
        return -Laplace(mu, log_scale.exp()).log_prob(torch.logit(x.clamp(1e-7, 1 - 1e-7))).mean()

    start = time.perf_counter()
    logit_laplace_nll(x, mu, log_scale, reduction="mean").backward()  # the first call compiles
    first_call = time.perf_counter() - start
    medians = interleaved_medians({
        "seed": run(seed),
        "elementwise_then_mean": run(lambda: logit_laplace_nll(x, mu, log_scale).mean()),
        "mean": run(lambda: logit_laplace_nll(x, mu, log_scale, reduction="mean")),
    }, repeats, warmup=3)
    return {
        "shape": list(shape),
        "seed_ms": 1e3 * medians["seed"],
        "elementwise_then_mean_ms": 1e3 * medians["elementwise_then_mean"],
        "mean_ms": 1e3 * medians["mean"],
        "speedup_elementwise_then_mean": medians["seed"] / medians["elementwise_then_mean"],
        "speedup_mean": medians["seed"] / medians["mean"],
        "first_call_with_compile_s": first_call,
    }


class TrainStep:
    """One dvae-train update on a fixed module: forward, ELBO (DVAELightning.elbo_terms), backward,
    AdamW and its schedule, EMA update."""

    def __init__(self, cfg, device: str, precision: str, compile_model: bool = False, fused: bool = True):
        from dvae.training.builders import build_module

        torch.manual_seed(cfg.seed)
        self.module = build_module(cfg).to(device)
        self.module.setup("fit")  # what Lightning calls before training: the channels_last layout (default)
        self.module.model.quantizer.fused = fused
        self.model = torch.compile(self.module.model) if compile_model else self.module.model
        optim = self.module.configure_optimizers()
        self.optimizer, self.scheduler = optim["optimizer"], optim["lr_scheduler"]["scheduler"]
        self.device, self.dtype = device, PRECISIONS[precision]

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device, dtype=self.dtype)

    def __call__(self, batch: torch.Tensor) -> None:
        module = self.module
        batch = module.on_after_batch_transfer(batch, 0)  # the layout dvae-train gives the batch
        with self.autocast():
            with record_function("step: forward"):
                out = self.model(batch, module.tau(0))
            with record_function("step: loss"):
                rec, kl, _ = module.elbo_terms(module.model, batch, out.logits, out.mu, out.log_scale)
                loss = rec + module.beta(0) * kl
        with record_function("step: backward"):
            loss.backward()
        with record_function("step: optimizer"):
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        with record_function("step: EMA"):
            module.ema.update_parameters(module.model)


def model_config(model: str, size: int, batch: int, extra: tuple[str, ...] = ()):
    return compose_config([f"model={model}", f"data.crop_size={size}", f"data.batch_size={batch}", *extra])


def training_benchmark(model: str, size: int, batch: int, device: str, precision: str, repeats: int,
                       matmul: Matmul, compile_model: bool, limit_gflops: float, min_seconds: float = 0.0) -> dict:
    """images/s with real data and with a preloaded batch; FLOPs per step and their fraction of the machine's
    limit (`machine_limit`, or the matmul timed in turn with the steps if that ran faster: the machine's
    speed drifts on shared hosts). Fast
    steps get more repeats, up to `min_seconds` of preloaded steps: a median of five 0.15 s steps swung
    the real/preloaded ratio by 10% on a shared machine."""
    from dvae.data.datamodule import build_datamodule

    cfg = model_config(model, size, batch)
    start = time.perf_counter()
    step = TrainStep(cfg, device, precision, compile_model)
    loader = build_datamodule(cfg.data, seed=cfg.seed).train_dataloader()
    batches = iter(loader)

    def next_batch():
        nonlocal batches
        try:
            return next(batches)
        except StopIteration:
            batches = iter(loader)
            return next(batches)

    preloaded = next_batch().to(device)
    step(preloaded)
    first_step = time.perf_counter() - start
    with FlopCounterMode(display=False) as counter:
        step(preloaded)
    flops = counter.get_total_flops()
    if min_seconds > 0:
        one_step = median_seconds(lambda: step(preloaded), repeats=1, warmup=0, device=device)
        repeats = max(repeats, min(MAX_STEP_REPEATS, math.ceil(min_seconds / one_step)))
    medians = interleaved_medians({"preloaded": lambda: step(preloaded), "real": lambda: step(next_batch().to(device)),
                                   "matmul": matmul}, repeats, warmup=1, device=device)
    preloaded_s, real_s = medians["preloaded"], medians["real"]
    achieved, peak = flops / preloaded_s / 1e9, matmul.gflops(medians["matmul"])
    return {
        "model": model, "size": size, "batch": batch, "precision": precision, "compiled": compile_model,
        "repeats": repeats,
        "images_per_s_preloaded": batch / preloaded_s, "images_per_s_real_data": batch / real_s,
        "real_over_preloaded_step_time": real_s / preloaded_s,
        "gflop_per_step": flops / 1e9, "achieved_gflops": achieved, "matmul_gflops_alongside": peak,
        "fraction_of_limit": achieved / max(limit_gflops, peak),
        "build_and_first_step_s": first_step,
    }


def profile_step(model: str, size: int, batch: int, device: str, precision: str, steps: int = 20) -> dict:
    """Where one training step's time goes (torch.profiler, after warm-up): the share of each part of the
    step (forward, loss, backward, optimizer, EMA), and the ops with the most time of their own."""
    step = TrainStep(model_config(model, size, batch), device, precision)
    images = torch.rand(batch, 3, size, size, device=device)
    for _ in range(3):
        step(images)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step(images)
        synchronize(device)
    wall = (time.perf_counter() - start) / steps
    events = prof.key_averages()
    parts = {e.key.removeprefix("step: "): e.cpu_time_total / steps / 1e6 for e in events if e.key.startswith("step: ")}
    own = sorted((e for e in events if not e.key.startswith("step: ")), key=lambda e: -e.self_cpu_time_total)
    total_own = sum(e.self_cpu_time_total for e in events) / steps / 1e6
    return {"model": model, "size": size, "batch": batch, "precision": precision, "step_ms": 1e3 * wall,
            "parts_ms": {k: 1e3 * v for k, v in parts.items()},
            "all_ops_ms": 1e3 * total_own,
            "top_ops": [{"op": e.key, "ms": e.self_cpu_time_total / steps / 1e3, "calls": e.count // steps}
                        for e in own[:15]]}


def profile_markdown(profiled: dict) -> str:
    p = profiled
    lines = [f"where a training step's time goes: {p['model']} at {p['size']} px, batch {p['batch']}, precision "
             f"{p['precision']}: {p['step_ms']:.1f} ms a step (profiled)", "",
             "| part of the step | ms | share |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {ms:.2f} | {100 * ms / p['step_ms']:.0f}% |" for name, ms in p["parts_ms"].items()]
    lines += ["", "| op (time of its own) | ms a step | calls a step |", "| --- | ---: | ---: |"]
    lines += [f"| {o['op']} | {o['ms']:.2f} | {o['calls']} |" for o in p["top_ops"]]
    return "\n".join(lines)


def encode_benchmark(model: str, size: int, batch: int, device: str, precision: str, repeats: int) -> dict:
    from dvae.training.builders import build_module

    cfg = model_config(model, size, batch)
    model_ = build_module(cfg).model.to(device).eval()
    images = torch.rand(batch, 3, size, size, device=device)
    dtype = PRECISIONS[precision]
    autocast = torch.autocast(device, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def encode():
        with torch.inference_mode(), autocast:
            model_.encode(images)

    return {"model": model, "size": size, "batch": batch,
            "images_per_s": batch / median_seconds(encode, repeats, warmup=2, device=device)}


def _proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}; the CPU memory measurement needs Linux.")


def memory_in_this_process(model: str, size: int, batch: int, K: int, fused: bool, device: str,
                           precision: str) -> dict:
    """Peak memory of one training step (the first: AdamW's state included) in a fresh process: resident
    memory on the CPU (the high-water mark is reset just before the step), allocated memory on CUDA."""
    cfg = model_config(model, size, batch, (f"model.K={K}",))
    step = TrainStep(cfg, device, precision, fused=fused)
    images = torch.rand(batch, 3, size, size, device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        baseline = _proc_status_bytes("VmRSS")
    step(images)
    synchronize(device)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _proc_status_bytes("VmHWM")
    return {"model": model, "size": size, "batch": batch, "K": K, "fused_codebook": fused,
            "before_step_mb": baseline / 2**20, "peak_mb": peak / 2**20, "step_adds_mb": (peak - baseline) / 2**20}


def peak_memory(model: str, size: int, batch: int, K: int, fused: bool, device: str, precision: str) -> dict:
    if device == "cuda":
        return memory_in_this_process(model, size, batch, K, fused, device, precision)
    args = json.dumps([model, size, batch, K, fused, device, precision])
    command = [sys.executable, __file__, "--memory-child", args, "--threads", str(torch.get_num_threads())]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"the memory measurement failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def machine(device: str) -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "device": device,
            "thp_mem_alloc_enable": os.environ.get("THP_MEM_ALLOC_ENABLE")}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def markdown(results: dict) -> str:
    m, lines = results["machine"], []
    lines.append(f"{m['date']}, {m.get('gpu', m['cpu'])}, torch {m['torch']}, {m['threads']} threads")
    for precision, limit in results["limits"].items():
        dtype = results["matmul"][precision]["dtype"]
        lines += ["", f"| the machine's limit, {dtype} (precision {precision}) | GFLOP/s |", "| --- | ---: |"]
        lines += [f"| measured: {name} | {gflops:.1f} |" for name, gflops in limit["paths_gflops"].items()]
        theory = limit["theoretical"]
        if theory:
            lines.append(f"| theoretical: {theory['cores']} cores x {theory['flops_per_cycle']} FLOPs/cycle "
                         f"({theory['how']}) x {theory['ghz']:.2f} GHz | {theory['gflops']:.1f} |")
        else:
            lines.append("| theoretical: not known here (no CPU clock, or a GPU) | - |")
        lines.append(f"| **limit: the higher of the best measured and the theoretical** | **{limit['gflops']:.1f}** |")
    if "loss" in results:
        loss = results["loss"]
        lines += ["", "| logit-Laplace NLL, forward + backward, 32x3x64x64 | ms | vs seed |", "| --- | ---: | ---: |",
                  f"| seed: -Laplace(mu, b).log_prob(logit(x)).mean() | {loss['seed_ms']:.2f} | 1.00x |",
                  f"| logit_laplace_nll(...).mean() | {loss['elementwise_then_mean_ms']:.2f} | "
                  f"{loss['speedup_elementwise_then_mean']:.2f}x |",
                  f"| logit_laplace_nll(..., reduction='mean') | {loss['mean_ms']:.2f} | {loss['speedup_mean']:.2f}x |",
                  f"\nfirst call, compilation included: {loss['first_call_with_compile_s']:.1f} s"]
    lines += ["", "| model | px | batch | precision | compiled | img/s preloaded | img/s real data "
                  "| real/preloaded time | GFLOP/step | GFLOP/s | matmul GFLOP/s alongside | of the limit |",
              "| --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results["training"]:
        lines.append(f"| {r['model']} | {r['size']} | {r['batch']} | {r['precision']} "
                     f"| {'yes' if r['compiled'] else 'no'} | {r['images_per_s_preloaded']:.1f} "
                     f"| {r['images_per_s_real_data']:.1f} "
                     f"| {r['real_over_preloaded_step_time']:.2f} | {r['gflop_per_step']:.2f} "
                     f"| {r['achieved_gflops']:.1f} | {r['matmul_gflops_alongside']:.1f} "
                     f"| {100 * r['fraction_of_limit']:.0f}% |")
        if r["fraction_of_limit"] > 1:
            lines.append("\n(above 100%: the limit is wrong on this machine; give --fma-units)")
    lines += ["", "| peak memory of a training step | K | codebook | before the step MB | peak MB | step adds MB |",
              "| --- | ---: | --- | ---: | ---: | ---: |"]
    for r in results["memory"]:
        lines.append(f"| {r['model']} {r['size']} px, batch {r['batch']} | {r['K']} "
                     f"| {'fused' if r['fused_codebook'] else 'straightforward'} | {r['before_step_mb']:.0f} "
                     f"| {r['peak_mb']:.0f} | {r['step_adds_mb']:.0f} |")
    lines += ["", "| encode (tokens, no gradients) | px | batch | images/s |", "| --- | ---: | ---: | ---: |"]
    for r in results["encode"]:
        lines.append(f"| {r['model']} | {r['size']} | {r['batch']} | {r['images_per_s']:.1f} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", action="append", help="model preset(s) (default: tiny and small)")
    parser.add_argument("--size", type=int, action="append", help="crop size(s) (default: 32 and 64)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: 32 on CPU, 8 on CUDA)")
    parser.add_argument("--precision", action="append", choices=sorted(PRECISIONS),
                        help="training precision(s) (default: 32, and bf16-mixed too on a CPU with AVX512-BF16 "
                             "or AMX); memory and encode use the first")
    parser.add_argument("--compile", action="store_true", help="also measure the step under torch.compile")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice; 1 gives steadier figures on a busy machine)")
    parser.add_argument("--fma-units", type=int, choices=(1, 2), default=None,
                        help="FMA units per core for the theoretical limit (default: 2; 1 for AVX-512 on AMD Zen 4)")
    parser.add_argument("--profile", action="store_true",
                        help="only profile one training step of the first model and size (torch.profiler)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: tiny model at 32 px unless given, batch 4, few repeats")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"timed repeats per figure (default: 5; fast training steps get more, "
                             f"up to {MIN_STEP_SECONDS:g} s)")
    parser.add_argument("--out", default="benchmark.json", help="where to write the JSON (default: %(default)s)")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU and none is available; run on the CPU without --device.")
    if "16-mixed" in (args.precision or ()) and args.device != "cuda":
        parser.error("--precision 16-mixed needs --device cuda; use bf16-mixed or 32 on the CPU.")
    return args


def default_precisions(device: str, quick: bool) -> list[str]:
    """32, and bf16-mixed beside it on a CPU that has bfloat16 instructions (not in a quick run)."""
    if device == "cpu" and not quick and cpu_flags()[0] & {"avx512_bf16", "amx_bf16"}:
        return ["32", "bf16-mixed"]
    return ["32"]


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_flush_denormal(True)  # as dvae-train does: subnormal floats are very slow on x86 CPUs
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_in_this_process(*json.loads(args.memory_child))))
        return {}
    device, quick = args.device, args.quick
    models = args.model or (["tiny"] if quick else ["tiny", "small"])
    sizes = args.size or ([32] if quick else [32, 64])
    batch = args.batch or (4 if quick else 32 if device == "cpu" else 8)
    repeats = args.repeats or (2 if quick else 5)
    precisions = args.precision or default_precisions(device, quick)
    if args.profile:
        profiled = profile_step(models[0], sizes[0], batch, device, precisions[0])
        print(profile_markdown(profiled))
        Path(args.out).write_text(json.dumps({"machine": machine(device), "profile": profiled}, indent=2) + "\n")
        return profiled
    n = 512 if quick else 2048 if device == "cpu" else 8192
    results = {"machine": machine(device), "precisions": precisions, "quick": quick, "limits": {}, "matmul": {}}
    matmuls = {}
    for precision in precisions:
        dtype = PRECISIONS[precision] or torch.float32
        matmuls[precision] = Matmul(device, dtype, n)
        results["limits"][precision] = machine_limit(device, dtype, repeats, quick, torch.get_num_threads(),
                                                     args.fma_units)
        results["matmul"][precision] = {"n": n, "dtype": str(dtype).replace("torch.", ""), "gflops": matmuls[
            precision].gflops(median_seconds(matmuls[precision], repeats, warmup=2, device=device))}
    if device == "cpu":
        results["loss"] = loss_benchmark(repeats=5 if quick else 30)
    results["training"] = [
        training_benchmark(model, size, batch, device, precision, repeats, matmuls[precision], compile_model,
                           results["limits"][precision]["gflops"], min_seconds=0.0 if quick else MIN_STEP_SECONDS)
        for model in models for size in sizes for precision in precisions
        for compile_model in ([False, True] if args.compile else [False])
    ]
    memory_model, memory_size = models[-1], max(sizes)
    results["memory"] = [
        peak_memory(memory_model, memory_size, batch, K, fused, device, precisions[0])
        for K, fused in ((512, True), (8192, True), (8192, False))
    ]
    results["encode"] = [encode_benchmark(model, max(sizes), batch, device, precisions[0], repeats)
                         for model in models]
    print(markdown(results))
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return results


if __name__ == "__main__":
    main()
