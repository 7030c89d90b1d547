"""Sharing this machine's CPU cores among the dvae training processes running on it.

Every torch process starts one OpenMP thread per core. Two such processes on the same cores slow each
other far more than twice (threads wait on each other's time slices), which is what a local sweep
(`hydra/launcher=submitit_local`, or two runs started by hand) does. With `threads=auto` each training
process lists itself in a private per-user folder and takes `cores // processes` threads, re-counting as
jobs start and finish (`CoreShare.update`). POSIX only; elsewhere torch's default is left alone.
"""

from __future__ import annotations

import os
import stat
import tempfile
import warnings
from pathlib import Path

import torch

# where live training processes are listed (one file per process); a test points it elsewhere
JOBS_DIR_ENV = "DVAE_JOBS_DIR"


def available_cores() -> int:
    """The CPUs this process may run on (its affinity mask, e.g. under taskset or a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def jobs_dir() -> Path:
    if os.environ.get(JOBS_DIR_ENV):
        return Path(os.environ[JOBS_DIR_ENV])
    return Path(tempfile.gettempdir()) / f"dvae-jobs-{os.getuid()}"


def private_folder(folder: Path) -> None:
    """Create `folder` for this user only, or check that it is a real folder of this user's that nobody else
    can write to (another user could otherwise list fake jobs in it); OSError if not."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise PermissionError(f"{folder} is not a folder of this user's that only this user can write to")


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), so a reused pid is not taken for the
    registered process; '' where /proc is not there."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat_line.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name in parentheses


def _alive(pid: int, start_time: str) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists (POSIX)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists
    return not start_time or _start_time(pid) == start_time


class CoreShare:
    """This process's share of the cores: `register` (in the training process itself: under ddp_spawn that
    is each spawned rank), then `update` now and then, then `unregister` (which gives torch back the thread
    count it had). `cores` is torch's thread count at registration (physical cores, or OMP_NUM_THREADS)
    within this process's CPUs."""

    def __init__(self, folder: Path | None = None, cores: int | None = None):
        self.folder = folder or jobs_dir()
        self.fixed_cores = cores
        self.entry: Path | None = None
        self.jobs = 1  # processes at the last count
        self.threads = self.threads_before = self.cores = 0  # counted by register, in the training process

    def register(self) -> bool:
        """List this process; False (torch's threads left as they are, with a warning) where it cannot."""
        if os.name != "posix":
            return False
        self.pid = os.getpid()
        self.threads = self.threads_before = torch.get_num_threads()
        self.cores = self.fixed_cores or min(available_cores(), self.threads_before)
        entry = self.folder / str(self.pid)
        try:
            private_folder(self.folder)
            fd = os.open(entry, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(_start_time(self.pid))
        except OSError as error:
            warnings.warn(f"threads=auto could not list this process in {self.folder} ({error}); it keeps torch's "
                          f"{self.threads} threads", stacklevel=2)
            return False
        self.entry = entry
        return True

    def unregister(self) -> None:
        if self.entry is None:
            return
        self.entry.unlink(missing_ok=True)
        self.entry = None
        torch.set_num_threads(self.threads_before)
        self.threads = self.threads_before

    def live_jobs(self) -> int:
        """Registered processes still running (this one included); entries of ended ones are removed."""
        live = 0
        for entry in self.folder.glob("*"):
            if not entry.name.isdigit():
                continue
            try:
                started = entry.read_text().strip()
            except OSError:
                continue
            if int(entry.name) == self.pid or _alive(int(entry.name), started):
                live += 1
            else:
                entry.unlink(missing_ok=True)
        return max(live, 1)

    def update(self) -> tuple[int, int] | None:
        """Sets torch's threads to this process's share; (threads, processes) when that changed it."""
        if self.entry is None:
            return None
        jobs = self.jobs = self.live_jobs()
        share = max(1, self.cores // jobs)
        if share == self.threads:
            return None
        torch.set_num_threads(share)
        self.threads = share
        return share, jobs
