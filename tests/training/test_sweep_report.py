"""dvae-report on fixture directories, and the edge-aware PSNR it compares."""

import json

import pytest
import torch
import yaml
from PIL import Image

from dvae.cli.report import main
from dvae.training.metrics import EdgePSNR, sobel_magnitude
from dvae.training.sweep_report import write_report

METRICS = {"psnr": 21.5, "psnr_mean_color": 18.25, "psnr_edges": 15.75, "ssim": 0.75, "bits_per_dim": 6.5,
           "perplexity": 30.0, "codes_used_fraction": 0.125, "steps": 300, "wall_seconds": 42.0}


def make_job(directory, overrides, metrics=None, status=None, config=True):
    directory.mkdir(parents=True)
    (directory / ".hydra").mkdir()
    (directory / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if config:
        (directory / "config.yaml").write_text(yaml.safe_dump({"seed": 0, "scale": {"mode": "constant"}}))
    if metrics is not None:
        (directory / "metrics.json").write_text(metrics if isinstance(metrics, str) else json.dumps(metrics))
    if status is not None:
        (directory / "status.json").write_text(json.dumps(status))


@pytest.fixture
def sweep_dir(tmp_path):
    sweep = tmp_path / "multirun"
    common = ["scale=constant", "data=shapes"]
    make_job(sweep / "0", ["scale.value=0.05", *common], METRICS)
    make_job(sweep / "1", ["scale.value=0.2", *common])                            # still running
    make_job(sweep / "2", ["scale.value=0.4", *common], metrics='{"psnr": 2')      # damaged
    make_job(sweep / "3", ["scale.value=0.8", *common],
             status={"status": "failed", "error": "RuntimeError: out of memory"})
    make_job(sweep / "10", ["scale.value=1.6", *common], {**METRICS, "psnr": 25.0, "bits_per_dim": None})
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    (sweep / ".submitit").mkdir()
    return sweep


def test_report_tabulates_finished_jobs_and_lists_the_others(sweep_dir, capsys):
    main([str(sweep_dir)])
    text = (sweep_dir / "report.md").read_text()
    assert text in capsys.readouterr().out  # the table is printed too
    assert "5 job(s): 2 finished, 1 failed, 1 unfinished, 1 damaged." in text
    assert "Common overrides: `scale=constant data=shapes`." in text
    header = ("| job | scale.value | PSNR | mean-colour PSNR | gain dB | edge PSNR | SSIM | bits/dim | perplexity "
              "| codes used | steps | wall s |")
    assert header in text
    assert "| 0 | 0.05 | 21.50 | 18.25 | +3.25 | 15.75 | 0.750 | 6.500 | 30.0 | 0.125 | 300 | 42.0 |" in text
    # jobs in numeric order, no bits/dim for L1/MSE
    assert "| 10 | 1.6 | 25.00 | 18.25 | +6.75 | 15.75 | 0.750 | – |" in text
    assert text.index("| 0 |") < text.index("| 10 |")
    assert "- job 3 (scale.value=0.8): RuntimeError: out of memory" in text
    assert "- job 1 (scale.value=0.2)\n" in text
    assert f"- job 2 (scale.value=0.4): {sweep_dir / '2' / 'metrics.json'} is damaged (not a JSON object)" in text
    assert "| 1 |" not in text and "| 2 |" not in text
    with Image.open(sweep_dir / "report.png") as image:
        assert image.format == "PNG" and image.width > 400


def test_report_averages_over_seeds(tmp_path):
    sweep = tmp_path / "multirun"
    for i, (loss, seed, psnr) in enumerate([("l1", 0, 20.0), ("l1", 1, 22.0), ("mse", 0, 19.0), ("mse", 1, 19.0)]):
        make_job(sweep / str(i), [f"loss={loss}", f"seed={seed}"], {**METRICS, "psnr": psnr})
    text = write_report(sweep, make_plot=True)
    assert "Mean ± standard deviation over seeds (loss):" in text
    assert "| l1 | 2 | 21.00 ± 1.41 |" in text and "| mse | 2 | 19.00 ± 0.00 |" in text
    assert (sweep / "report.png").is_file()


def test_report_on_a_single_run_directory(tmp_path):
    run = tmp_path / "run"
    make_job(run, ["data=shapes"], METRICS)
    text = write_report(run, make_plot=True)
    assert "1 job(s): 1 finished" in text and "| run | 21.50 |" in text
    assert (run / "report.png").is_file()


def refused(argv, capsys):
    """dvae-report's stderr after it exits with status 2: one line, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("dvae-report: error: ") and error.count("\n") == 1 and "Traceback" not in error, error
    return error


def test_report_on_a_directory_without_runs_says_what_to_pass(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    for path in (tmp_path, tmp_path / "missing", tmp_path / "notes.txt"):
        assert "multirun/DATE/TIME" in refused([str(path)], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_report_that_cannot_be_written_is_one_sentence(tmp_path, capsys):
    run = tmp_path / "run"
    make_job(run, ["data=shapes"], METRICS)
    (run / "report.md").mkdir()  # stands for a directory the user cannot write to (tests run as root)
    assert "could not write the report" in refused([str(run), "--no-plot"], capsys)


def test_edge_psnr_counts_only_pixels_near_strong_gradients():
    x = torch.zeros(1, 3, 16, 16)
    x[..., 8:] = 1.0  # one vertical hard edge between columns 7 and 8
    magnitude = sobel_magnitude(x)[0, 0]
    assert magnitude[:, 7:9].min() == pytest.approx(0.5) and magnitude[:, :6].max() == 0
    blurred = x.clone()
    blurred[..., 7:9] = 0.5                      # error 0.5 on the two edge columns only
    flat_error = x.clone()
    flat_error[..., :4] = 0.5                    # the same error far from the edge
    metric = EdgePSNR()
    metric.update(x, blurred)
    assert metric.compute().item() == pytest.approx(10 * torch.log10(torch.tensor(4.0)).item(), rel=1e-5)
    metric.reset()
    metric.update(x, flat_error)
    assert metric.compute().item() == pytest.approx(100.0)  # error clamped at 1e-10: no edge pixel is off
    metric.reset()
    metric.update(torch.zeros(1, 3, 8, 8), torch.ones(1, 3, 8, 8))
    assert torch.isnan(metric.compute())  # no edge at all


def test_a_seed_sweep_reports_min_and_median_over_seeds(tmp_path):
    sweep = tmp_path / "recipe"
    for seed, (psnr, used, wall) in enumerate([(24.0, 0.5, 100.0), (20.0, 0.002, 90.0), (25.0, 0.6, 120.0)]):
        make_job(sweep / str(seed), [f"seed={seed}"],
                 {**METRICS, "psnr": psnr, "codes_used_fraction": used, "wall_seconds": wall})
    text = write_report(sweep, make_plot=False)
    assert "Min / median over seeds:" in text
    assert "| seeds | gain dB | PSNR | codes used | perplexity | wall s |" in text
    assert "| 3 | +1.75 / +5.75 | 20.00 / 24.00 | 0.002 / 0.500 | 30.0 / 30.0 | 90.0 / 100.0 |" in text


def test_a_sweep_over_seeds_alone_is_drawn_as_a_distribution_not_a_line(tmp_path):
    """`dvae-train -m seed=1,2,3,4`: seeds are repeats, so no panel draws a line across seed numbers."""
    from dvae.training.sweep_report import find_jobs, plot

    for i, seed in enumerate([1, 2, 3, 4]):
        make_job(tmp_path / str(i), [f"seed={seed}"], {**METRICS, "psnr": 21.0 + seed / 10})
    figure = plot(tmp_path / "report.png", find_jobs(tmp_path), title="seeds")
    assert (tmp_path / "report.png").stat().st_size > 0
    psnr = figure.axes[0]
    assert [t.get_text() for t in psnr.get_xticklabels()] == ["4 seeds", "mean ± sd"]
    assert all(len(line.get_xdata()) <= 2 for line in psnr.get_lines())  # error bars only, no line over seeds
    assert sorted(psnr.collections[0].get_offsets()[:, 1]) == pytest.approx([21.1, 21.2, 21.3, 21.4])
    assert {t.get_text() for t in psnr.texts} == {"1", "2", "3", "4"}  # each point says which seed it is


def test_an_integer_key_gets_its_own_values_as_ticks(tmp_path):
    from dvae.training.sweep_report import find_jobs, plot

    for i, steps in enumerate([300, 600, 900]):
        make_job(tmp_path / str(i), [f"trainer.max_steps={steps}"], METRICS)
    figure = plot(tmp_path / "report.png", find_jobs(tmp_path), title="steps")
    assert [t.get_text() for t in figure.axes[0].get_xticklabels()] == ["300", "600", "900"]


def test_the_report_links_each_runs_pictures(tmp_path):
    from dvae.training.sweep_report import write_report

    make_job(tmp_path / "0", ["seed=0"], METRICS)
    make_job(tmp_path / "1", ["seed=1"], METRICS)
    (tmp_path / "0" / "images").mkdir()
    (tmp_path / "0" / "images" / "training_curves.png").write_bytes(b"png")
    text = write_report(tmp_path, make_plot=False)
    assert "- job 0: [training curves](0/images/training_curves.png)" in text
    assert "- job 1:" not in text  # no pictures there, no link
