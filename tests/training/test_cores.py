"""threads=auto: each dvae training process on a machine takes its share of the cores (dvae/training/cores.py)."""

import os
import subprocess
import sys

import pytest
import torch

from dvae.training.config_checks import validate_config
from dvae.training.cores import CoreShare


@pytest.fixture
def sleeper():
    """A live process that is not this one, to stand for another training job."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process.pid
    process.kill()
    process.wait()


def test_the_share_counts_live_jobs_and_forgets_ended_ones(tmp_path, sleeper):
    share = CoreShare(cores=8, folder=tmp_path)
    share.register()
    try:
        share.update()
        assert share.threads == 8 and torch.get_num_threads() == 8
        (tmp_path / str(sleeper)).write_text("")  # another job starts
        (tmp_path / "999999999").write_text("")  # a job that ended without unregistering (killed)
        (tmp_path / "notes.txt").write_text("")  # not an entry
        assert share.update() == (4, 2)
        assert torch.get_num_threads() == 4
        assert not (tmp_path / "999999999").exists()  # the ended job's entry is removed
        (tmp_path / str(sleeper)).unlink()  # the other job ends
        assert share.update() == (8, 1)
    finally:
        share.unregister()
    assert torch.get_num_threads() == share.threads_before and not (tmp_path / str(os.getpid())).exists()


def test_a_reused_pid_is_not_taken_for_the_job_that_registered_it(tmp_path, sleeper):
    share = CoreShare(cores=4, folder=tmp_path)
    share.register()
    try:
        (tmp_path / str(sleeper)).write_text("1")  # that pid, but started at another time
        share.update()
        assert share.live_jobs() == 1
    finally:
        share.unregister()


def test_a_folder_others_can_write_to_is_not_used(tmp_path):
    """Another user could list fake jobs in a folder they can write to: such a folder (or a link) is
    refused with a warning, and torch keeps its threads."""
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    for folder in (shared, link):
        share = CoreShare(folder=folder, cores=8)
        threads = torch.get_num_threads()
        with pytest.warns(UserWarning, match="could not list this process"):
            assert share.register() is False
        assert share.update() is None and torch.get_num_threads() == threads
        share.unregister()
        assert not any(folder.iterdir())


def test_fixed_threads_are_set_where_training_runs():
    """threads=N: set when fit starts (in each rank's own process), not before the launcher starts them."""
    from types import SimpleNamespace

    from dvae.training.callbacks import ShareCores

    before = torch.get_num_threads()
    try:
        ShareCores(1).on_fit_start(SimpleNamespace(is_global_zero=True), None)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_child_process_takes_its_share(tmp_path):
    """What a sweep job does: another job is registered, the child starts and takes half of 4 cores."""
    share = CoreShare(cores=4, folder=tmp_path)
    share.register()
    try:
        code = ("import torch; from dvae.training.cores import CoreShare; s = CoreShare(cores=4); s.register(); "
                "s.update(); print(torch.get_num_threads(), s.live_jobs())")
        env = {**os.environ, "DVAE_JOBS_DIR": str(tmp_path)}
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    finally:
        share.unregister()
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["2", "2"]


@pytest.mark.parametrize("value", [0, -2, "many", 1.5, True])
def test_threads_must_be_auto_or_a_positive_whole_number(fast_config, value):
    from dvae.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^threads=.* must be auto .* or a whole number of at least 1\.$"):
        validate_config(fast_config(f"threads={value}"))


def test_threads_accepts_auto_and_a_number(fast_config):
    validate_config(fast_config("threads=auto"))
    validate_config(fast_config("threads=1"))
