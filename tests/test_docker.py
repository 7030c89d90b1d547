"""The Dockerfile's install step and entry point, checked without a Docker engine: its COPY lines are
applied to a temporary directory, its `pip install` line runs in a fresh virtual environment, and its
entry point must answer `--help` from another directory (the configs ship inside the package)."""

import shlex
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import ROOT


def dockerfile_instructions() -> list[tuple[str, str]]:
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    return [tuple(line.split(maxsplit=1)) for line in lines if line and not line.startswith("#")]


def test_the_dockerfile_uses_a_cuda_pytorch_base_a_volume_and_the_train_entry_point():
    instructions = dockerfile_instructions()
    base = next(arg for op, arg in instructions if op == "FROM")
    assert base.startswith("pytorch/pytorch:") and "cuda" in base
    assert ("ENTRYPOINT", '["dvae-train"]') in instructions
    assert any(op == "VOLUME" for op, _ in instructions)
    install = [arg for op, arg in instructions if op == "RUN" and "pip install" in arg]
    assert install and "-e" not in shlex.split(install[0]), "the image installs the package, not editable"


@pytest.mark.slow
def test_the_dockerfile_install_step_gives_a_working_dvae_train(tmp_path):
    instructions = dockerfile_instructions()
    workdir = tmp_path / "image"
    workdir.mkdir()
    for op, arg in instructions:
        if op == "COPY":
            *sources, target = arg.split()
            for source in sources:
                destination = workdir / target / source if target.endswith("/") else workdir / target
                if (ROOT / source).is_dir():
                    shutil.copytree(ROOT / source, destination, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy(ROOT / source, destination)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # The base image brings torch; here the test's own environment plays that part (no 5 GB download).
    purelib = Path(subprocess.check_output([venv / "bin" / "python", "-c",
                                            "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                           text=True).strip())
    (purelib / "base_image.pth").write_text("\n".join([sysconfig.get_paths()["purelib"],
                                                       *site.getsitepackages()]) + "\n")
    install = next(arg for op, arg in instructions if op == "RUN" and "pip install" in arg)
    command = [str(venv / "bin" / "python") if word == "python" else word for word in shlex.split(install)]
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    elsewhere = tmp_path / "runs"
    elsewhere.mkdir()
    result = subprocess.run([venv / "bin" / "dvae-train", "--help"], cwd=elsewhere, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dvae-train: train a discrete VAE" in result.stdout
    assert "strategy: " in result.stdout and "torchrun" in result.stdout
    located = subprocess.check_output([venv / "bin" / "python", "-c", "import dvae; print(dvae.__file__)"],
                                      cwd=elsewhere, text=True)
    assert located.startswith(str(venv)), f"dvae was imported from {located}, not from the installed package"
