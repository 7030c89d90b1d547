"""Parity with the official `dall_e` package (PyPI, a test dependency) and the safe loader."""

import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

from dvae.formats.openai import load_openai, read_official, to_official
from dvae.model import DVAE

dall_e = pytest.importorskip("dall_e")

SMALL = dict(n_hid=64, n_blk_per_group=1, vocab_size=512)
NO_FLOOR = -1e4  # the official decoder has no floor on ln b


def official_pair(n_hid=64, n_blk_per_group=1, vocab_size=512, n_init=32):
    """Random official modules. Built without requires_grad (on current torch the official
    constructor fails with it), with gradients switched on afterwards."""
    torch.manual_seed(0)
    enc = dall_e.Encoder(n_hid=n_hid, n_blk_per_group=n_blk_per_group, vocab_size=vocab_size,
                         requires_grad=False, use_mixed_precision=False)
    dec = dall_e.Decoder(n_hid=n_hid, n_blk_per_group=n_blk_per_group, vocab_size=vocab_size,
                         n_init=n_init, requires_grad=False, use_mixed_precision=False)
    for module in (enc, dec):
        for p in module.parameters():
            p.data.normal_(std=0.05)  # not the init: every tensor must land in the right place
            p.requires_grad_(True)
    return enc.eval(), dec.eval()


def max_diffs(ours: DVAE, enc, dec, size=32):
    torch.manual_seed(1)
    x = torch.rand(2, 3, size, size)
    y = dall_e.map_pixels(x)
    tokens = torch.randint(0, ours.K, (2, size // 8, size // 8))
    one_hot = torch.nn.functional.one_hot(tokens, ours.K).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        d_enc = (ours.logits(x) - enc(y)).abs().max().item()
        d_dec = (ours.decoder(one_hot) - dec(one_hot)).abs().max().item()
        d_tok = (ours.decoder.forward_tokens(tokens) - dec(one_hot)).abs().max().item()
    return d_enc, d_dec, d_tok


def test_official_pickles_load_and_match(tmp_path):
    enc, dec = official_pair()
    torch.save(enc, tmp_path / "encoder.pkl")
    torch.save(dec, tmp_path / "decoder.pkl")
    ours = load_openai(tmp_path / "encoder.pkl", tmp_path / "decoder.pkl", log_scale_floor=NO_FLOOR)
    assert (ours.K, ours.groups, ours.downsampling, ours.codebook.shape) == (512, 4, 8, (512, 32))
    assert max(max_diffs(ours, enc, dec)) <= 1e-5


def test_official_state_dicts_load_too(tmp_path):
    enc, dec = official_pair()
    torch.save(enc.state_dict(), tmp_path / "enc.pt")
    torch.save(dec.state_dict(), tmp_path / "dec.pt")
    ours = load_openai(tmp_path / "enc.pt", tmp_path / "dec.pt", log_scale_floor=NO_FLOOR)
    assert max(max_diffs(ours, enc, dec)) <= 1e-5


def test_ours_to_official():
    torch.manual_seed(2)
    ours = DVAE(n_hid=64, blocks_per_group=1, groups=4, K=512, n_init=32, log_scale_floor=NO_FLOOR).eval()
    enc, dec = official_pair()
    enc_state, dec_state = to_official(ours)
    enc.load_state_dict(enc_state)
    dec.load_state_dict(dec_state)
    assert max(max_diffs(ours, enc, dec)) <= 1e-5


@pytest.mark.slow
def test_papers_size_matches(tmp_path):
    enc, dec = official_pair(n_hid=256, n_blk_per_group=2, vocab_size=8192, n_init=128)
    torch.save(enc.state_dict(), tmp_path / "enc.pt")
    torch.save(dec.state_dict(), tmp_path / "dec.pt")
    ours = load_openai(tmp_path / "enc.pt", tmp_path / "dec.pt", log_scale_floor=NO_FLOOR)
    assert sum(p.numel() for p in ours.parameters()) == sum(
        p.numel() for m in (enc, dec) for p in m.parameters())
    assert max(max_diffs(ours, enc, dec, size=64)) <= 1e-5


def test_pickle_loads_where_dall_e_cannot_be_imported(tmp_path):
    enc, dec = official_pair()
    torch.save(enc, tmp_path / "encoder.pkl")
    torch.save(dec, tmp_path / "decoder.pkl")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["dall_e"] = None  # import dall_e now fails
        from dvae.formats.openai import load_openai
        model = load_openai({str(tmp_path / "encoder.pkl")!r}, {str(tmp_path / "decoder.pkl")!r})
        assert "dall_e" not in [m.split(".")[0] for m in sys.modules if sys.modules[m] is not None]
        print(model.K, model.downsampling)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["512", "8"]


class Payload:
    def __reduce__(self):
        return (print, ("this ran",))


def test_a_pickle_calling_another_global_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pkl"
    torch.save({"blocks.input.w": torch.zeros(1), "x": Payload()}, path)
    with pytest.raises(ValueError, match=r"refusing to load (__builtin__|builtins)\.print"):
        read_official(path)
    assert "this ran" not in capsys.readouterr().out


def test_a_truncated_file_is_a_clear_error(tmp_path):
    enc, _ = official_pair()
    torch.save(enc, tmp_path / "encoder.pkl")
    data = (tmp_path / "encoder.pkl").read_bytes()
    (tmp_path / "cut.pkl").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable PyTorch file"):
        read_official(tmp_path / "cut.pkl")
    (tmp_path / "other.pkl").write_bytes(pickle.dumps({"weights": [1, 2]}))
    with pytest.raises(ValueError):
        read_official(tmp_path / "other.pkl")


def test_import_cli_writes_an_export_that_matches_the_official_model(tmp_path, capsys):
    from dvae.cli.import_openai import main as import_main

    enc, dec = official_pair()
    torch.save(enc, tmp_path / "encoder.pkl")
    torch.save(dec, tmp_path / "decoder.pkl")
    args = ["--encoder", str(tmp_path / "encoder.pkl"), "--decoder", str(tmp_path / "decoder.pkl"),
            "--out", str(tmp_path / "export")]
    assert import_main(args) == 0
    printed = capsys.readouterr().out
    assert f"init_from={tmp_path / 'export'} scale=learned" in printed  # the official decoder predicts ln b
    ours = DVAE.from_pretrained(tmp_path / "export")
    assert ours.learned_scale and ours.K == 512
    assert max(max_diffs(ours, enc, dec)) <= 1e-5  # raw decoder output: the floor acts after it
    assert import_main(args) == 2  # refuses to overwrite
    assert "--force" in capsys.readouterr().err
    assert import_main([*args, "--force"]) == 0


def test_fine_tuning_from_an_imported_model_runs_and_its_loss_is_finite(tmp_path):
    import csv

    from dvae.cli.import_openai import main as import_main
    from dvae.training.run import train
    from tests.conftest import FAST, compose_config

    enc, dec = official_pair()
    torch.save(enc, tmp_path / "encoder.pkl")
    torch.save(dec, tmp_path / "decoder.pkl")
    assert import_main(["--encoder", str(tmp_path / "encoder.pkl"), "--decoder", str(tmp_path / "decoder.pkl"),
                        "--out", str(tmp_path / "export")]) == 0
    from dvae.errors import ConfigError

    with pytest.raises(ConfigError, match=r"exported with a learned scale .*; train it with scale=learned\.$"):
        train(compose_config([*FAST, "data=shapes", f"init_from={tmp_path / 'export'}"]), run_dir=tmp_path / "no")
    assert not (tmp_path / "no").exists()  # refused before anything was written
    cfg = compose_config([*FAST, "data=shapes", "scale=learned", f"init_from={tmp_path / 'export'}"])
    before = DVAE.from_pretrained(tmp_path / "export")
    train(cfg, run_dir=tmp_path / "run")
    assert (cfg.model.n_hid, cfg.model.groups, cfg.model.K) == (64, 4, 512)  # taken from the export
    losses = [float(r["train/loss"]) for r in csv.DictReader(open(tmp_path / "run" / "logs" / "metrics.csv"))
              if r.get("train/loss")]
    assert len(losses) == 4 and all(map(torch.isfinite, torch.tensor(losses)))
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    tuned = state["state_dict"]["model.encoder.blocks.input.weight"]
    start = before.state_dict()["encoder.blocks.input.weight"]
    assert not torch.equal(tuned, start) and (tuned - start).abs().max() < 0.1  # it started from the import


def test_init_from_a_missing_directory_is_refused(tmp_path):
    from dvae.errors import ConfigError
    from dvae.training.run import train
    from tests.conftest import compose_config

    with pytest.raises(ConfigError, match="init_from=.*no dvae.json"):
        train(compose_config([f"init_from={tmp_path}"]), run_dir=tmp_path / "run")


def test_export_in_the_official_format_loads_into_dall_e(tmp_path):
    from dvae.cli.export import main as export_main
    from dvae.training.module import DVAELightning

    system = DVAELightning(n_hid=64, blocks_per_group=1, groups=4, K=512, n_init=32, log_scale_floor=NO_FLOOR)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": system.state_dict(), "hyper_parameters": dict(system.hparams),
                "global_step": 0}, ckpt)
    assert export_main([str(ckpt), "--format", "openai", "--out", str(tmp_path / "official")]) == 0
    enc, dec = official_pair()
    enc.load_state_dict(torch.load(tmp_path / "official" / "encoder.pt", weights_only=True))
    dec.load_state_dict(torch.load(tmp_path / "official" / "decoder.pt", weights_only=True))
    assert max(max_diffs(system.ema_model.eval(), enc, dec)) <= 1e-5


def test_import_command_is_installed():
    import shutil
    from pathlib import Path

    assert shutil.which("dvae-import-openai", path=str(Path(sys.executable).parent))
