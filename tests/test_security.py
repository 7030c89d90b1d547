"""No file that dvae reads may run code, and no planted file makes it write elsewhere or hang.

Each load path gets a payload whose unpickling would create a marker file, written three ways: torch.save
(zip), torch.save in the legacy (pre-zip) format, and a plain pickle.dump. The command must refuse it
with one sentence and the marker must not exist afterwards.
"""

import json
import os
import pickle
import re
import signal
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from dvae.errors import ConfigError
from dvae.model import DVAE
from tests.conftest import one_sentence_error

WRITERS = ("zip", "legacy", "plain")


class Payload:
    """Unpickling this opens `marker` for writing, which creates it: proof that a load ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path: Path, content: dict, how: str) -> Path:
    """Write `content` to `path` as torch.save's zip or legacy format, or a plain pickle. A Payload goes first
    in `content`, so that a reader meets it before anything else it might refuse."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if how == "plain":  # protocol 2 reaches the payload's global, not an opcode a restricted reader rejects first
        path.write_bytes(pickle.dumps(content, protocol=2))
    else:
        torch.save(content, path, _use_new_zipfile_serialization=how == "zip")
    return path


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "code-ran"
    yield path
    assert not path.exists(), "a payload in a file dvae read ran"


def checkpoint_with(marker: Path) -> dict:
    return {"evil": Payload(marker), "global_step": 2, "state_dict": {}, "hyper_parameters": {}}


# --------------------------------------------------------------------------------------------- dvae-train


@pytest.fixture
def run_to_resume(tmp_path, fast_config):
    run = tmp_path / "run"
    run.mkdir()
    OmegaConf.save(fast_config("data=shapes"), run / "config.yaml")
    return run


@pytest.mark.parametrize("how", WRITERS)
@pytest.mark.parametrize("resume", ["run", "auto"])
def test_resume_refuses_a_checkpoint_that_would_run_code(run_to_resume, fast_config, marker, tmp_path, how, resume):
    from dvae.training.run import train

    plant(run_to_resume / "checkpoints" / "last.ckpt", checkpoint_with(marker), how)
    value = run_to_resume if resume == "run" else "auto"
    with pytest.raises(ConfigError, match=r"last\.ckpt is refused: it names the Python object \w+\.open, "):
        train(fast_config("data=shapes", f"resume={value}"), run_dir=run_to_resume if resume == "auto" else tmp_path)


def test_lightning_reads_the_resumed_checkpoint_restricted_too(run_to_resume, fast_config, marker, monkeypatch):
    """Even where torch.load's own default is unrestricted (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD, torch < 2.6) and
    the step lookup is skipped, Trainer.fit's load of last.ckpt builds no Python object."""
    import dvae.training.resume
    from dvae.training.run import train

    plant(run_to_resume / "checkpoints" / "last.ckpt", checkpoint_with(marker), "zip")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.setattr(dvae.training.resume, "checkpoint_step", lambda path: 2)
    monkeypatch.setattr(dvae.training.resume, "check_decoder_output", lambda path, cfg: None)
    with pytest.raises(pickle.UnpicklingError, match=r"\w+\.open"):
        train(fast_config("data=shapes", "resume=auto"), run_dir=run_to_resume)


# --------------------------------------------------------------------------------------------- dvae-export


@pytest.mark.parametrize("how", WRITERS)
def test_export_refuses_a_checkpoint_that_would_run_code(tmp_path, marker, capsys, how):
    from dvae.cli.export import main

    checkpoint = plant(tmp_path / "evil.ckpt", checkpoint_with(marker), how)
    assert main([str(checkpoint), "--out", str(tmp_path / "export")]) == 2
    assert "evil.ckpt is refused" in one_sentence_error(capsys, "dvae-export")
    assert not (tmp_path / "export").exists()


# ------------------------------------------------------------------ export directories (dvae-encode, init_from)


def tiny_model() -> DVAE:
    torch.manual_seed(0)
    return DVAE(n_hid=8, blocks_per_group=1, groups=2, K=16, n_init=8).eval()


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / "a.png")
    return folder


def encode(capsys, model_dir: Path, data: Path, out: Path) -> tuple[int, str]:
    from dvae.cli.encode import main as encode_main

    code = encode_main(["--model", str(model_dir), "--data", str(data), "--out", str(out), "--size", "8",
                        "--no-progress", "--device", "cpu"])
    return code, one_sentence_error(capsys, "dvae-encode") if code else capsys.readouterr().err


@pytest.mark.parametrize("how", WRITERS)
@pytest.mark.parametrize("role", ["model", "codebook"])
def test_an_export_in_pt_format_that_would_run_code_is_refused(tmp_path, marker, image_folder, capsys, fast_config,
                                                                how, role):
    from dvae.training.run import train

    export = tmp_path / "export"
    tiny_model().save_pretrained(export, format="pt")
    plant(export / f"{role}.pt", {"evil": Payload(marker), "codebook": torch.zeros(16, 8)}, how)
    code, error = encode(capsys, export, image_folder, tmp_path / "tokens")
    assert code == 2 and f"{role}.pt is refused" in error
    with pytest.raises(ConfigError, match=f"{role}.pt is refused"):
        train(fast_config(f"init_from={export}"), run_dir=tmp_path / "run")


@pytest.mark.parametrize("name", ["../outside.safetensors", "sub/../../outside.safetensors", "ABSOLUTE", ".."])
def test_dvae_json_file_names_outside_the_export_are_refused(tmp_path, image_folder, capsys, name):
    export = tmp_path / "export"
    tiny_model().save_pretrained(export)
    (tmp_path / "outside.safetensors").write_bytes((export / "model.safetensors").read_bytes())
    name = str(tmp_path / "outside.safetensors") if name == "ABSOLUTE" else name
    config = json.loads((export / "dvae.json").read_text())
    config["files"]["model"] = name
    (export / "dvae.json").write_text(json.dumps(config))
    code, error = encode(capsys, export, image_folder, tmp_path / "tokens")
    assert code == 2 and f"gives the model file as {name!r}" in error and "inside" in error
    with pytest.raises(ConfigError, match="not a file name inside"):
        DVAE.from_pretrained(export)
    assert not (tmp_path / "tokens").exists()


def test_an_untouched_export_still_encodes(tmp_path, image_folder, capsys):
    """The checks above refuse only what they should: the same export, unmodified, is read."""
    export = tmp_path / "export"
    tiny_model().save_pretrained(export, format="pt")
    assert encode(capsys, export, image_folder, tmp_path / "tokens")[0] == 0
    assert (tmp_path / "tokens" / "shard_00000.npy").is_file()


@pytest.mark.parametrize("where", ["file", "shard"])
def test_decode_refuses_a_token_file_of_pickled_objects(tmp_path, image_folder, marker, capsys, where):
    from dvae.cli.decode import main as decode_main

    export = tmp_path / "export"
    tiny_model().save_pretrained(export)
    payload = np.array([Payload(marker)], dtype=object)
    if where == "file":
        tokens = tmp_path / "tokens.npy"
    else:  # a real token directory whose first shard is replaced
        assert encode(capsys, export, image_folder, tmp_path / "tokens")[0] == 0
        tokens = tmp_path / "tokens"
    np.save(tokens / "shard_00000.npy" if where == "shard" else tokens, payload, allow_pickle=True)
    assert decode_main(["--model", str(export), "--tokens", str(tokens), "--out", str(tmp_path / "decoded"),
                        "--no-progress", "--device", "cpu"]) == 2
    assert re.search(r"allow_pickle=False|Python objects", one_sentence_error(capsys, "dvae-decode"))


# --------------------------------------------------------------------------------------------- dvae-import-openai


@pytest.mark.parametrize("how", WRITERS)
@pytest.mark.parametrize("part", ["encoder", "decoder"])
def test_import_openai_refuses_a_pickle_that_would_run_code(tmp_path, marker, capsys, how, part):
    from dvae.cli.import_openai import main as import_main

    files = {name: plant(tmp_path / f"{name}.pkl", {"blocks.input.w": torch.zeros(1)}, "zip")
             for name in ("encoder", "decoder")}
    plant(files[part], {"evil": Payload(marker), "blocks.input.w": torch.zeros(1)}, how)
    argv = ["--encoder", str(files["encoder"]), "--decoder", str(files["decoder"]), "--out", str(tmp_path / "out")]
    assert import_main(argv) == 2
    error = one_sentence_error(capsys, "dvae-import-openai")
    assert f"{part}.pkl" in error and re.search(r"refusing to load \w+\.open", error)
    assert not (tmp_path / "out").exists()


def test_an_official_pickle_in_the_legacy_format_still_imports(tmp_path):
    """The released encoder.pkl / decoder.pkl were written by an old torch: whole dall_e modules in the
    legacy format, read through the same restricted unpickler."""
    dall_e = pytest.importorskip("dall_e")
    from dvae.formats.openai import load_openai

    torch.manual_seed(0)
    enc = dall_e.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512, requires_grad=False,
                         use_mixed_precision=False)
    dec = dall_e.Decoder(n_hid=64, n_blk_per_group=1, vocab_size=512, n_init=32, requires_grad=False,
                         use_mixed_precision=False)
    torch.save(enc, tmp_path / "encoder.pkl", _use_new_zipfile_serialization=False)
    torch.save(dec, tmp_path / "decoder.pkl", _use_new_zipfile_serialization=False)
    ours = load_openai(tmp_path / "encoder.pkl", tmp_path / "decoder.pkl")
    assert torch.equal(ours.encoder.blocks.input.weight, enc.blocks.input.w)
    assert torch.equal(ours.codebook, dec.blocks.input.w[:, :, 0, 0].t())


# --------------------------------------------------------------------------------------------- dvae-report


@pytest.mark.parametrize("planted", ["report.md", "report.png"])
def test_report_replaces_a_planted_symlink_instead_of_writing_through_it(tmp_path, planted):
    from dvae.training.sweep_report import write_report
    from tests.training.test_sweep_report import METRICS, make_job

    make_job(tmp_path / "sweep" / "0", ["scale.value=0.1"], METRICS)
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"the user's own file\n")
    (tmp_path / "sweep" / planted).symlink_to(victim)
    write_report(tmp_path / "sweep", make_plot=planted == "report.png")
    assert victim.read_bytes() == b"the user's own file\n"
    assert not (tmp_path / "sweep" / planted).is_symlink()
    assert (tmp_path / "sweep" / planted).stat().st_size > 0


# --------------------------------------------------------------------------------------------- FIFOs


@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging: opening a FIFO for reading waits for a writer that never comes."""

    def fail(signum, frame):
        raise TimeoutError(f"still blocked after {seconds} s: a FIFO was opened")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this system")


@needs_fifo
def test_encode_refuses_a_fifo_named_like_an_image_without_opening_it(tmp_path, image_folder, capsys):
    export = tmp_path / "export"
    tiny_model().save_pretrained(export)
    os.mkfifo(image_folder / "x.png")
    with deadline(5), pytest.warns(UserWarning, match="not regular files .* are skipped, e.g. .*x.png"):
        code, error = encode(capsys, export, image_folder, tmp_path / "tokens")
    assert code == 0, error  # the FIFO is left out, unopened; the real images are encoded
    sources = [json.loads(line)["source"] for line in (tmp_path / "tokens" / "index.jsonl").read_text().splitlines()]
    assert "x.png" not in sources and sources


@needs_fifo
def test_training_skips_a_fifo_in_data_root_without_opening_it(tmp_path, image_folder):
    from dvae.data.folder import BadFiles, FolderImages

    os.mkfifo(image_folder / "x.png")
    bad = BadFiles(tmp_path / "bad")
    images = FolderImages([image_folder / "x.png", image_folder / "a.png"], 8, False, 0, False, bad_files=bad)
    with deadline(5), pytest.warns(UserWarning, match="x.png is not a regular file"):
        image = images.load_image(0)
    assert image.shape == (3, 8, 8)  # the next readable image, a.png
    assert [path for path, _ in bad.entries()] == [str(image_folder / "x.png")]


def test_an_image_format_outside_the_accepted_ones_is_not_opened(tmp_path):
    """Pillow goes by a file's content, not its name, and some of its formats start other programs (EPS runs
    Ghostscript): a file named .png that is not one of the accepted formats is refused unread."""
    from dvae.data.image_files import read_rgb

    path = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(path, format="PCX")
    with pytest.raises(OSError, match="could not read image .*x.png"):
        read_rgb(path)
