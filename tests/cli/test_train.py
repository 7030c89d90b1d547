"""dvae-train: its refusals (every mistake is one sentence and exit 2 before training, and a refused command
leaves the run directory byte-for-byte as it was; in-process through `main()`, the command's entry function,
wherever possible), then the installed command end to end in a subprocess."""

import csv
import json
import sys
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from PIL import Image

from dvae.cli.train import main
from dvae.errors import ConfigError
from dvae.training.resume import resolve_resume
from dvae.training.run import train
from dvae.training.run_dir import check_new_run_dir
from tests.conftest import FAST, compose_config, run_cli

# Hydra's logging setup would add handlers to the test process's root logger.
NO_LOGGING = ["hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]


@pytest.fixture
def cli(monkeypatch, capsys):
    """dvae-train in-process: (exit status, stderr) of `main()` with the given arguments (and FAST's, so that a
    check that failed to refuse would train for seconds, not hours)."""

    def run(*args, fast=True):
        monkeypatch.setattr(sys, "argv", ["dvae-train", *(FAST if fast else []), *args, *NO_LOGGING])
        try:
            main()
            code = 0
        except SystemExit as stop:
            code = stop.code
        finally:
            GlobalHydra.instance().clear()
            HydraConfig.instance().cfg = None
        return code, capsys.readouterr().err

    return run


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_one_sentence(err: str, *names: str) -> None:
    assert err.startswith("dvae-train: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for name in names:
        assert name in err, err


def earlier_run(root: Path) -> Path:
    """What an earlier run left in its directory (enough for every check that comes before training)."""
    run = root / "existing"
    (run / "checkpoints").mkdir(parents=True)
    (run / ".hydra").mkdir()
    (run / "images").mkdir()
    (run / "logs").mkdir()
    OmegaConf.save(compose_config(FAST), run / "config.yaml", resolve=True)
    (run / ".hydra" / "config.yaml").write_text("seed: 0\n")
    torch.save({"global_step": 2, "state_dict": {"w": torch.ones(4096)}}, run / "checkpoints" / "last.ckpt")
    (run / "checkpoints" / "best.ckpt").write_bytes(b"best weights of the earlier run")
    (run / "metrics.json").write_text('{"psnr": 20.0}\n')
    (run / "logs" / "metrics.csv").write_text("step,train/loss\n1,0.5\n")
    (run / "images" / "val_step_000002.png").write_bytes(b"png")
    (run / "train.log").write_text("")
    return run


# --- bad values: one sentence naming the key, before anything is written ---------------------------------

@pytest.mark.parametrize("override, key", [
    ("optim.lr=-1", "optim.lr=-1"),
    ("seed=abc", "seed='abc'"),
    ("trainer.val_check_interval=0", "trainer.val_check_interval=0"),
    ("temperature.end=0", "temperature.end=0"),
    ("kl_weight.end=-1", "kl_weight.end=-1"),
    ("codebook.entropy_weight=-1", "codebook.entropy_weight=-1"),
    ("ema.decay=1.5", "ema.decay=1.5"),
    ("ema.decay=1", "ema.decay=1"),
    ("trainer.max_steps=abc", "trainer.max_steps='abc'"),
    ("optim.lr=nan", "optim.lr=nan"),
    ("optim.betas=[0.9]", "optim.betas=[0.9]"),
    ("trainer.devices=two", "trainer.devices='two'"),
    ("optim.steps=${nowhere}", "optim.steps"),
    ("overwrite_run_dir=maybe", "overwrite_run_dir='maybe'"),
])
def test_a_bad_value_is_one_sentence_naming_the_key_and_nothing_is_written(cli, tmp_path, override, key):
    code, err = cli(override, f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2
    assert_one_sentence(err, key)
    assert "schedule" not in err  # trainer.max_steps=abc used to be blamed on the schedules' steps
    assert not (tmp_path / "run" / "config.yaml").exists() and not (tmp_path / "run" / "checkpoints").exists()


# --- Hydra's own errors: its text, then the nearest key or option, exit 2 -----------------------------------

@pytest.mark.parametrize("override, hydra_text, sentence", [
    ("foo=1", "Key 'foo' is not in struct", "foo is not a key of the config; dvae-train --cfg job lists every key."),
    ("data.batchsize=8", "Key 'batchsize' is not in struct",
     "data.batchsize is not a key of the config; did you mean data.batch_size?"),
    ("optim.learning_rte=1", "Could not override 'optim.learning_rte'", "did you mean optim.lr"),
    ("model=tinny", "Could not find 'model/tinny'", "model=tinny is not an option of model; did you mean model=tiny?"),
    ("model=nope", "Available options in 'model'",
     "model=nope is not an option of model; use one of dalle, small, tiny."),
    ("trainer.sync_batchnorm=true", "Key 'sync_batchnorm' is not in struct",
     "trainer.sync_batchnorm is a Lightning Trainer argument that the config does not list; pass it with "
     "+trainer.sync_batchnorm=VALUE"),
])
def test_hydra_errors_keep_hydras_text_and_exit_2_with_a_suggestion(cli, tmp_path, override, hydra_text, sentence):
    code, err = cli(override, f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2, err
    assert hydra_text in err and "Traceback" not in err
    last = err.rstrip("\n").splitlines()[-1]
    assert last.startswith("dvae-train: error: ") and sentence in last, err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_the_command_exits_2_for_an_unknown_key(tmp_path):
    result = run_cli("data.batchsize=8", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "did you mean data.batch_size?" in result.stderr and "Traceback" not in result.stderr


# --- the run directory -------------------------------------------------------------------------------------

def test_a_new_run_in_a_directory_that_holds_a_run_is_refused_and_changes_nothing(cli, tmp_path):
    run = earlier_run(tmp_path)
    before = snapshot(run)
    code, err = cli(f"hydra.run.dir={run}")
    assert code == 2
    assert_one_sentence(err, str(run), f"resume={run}", "overwrite_run_dir=true")
    assert snapshot(run) == before  # Hydra's own .hydra/ too: the check runs before Hydra writes there
    with pytest.raises(ConfigError, match="already holds files"):
        train(compose_config(FAST), run)
    assert snapshot(run) == before


def test_a_directory_left_by_a_refused_command_is_not_taken(cli, tmp_path):
    """A refused command leaves Hydra's .hydra/ (and job log): running the corrected command there works."""
    run = tmp_path / "run"
    assert cli("optim.lr=-1", f"hydra.run.dir={run}")[0] == 2
    assert (run / ".hydra").is_dir()
    code, err = cli("seed=-1", f"hydra.run.dir={run}")
    assert code == 2 and "seed=-1" in err and "already holds" not in err, err


def test_hydras_own_files_do_not_make_a_directory_taken(tmp_path):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / "train.log").write_text("")
    check_new_run_dir(compose_config(), tmp_path, {".hydra", "train.log"})
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"already holds files \(notes.txt\)"):
        check_new_run_dir(compose_config(), tmp_path, {".hydra", "train.log"})
    check_new_run_dir(compose_config(["resume=auto"]), tmp_path)  # a requeued SLURM job continues or starts


@pytest.mark.slow
def test_overwrite_run_dir_replaces_the_earlier_run_and_keeps_other_files(fast_config, tmp_path):
    run = earlier_run(tmp_path)
    (run / "notes.txt").write_text("the user's own file")
    train(fast_config("overwrite_run_dir=true", "data=shapes", "data.crop_size=16", "trainer.max_steps=2"), run)
    assert (run / "notes.txt").read_text() == "the user's own file"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]  # no best-v1
    assert torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)["global_step"] == 2
    assert not (run / "images" / "val_step_000002.png").read_bytes() == b"png"
    assert "overwrite_run_dir: true" in (run / "config.yaml").read_text()


@pytest.mark.parametrize("blocked", ["file", "below a file", "unwritable"])
def test_a_run_directory_blocked_by_a_file_is_one_sentence(cli, tmp_path, blocked):
    blocker = tmp_path / "a-file"
    blocker.write_text("the user's file")
    # /sys refuses new directories even to root, who may write anywhere else
    run_dir = {"file": blocker, "below a file": blocker / "run", "unwritable": Path("/sys/dvae-run")}[blocked]
    if blocked == "unwritable" and not Path("/sys").is_dir():
        pytest.skip("needs Linux's /sys")
    code, err = cli(f"hydra.run.dir={run_dir}")
    assert code == 2
    assert_one_sentence(err, "cannot be written", "hydra.run.dir")
    assert blocker.read_text() == "the user's file"


# --- resume: every check before the first write ------------------------------------------------------------

def damage(run: Path, how: str) -> None:
    last, config = run / "checkpoints" / "last.ckpt", run / "config.yaml"
    if how == "truncated last.ckpt":
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    elif how == "empty last.ckpt":
        last.write_bytes(b"")
    elif how == "config.yaml not YAML":
        config.write_text("data: [photos,\n  model: {")
    elif how == "config.yaml a list":
        config.write_text("- 1\n- 2\n")
    elif how == "config.yaml lacks optim":
        text = config.read_text()
        start = text.index("\noptim:") + 1
        end = text.index("\ntemperature:") + 1
        config.write_text(text[:start] + text[end:])


@pytest.mark.parametrize("args, how, named", [
    (["data.batch_size=16"], None, "data.batch_size=16"),
    (["trainer.devices=2"], None, "trainer.devices=2"),
    ([], "truncated last.ckpt", "last.ckpt"),
    ([], "empty last.ckpt", "last.ckpt"),
    ([], "config.yaml not YAML", "config.yaml"),
    ([], "config.yaml a list", "config.yaml"),
    ([], "config.yaml lacks optim", "its config.yaml has no"),
])
def test_a_refused_resume_changes_nothing_in_the_run(cli, tmp_path, args, how, named):
    run = earlier_run(tmp_path)
    damage(run, how)
    before = snapshot(run)
    code, err = cli(f"resume={run}", *args, f"hydra.run.dir={tmp_path / 'invocation'}", fast=False)
    assert code == 2
    assert_one_sentence(err, named)
    assert snapshot(run) == before
    if how is None:  # the plain command still works on the untouched run (it is only checked here)
        cfg, _, checkpoint = resolve_resume(compose_config([f"resume={run}"]), tmp_path, [f"resume={run}"])
        assert cfg.data.batch_size == 8 and checkpoint == run / "checkpoints" / "last.ckpt"


def test_resume_auto_with_another_batch_size_is_refused_before_writing(cli, tmp_path):
    run = earlier_run(tmp_path)
    before = snapshot(run)
    code, err = cli("resume=auto", "data.batch_size=16", f"hydra.run.dir={run}", fast=False)
    assert code == 2
    assert_one_sentence(err, "data.batch_size=16", "resume=auto")
    assert snapshot(run) == before


# --- the installed command end to end ------------------------------------------------------------------

METRIC_KEYS = {"psnr", "psnr_mean_color", "ssim", "bits_per_dim", "perplexity", "codes_used_fraction",
               "steps", "wall_seconds", "gain", "healthy"}


def check_run_dir(run_dir: Path, steps: int):
    assert (run_dir / "config.yaml").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert METRIC_KEYS <= metrics.keys()
    assert metrics["steps"] == steps
    assert 0 < metrics["codes_used_fraction"] <= 1 and metrics["perplexity"] >= 1
    assert -1 <= metrics["ssim"] <= 1
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    assert metrics["gain"] == pytest.approx(metrics["psnr"] - metrics["psnr_mean_color"])
    grids = sorted((run_dir / "images").glob("val_step_*.png"))
    assert grids, "no reconstruction grid was written"
    assert [p.name.replace("usage", "val") for p in sorted((run_dir / "images").glob("usage_step_*.png"))] == \
        [p.name for p in grids], "each validation grid has its usage histogram"
    with Image.open(grids[-1]) as image:
        assert image.mode == "RGB" and image.height > 2 * 16
    return metrics


@pytest.mark.slow
@pytest.mark.parametrize("data", ["photos", "shapes"])
def test_cli_trains_and_writes_the_run_directory(data, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(f"data={data}", *FAST, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = check_run_dir(run_dir, steps=4)
    assert metrics["bits_per_dim"] > 0
    assert str(run_dir) in result.stdout.replace("\n", "")  # the summary names the run directory
    assert "psnr" in result.stdout
    assert "dvae-train: the run is " in result.stderr  # healthy or not, in one sentence
    rows = list(csv.DictReader(open(run_dir / "logs" / "metrics.csv")))
    logged = {k for row in rows for k, v in row.items() if v}
    assert {"train/loss", "train/nll", "train/kl", "train/tau", "train/beta", "train/scale",
            "train/lr", "val/psnr", "val/psnr_mean_color", "val/ssim", "val/bits_per_dim",
            "val/perplexity", "val/codes_used_fraction", "train/codes_used", "train/perplexity",
            "val/training_seconds"} <= logged
    assert "dvae-train: one dvae training process on this machine's" in result.stderr  # threads=auto says so
    # nothing that is not about this run: no product tips, no notes on Lightning's own defaults, no warnings
    for noise in ("Tip:", "weights_only", "Warning", "warn("):
        assert noise not in result.stdout + result.stderr, noise


@pytest.mark.slow
@pytest.mark.parametrize("args, key", [
    (["data=imagenet3000"], "data"),
    (["scale=constant", "scale.value=-1"], "scale.value=-1"),
    (["data.crop_size=30"], "data.crop_size=30"),
])
def test_cli_bad_input_exits_nonzero_with_a_sentence(args, key, tmp_path):
    result = run_cli(*args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    assert key in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_cli_help_lists_groups_and_options(tmp_path):
    result = run_cli("--help", cwd=tmp_path, timeout=60)
    assert result.returncode == 0
    for line in ("data: celeba, cifar10, folder, imagenet, mnist, photos, shapes, webdataset",
                 "scale: constant, cosine, exponential, learned, linear",
                 "strategy: auto, ddp, ddp_spawn, deepspeed, fsdp, slurm, torchrun", "logger: csv, tensorboard, wandb"):
        assert line in result.stdout


@pytest.mark.slow
def test_cli_sweeps_the_scale_value(tmp_path):
    """`-m scale.value=A,B` runs one fixed-scale job per value (scale=constant is implied)."""
    sweep = tmp_path / "sweep"
    result = run_cli("-m", "scale.value=0.05,0.2", "data=shapes", *FAST, "trainer.max_steps=2",
                     f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for job, value in (("0", 0.05), ("1", 0.2)):
        config = (sweep / job / "config.yaml").read_text()
        assert "mode: constant" in config and f"value: {value}" in config
        assert json.loads((sweep / job / "metrics.json").read_text())["steps"] == 2


