import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

ROOT = Path(__file__).resolve().parents[1]  # the checkout
FIXTURES = Path(__file__).resolve().parent / "fixtures"  # files written by earlier versions

# Tests never talk to the internet or to an account.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def scratch_folder_for(variable: str, prefix: str) -> None:
    """Point `variable` at a new temporary folder, removed when the test session's process exits."""
    if variable not in os.environ:
        folder = tempfile.mkdtemp(prefix=prefix)
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        os.environ[variable] = folder


# data=folder caches its file index under XDG_CACHE_HOME: not in the home directory of whoever runs the tests.
scratch_folder_for("XDG_CACHE_HOME", "dvae-test-cache-")
torch.set_num_threads(min(2, torch.get_num_threads()))
# threads=auto lists training processes in a per-user folder (dvae/training/cores.py): the tests' runs list
# themselves apart from any real run on this machine.
scratch_folder_for("DVAE_JOBS_DIR", "dvae-test-jobs-")

# A few-second run: small crops, few steps, a tiny validation set.
FAST = [
    "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.log_every_n_steps=1",
    "data.batch_size=8", "data.train_samples=32", "data.val_samples=16", "progress_bar=false",
    "model.n_hid=8", "model.blocks_per_group=1", "model.K=32", "model.n_init=8",
]


def compose_config(overrides=()):
    with initialize_config_module(config_module="dvae.configs", version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


@pytest.fixture
def fast_config():
    return lambda *overrides: compose_config([*FAST, *overrides])


def one_sentence_error(capsys, tool):
    """The command's stderr: one line starting with 'TOOL: error: ', no traceback."""
    error = capsys.readouterr().err
    assert error.startswith(f"{tool}: error: ") and error.count("\n") == 1 and "Traceback" not in error, error
    return error


DVAE_TRAIN = shutil.which("dvae-train", path=str(Path(sys.executable).parent)) or "dvae-train"


def run_cli(*args, cwd, timeout=240):
    """The installed dvae-train command in a subprocess (each one pays the imports: use for what needs it)."""
    env = {**os.environ, "WANDB_MODE": "offline"}
    return subprocess.run([DVAE_TRAIN, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
