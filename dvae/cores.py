"""Sharing this machine's CPU cores among the dvae training processes running on it.

Every torch process starts one OpenMP thread per core. Two such processes on the same cores slow each
other far more than twice (threads wait on each other's time slices), which is what a local sweep
(`hydra/launcher=submitit_local`, or two runs started by hand) does. With `threads=auto` each training
process registers itself in a per-user folder and takes `cores // processes` threads, re-counting as
jobs start and finish (`CoreShare.update`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

# where live training processes are listed (one file per process); a test points it elsewhere
JOBS_DIR_ENV = "DVAE_JOBS_DIR"


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. under taskset or a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def jobs_dir() -> Path:
    default = Path(tempfile.gettempdir()) / f"dvae-jobs-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    return Path(os.environ.get(JOBS_DIR_ENV) or default)


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), so a reused pid is not taken for the
    registered process; '' where /proc is not there."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name in parentheses


def _alive(pid: int, start_time: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, someone else's
    return not start_time or _start_time(pid) == start_time


class CoreShare:
    """This process's share of the cores: `register`, then `update` now and then, then `unregister`
    (which gives torch back the thread count it had)."""

    def __init__(self, cores: int | None = None, folder: Path | None = None):
        self.cores = cores or available_cores()
        self.folder = folder or jobs_dir()
        self.pid = os.getpid()
        self.entry = self.folder / str(self.pid)
        self.threads_before = torch.get_num_threads()
        self.threads = self.threads_before

    def register(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.entry.write_text(_start_time(self.pid))

    def unregister(self) -> None:
        self.entry.unlink(missing_ok=True)
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
        jobs = self.live_jobs()
        share = max(1, self.cores // jobs)
        if share == self.threads:
            return None
        torch.set_num_threads(share)
        self.threads = share
        return share, jobs
