"""Two processes on the CPU: ddp_spawn in-process, the real ddp launcher through `dvae-train` in a
subprocess (never inside pytest: it re-executes its command line). The validation metrics that the two
ranks synchronise must equal a one-process evaluation of the same weights on the same validation set,
so no sample is counted twice or dropped. GPU strategies and precisions are marked `gpu`."""

import json
import os
from pathlib import Path

import lightning as L
import pytest
import torch

from dvae.data.datamodule import build_datamodule
from dvae.errors import ConfigError
from dvae.training.config_checks import validate_config
from dvae.training.module import DVAELightning
from dvae.training.run import train
from tests.conftest import FAST, run_cli

# 16 validation crops: 8 per rank; an odd count (17) checks that no padding sneaks in.
TWO_PROCESSES = [*FAST, "data.crop_size=16", "data.val_samples=17", "trainer.accelerator=cpu",
                 "trainer.devices=2", "data.batch_size=8", "trainer.max_steps=3", "trainer.val_check_interval=3"]
SYNCED = ("psnr", "psnr_mean_color", "psnr_edges", "bits_per_dim", "perplexity", "codes_used_fraction")


def one_process_evaluation(run_dir: Path) -> dict[str, float]:
    """The run's final weights validated by a single process on the run's validation set."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run_dir / "config.yaml")
    module = DVAELightning.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt", map_location="cpu")
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False)
    final = trainer.validate(module, datamodule=build_datamodule(cfg.data, seed=cfg.seed), verbose=False)[0]
    return {key.removeprefix("val/"): value for key, value in final.items()}


def assert_synchronised_metrics_equal_one_process(run_dir: Path) -> None:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    single = one_process_evaluation(run_dir)
    assert metrics["val_images"] == single["images"] == 17
    for key in SYNCED:
        assert metrics[key] == pytest.approx(single[key], rel=1e-5, abs=1e-5), key


@pytest.mark.slow
def test_ddp_spawn_with_two_processes(fast_config, tmp_path, monkeypatch):
    monkeypatch.setenv("DVAE_JOBS_DIR", str(tmp_path / "jobs"))
    train(fast_config(*TWO_PROCESSES[len(FAST):], "strategy=ddp_spawn"), tmp_path / "run")
    assert_synchronised_metrics_equal_one_process(tmp_path / "run")
    # threads=auto: each spawned rank listed itself (not the parent that built the callback)
    ranks = [int(entry.name) for entry in (tmp_path / "jobs").iterdir()]
    assert len(ranks) == 2 and os.getpid() not in ranks


@pytest.mark.slow
def test_the_ddp_launcher_through_dvae_train(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(*TWO_PROCESSES, "strategy=ddp", f"hydra.run.dir={run_dir}", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_synchronised_metrics_equal_one_process(run_dir)
    assert not list(tmp_path.glob("outputs")), "a rank wrote its own Hydra run directory"


def test_the_global_batch_must_split_over_the_processes(fast_config):
    with pytest.raises(ConfigError, match=r"data.batch_size=9 is the global batch .* 2 processes"):
        validate_config(fast_config("trainer.devices=2", "data.batch_size=9"))
    with pytest.raises(ConfigError, match="4 processes"):
        validate_config(fast_config("trainer.devices=2", "trainer.num_nodes=2", "data.batch_size=6"))
    validate_config(fast_config("trainer.devices=2", "data.batch_size=8"))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("overrides", [
    ["strategy=fsdp"],
    ["precision=bf16-mixed"],
    ["strategy=deepspeed", "precision=bf16-mixed"],
], ids=["fsdp", "bf16", "deepspeed"])
def test_gpu_strategies_and_precisions(fast_config, tmp_path, overrides):
    if "strategy=deepspeed" in overrides:
        pytest.importorskip("deepspeed")
    train(fast_config("trainer.accelerator=gpu", "trainer.devices=1", *overrides), tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["psnr"] > 0
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()  # a directory under deepspeed
