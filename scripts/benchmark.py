"""Measure dvae on this machine: the loss against the seed's, training-step throughput, FLOP/s against the
machine's matmul peak, peak memory per step, and encode throughput. Every figure is measured in the run
that prints it (medians over repeats after warm-up; comparisons side by side in one process).

    python scripts/benchmark.py                       # CPU: prints a markdown table, writes benchmark.json
    python scripts/benchmark.py --quick               # a short smoke run
    python scripts/benchmark.py --device cuda --model dalle --size 256 --precision bf16-mixed
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

from dvae.losses import logit_laplace_nll, logit_laplace_nll_mean


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int, device: str = "cpu") -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --- 1. the loss ----------------------------------------------------------------------------------------------


def seed_loss(x, mu, scale):
    """The seed note's formulation (a clamp, torch's Laplace, a mean); no Jacobian terms."""
    return -torch.distributions.Laplace(mu, scale).log_prob(torch.logit(x.clamp(1e-7, 1 - 1e-7))).mean()


def bench_loss(repeats: int, warmup: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(32, 3, 64, 64, generator=g)
    mu = torch.randn(32, 3, 64, 64, generator=g).requires_grad_()
    log_b = torch.tensor(0.1).log().requires_grad_()  # the seed's fixed scale b = 0.1
    variants = {
        "seed": lambda: seed_loss(x, mu, log_b.exp()).backward(),
        "eager": lambda: logit_laplace_nll(x, mu, log_b).mean().backward(),
        "fused": lambda: logit_laplace_nll_mean(x, mu, log_b, fused=True).backward(),
    }
    start = time.perf_counter()
    variants["fused"]()
    compile_seconds = time.perf_counter() - start
    times = {name: median_seconds(fn, repeats, warmup) for name, fn in variants.items()}
    # the same function: fused against a float64 evaluation of the density
    value = logit_laplace_nll_mean(x, mu, log_b, fused=True)
    reference = logit_laplace_nll(x.double(), mu.double(), log_b.double()).mean()
    return {"batch": [32, 3, 64, 64], "ms": {k: v * 1e3 for k, v in times.items()},
            "speedup_fused_vs_seed": times["seed"] / times["fused"],
            "speedup_eager_vs_seed": times["seed"] / times["eager"],
            "fused_compile_seconds": compile_seconds,
            "fused_vs_float64_abs_diff": abs(value.item() - reference.item())}


# --- 2, 3. training steps, FLOPs, the matmul peak ----------------------------------------------------------------


def matmul_peak_gflops(device: str, dtype: torch.dtype, n: int, repeats: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = median_seconds(lambda: torch.mm(a, b), repeats, 2, device)
    return 2 * n**3 / seconds / 1e9


def build(model: str, size: int, device: str, precision: str, K: int | None = None, batch: int | None = None):
    """(module, optimizer, datamodule) as dvae-train builds them, for `model` at `size` px."""
    from hydra import compose, initialize_config_module

    from dvae.data import build_datamodule
    from dvae.train import build_module

    overrides = [f"model={model}", f"data.crop_size={size}", f"precision={precision}"]
    if K is not None:
        overrides.append(f"model.K={K}")
    if batch is not None:
        overrides.append(f"data.batch_size={batch}")
    with initialize_config_module(config_module="dvae.configs", version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    module = build_module(cfg).to(device)
    module.setup("fit")  # the training layout (channels_last) that dvae-train uses
    optimizer = module.configure_optimizers()["optimizer"]
    datamodule = build_datamodule(cfg.data, seed=0)
    return module, optimizer, datamodule


def autocast(device: str, precision: str):
    if precision.startswith("bf16"):
        return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_step(module, optimizer, device: str, precision: str):
    """One update exactly as DVAELightning.training_step + Lightning's optimisation do it."""
    module.train()

    def step(batch):
        batch = module.on_after_batch_transfer(batch, 0)  # the layout dvae-train gives the batch
        with autocast(device, precision):
            out = module.model(batch, 1.0)
            rec, kl, _ = module.elbo_terms(module.model, batch, out.logits, out.mu, out.log_scale)
            loss = rec + kl
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        module.ema.update_parameters(module.model)

    return step


def flops_per_step(step, batch) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step(batch)
    return counter.get_total_flops()


def bench_training(model: str, size: int, device: str, precision: str, repeats: int, warmup: int,
                   peak_gflops: float) -> dict:
    module, optimizer, datamodule = build(model, size, device, precision)
    step = make_step(module, optimizer, device, precision)
    loader = iter(datamodule.train_dataloader())
    preloaded = next(loader).to(device)
    batch_size = preloaded.shape[0]

    def real_data_step():
        step(next(loader).to(device, non_blocking=True))

    flops = flops_per_step(step, preloaded)
    # side by side: alternate the two so drift on a shared machine hits both alike
    preloaded_times, real_times = [], []
    for _ in range(warmup):
        step(preloaded)
        real_data_step()
    for _ in range(repeats):
        preloaded_times.append(median_seconds(lambda: step(preloaded), 1, 0, device))
        real_times.append(median_seconds(real_data_step, 1, 0, device))
    preloaded_s, real_s = statistics.median(preloaded_times), statistics.median(real_times)
    achieved = flops / preloaded_s / 1e9
    return {"model": model, "size": size, "batch": batch_size, "data": datamodule.source,
            "images_per_s_preloaded": batch_size / preloaded_s, "images_per_s_real_data": batch_size / real_s,
            "real_data_over_preloaded_time": real_s / preloaded_s, "gflop_per_step": flops / 1e9,
            "achieved_gflops": achieved, "fraction_of_matmul_peak": achieved / peak_gflops}


# --- 4. peak memory ----------------------------------------------------------------------------------------------


def memory_child(model: str, size: int, K: int, batch: int, device: str, precision: str) -> dict:
    """Runs in a child process: memory before the first update and at its peak."""
    module, optimizer, _ = build(model, size, device, precision, K=K, batch=batch)
    step = make_step(module, optimizer, device, precision)
    images = torch.rand(batch, 3, size, size, device=device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(images)
        return {"before_mb": before / 2**20, "peak_mb": torch.cuda.max_memory_allocated() / 2**20}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    step(images)
    return {"before_mb": before, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def bench_memory(model: str, size: int, batch: int, device: str, precision: str) -> list[dict]:
    rows = []
    for K in (512, 8192):
        args = [sys.executable, __file__, "--memory-child", model, str(size), str(K), str(batch), device, precision]
        result = subprocess.run(args, capture_output=True, text=True, check=True)
        child = json.loads(result.stdout.strip().splitlines()[-1])
        h = size // 2 ** ({"tiny": 2, "small": 3, "dalle": 3}.get(model, 3))
        relaxed_mb = batch * K * h * h * 4 / 2**20
        rows.append({"K": K, "model": model, "size": size, "batch": batch, **child,
                     "step_mb": child["peak_mb"] - child["before_mb"], "one_relaxed_one_hot_mb": relaxed_mb})
    return rows


# --- 5. encode ----------------------------------------------------------------------------------------------------


def bench_encode(model: str, size: int, batch: int, device: str, repeats: int, warmup: int) -> dict:
    module, _, _ = build(model, size, device, "32")
    module.teardown("fit")  # the export path: the NCHW model that DVAE.from_pretrained gives
    dvae = module.ema_model.eval()
    images = torch.rand(batch, 3, size, size, device=device)
    with torch.no_grad():
        seconds = median_seconds(lambda: dvae.encode(images), repeats, warmup, device)
    return {"model": model, "size": size, "batch": batch, "images_per_s": batch / seconds}


# --- the report ---------------------------------------------------------------------------------------------------


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name}, {torch.get_num_threads()} threads"


def markdown(result: dict) -> str:
    lines = [f"dvae benchmark, {result['date']}, {result['machine']}, torch {result['torch']}", ""]
    loss = result.get("loss")
    if loss:
        lines += ["| loss fwd+bwd, 32x3x64x64 | ms (median) | vs seed |", "| --- | ---: | ---: |"]
        for name, ms in loss["ms"].items():
            lines.append(f"| {name} | {ms:.2f} | {loss['ms']['seed'] / ms:.2f}x |")
        lines += [f"| fused compile time | {loss['fused_compile_seconds']:.1f} s | |", ""]
    lines += [f"matmul peak ({result['peak']['dtype']}, n={result['peak']['n']}): "
              f"{result['peak']['gflops']:.1f} GFLOP/s", "",
              "| model | px | batch | img/s preloaded | img/s real data | real/preloaded time | GFLOP/step "
              "| GFLOP/s | of matmul peak |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in result["training"]:
        lines.append(f"| {row['model']} | {row['size']} | {row['batch']} | {row['images_per_s_preloaded']:.1f} | "
                     f"{row['images_per_s_real_data']:.1f} | {row['real_data_over_preloaded_time']:.2f} | "
                     f"{row['gflop_per_step']:.2f} | {row['achieved_gflops']:.1f} | "
                     f"{100 * row['fraction_of_matmul_peak']:.0f}% |")
    lines += ["", "| K | model | px | batch | peak MB | MB added by one step | one B x K x h x w float tensor, MB |",
              "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in result["memory"]:
        lines.append(f"| {row['K']} | {row['model']} | {row['size']} | {row['batch']} | {row['peak_mb']:.0f} | "
                     f"{row['step_mb']:.0f} | {row['one_relaxed_one_hot_mb']:.0f} |")
    enc = result["encode"]
    lines += ["", f"encode: {enc['images_per_s']:.0f} images/s ({enc['model']}, {enc['size']} px, "
              f"batch {enc['batch']})"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats, small models only: a smoke run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=None, help="one model instead of tiny and small (e.g. dalle on a GPU)")
    parser.add_argument("--size", type=int, default=None, help="crop size for --model")
    parser.add_argument("--precision", default="32", choices=["32", "bf16-mixed"])
    parser.add_argument("--out", default="benchmark.json")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU and none is available.")
    repeats, warmup = (3, 1) if args.quick else (15, 3)
    result = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(args.device),
              "torch": torch.__version__, "device": args.device, "precision": args.precision, "quick": args.quick}
    if args.device == "cpu":
        result["loss"] = bench_loss(repeats * 2, warmup)
    dtype = torch.bfloat16 if args.precision == "bf16-mixed" else torch.float32
    n = 1024 if args.quick else (8192 if args.device.startswith("cuda") else 2048)
    result["peak"] = {"dtype": str(dtype).removeprefix("torch."), "n": n,
                      "gflops": matmul_peak_gflops(args.device, dtype, n, repeats)}
    if args.model:
        configs = [(args.model, args.size or 256)]
    else:
        configs = [("tiny", 32), ("tiny", 64), ("small", 32), ("small", 64)]
    if args.quick and not args.model:
        configs = [("tiny", 32)]
    result["training"] = [bench_training(m, s, args.device, args.precision, repeats, warmup, result["peak"]["gflops"])
                          for m, s in configs]
    memory_model, memory_size = (args.model, args.size or 256) if args.model else ("small", 64)
    result["memory"] = bench_memory(memory_model, memory_size, 8 if args.quick else 32, args.device, args.precision)
    result["encode"] = bench_encode(configs[0][0], 64 if not args.model else memory_size, 64 if not args.model else 8,
                                    args.device, repeats, warmup)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(f"\nwritten: {args.out}")
    return result


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-child":
        model, size, K, batch, device, precision = sys.argv[2:8]
        print(json.dumps(memory_child(model, int(size), int(K), int(batch), device, precision)))
    else:
        main()
