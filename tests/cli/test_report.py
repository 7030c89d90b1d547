"""dvae-report refuses a user's mistake or a damaged file with one sentence (exit 2) naming the key or the file,
before the expensive work, and leaves every file the user had as it was."""


from dvae.cli.report import main as report_main


def test_dvae_report_names_a_damaged_metrics_json(tmp_path, capsys):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("- data=shapes\n")
    (run / "metrics.json").write_text('{"psnr": 21.5, "bits_per')
    report_main([str(run), "--no-plot"])
    out = capsys.readouterr().out
    assert "1 job(s): 0 finished, 0 failed, 0 unfinished, 1 damaged." in out
    assert f"{run / 'metrics.json'} is damaged (not a JSON object)" in out
    assert (run / "metrics.json").read_text() == '{"psnr": 21.5, "bits_per'
