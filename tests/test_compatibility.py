"""Files written by an earlier dvae still work: a run directory with its checkpoint, an export and a
token set, made by dvae 0.1.0 before the package was reorganised (tests/fixtures/v0.1/README.md says
how). Whatever moves inside the package, these must load, resume, export, encode and decode as before."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import FIXTURES

V01 = FIXTURES / "v0.1"


def pixels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in sorted(folder.glob("*.png"))}


def test_an_export_of_0_1_loads_and_encodes_its_images_to_the_tokens_it_wrote(tmp_path):
    from dvae.cli.encode import main as encode_main
    from dvae.model import DVAE

    model = DVAE.from_pretrained(V01 / "export")
    assert (model.K, model.downsampling) == (32, 4)
    assert encode_main(["--model", str(V01 / "export"), "--data", str(V01 / "images"), "--size", "16",
                       "--out", str(tmp_path / "tokens"), "--no-progress"]) == 0
    written = np.load(V01 / "tokens" / "shard_00000.npy")
    again = np.load(tmp_path / "tokens" / "shard_00000.npy")
    assert again.shape == written.shape == (3, 4, 4)
    # a token whose two best logits tie within rounding may flip on another CPU; a mis-read weight flips most
    assert (again == written).mean() >= 0.9


def test_a_token_set_of_0_1_decodes_to_the_images_it_gave_then(tmp_path):
    from dvae.cli.decode import main as decode_main

    assert decode_main(["--model", str(V01 / "export"), "--tokens", str(V01 / "tokens"),
                       "--out", str(tmp_path / "decoded"), "--no-progress"]) == 0
    then, now = pixels(V01 / "decoded"), pixels(tmp_path / "decoded")
    assert then.keys() == now.keys() == {"img0.png", "img1.png", "img2.png"}
    for name in then:
        assert np.abs(then[name] - now[name]).mean() < 1.0, name


def test_a_checkpoint_of_0_1_exports_to_the_same_weights(tmp_path):
    from safetensors.torch import load_file

    from dvae.cli.export import main as export_main

    assert export_main([str(V01 / "run"), "--checkpoint", "last", "--out", str(tmp_path / "export")]) == 0
    for name in ("model.safetensors", "codebook.safetensors"):
        then, now = load_file(V01 / "export" / name), load_file(tmp_path / "export" / name)
        assert then.keys() == now.keys()
        for key in then:
            assert torch.equal(then[key], now[key]), key
    assert json.loads((tmp_path / "export" / "dvae.json").read_text())["model"] == \
        json.loads((V01 / "export" / "dvae.json").read_text())["model"]


@pytest.mark.slow
def test_a_run_of_0_1_resumes_from_its_checkpoint(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(V01 / "run", run)
    dvae_train = Path(sys.executable).with_name("dvae-train")
    result = subprocess.run([str(dvae_train), f"resume={run}", "trainer.max_steps=6"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resuming {run} from step 4" in result.stderr
    assert json.loads((run / "metrics.json").read_text())["steps"] == 6
