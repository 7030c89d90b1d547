"""Time to a good tokenizer: seconds of training of the default command until the validation PSNR first
clears the mean-colour baseline by +3 dB and by +5 dB, per seed and as the median over seeds.

    .venv/bin/python scripts/time_to_quality.py --out /tmp/ttq                 # seeds 0, 1, 2 of the default
    .venv/bin/python scripts/time_to_quality.py --out /tmp/ttq --seeds 0 -- model=small data=shapes

Each seed is one `dvae-train` run, one after another (two at once would slow each other), validating every
`--val-every` updates. The time is `val/training_seconds`: from the first update, with the validations
left out, so validating often does not change it. The process's whole wall time (imports and the final
validation included) is reported beside it. Writes time_to_quality.json and .md in --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

THRESHOLDS = (3.0, 5.0)


def validations(run_dir: Path) -> list[dict]:
    """(step, training seconds, gain) of every validation in the run's metrics.csv, in order."""
    rows = []
    for path in sorted(run_dir.glob("logs/**/metrics.csv")):
        with path.open(newline="") as handle:
            for row in csv.DictReader(handle):
                if row.get("val/psnr") and row.get("val/training_seconds"):
                    rows.append({"step": int(row["step"]), "seconds": float(row["val/training_seconds"]),
                                 "gain": float(row["val/psnr"]) - float(row["val/psnr_mean_color"])})
    return sorted(rows, key=lambda row: row["step"])


def first_crossing(rows: list[dict], gain: float) -> dict | None:
    return next((row for row in rows if row["gain"] >= gain), None)


def summarise(per_seed: list[dict]) -> dict:
    """The median over seeds of the seconds to each threshold (a seed that never got there counts as
    slower than all the others; the median is None when half or more never got there)."""
    summary = {}
    for threshold in THRESHOLDS:
        key = f"+{threshold:g} dB"
        times = sorted((run["reached"][key] or {}).get("seconds", float("inf")) for run in per_seed)
        median = statistics.median(times) if times else None
        summary[key] = {"median_seconds": None if median in (None, float("inf")) else median,
                        "seeds_reached": sum(t != float("inf") for t in times), "seeds": len(times)}
    return summary


def markdown(per_seed: list[dict], summary: dict, command: str) -> str:
    lines = [f"`{command}`, validating every {per_seed[0]['val_every']} updates" if per_seed else command, "",
             "| seed | +3 dB: s (step) | +5 dB: s (step) | final gain dB | training s | process wall s |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]

    def cell(hit):
        return f"{hit['seconds']:.1f} ({hit['step']})" if hit else "not reached"

    for run in per_seed:
        lines.append(f"| {run['seed']} | {cell(run['reached']['+3 dB'])} | {cell(run['reached']['+5 dB'])} "
                     f"| {run['final_gain']:+.2f} | {run['training_seconds']:.1f} | {run['process_seconds']:.1f} |")
    for key, value in summary.items():
        median = "not reached" if value["median_seconds"] is None else f"{value['median_seconds']:.1f} s"
        lines.append(f"\nmedian time to {key}: {median} ({value['seeds_reached']} of {value['seeds']} seeds got there)")
    return "\n".join(lines) + "\n"


def run_seed(seed: int, out: Path, val_every: int, overrides: list[str]) -> dict:
    run_dir = out / f"seed_{seed}"
    command = [str(Path(sys.executable).with_name("dvae-train")), f"seed={seed}", f"hydra.run.dir={run_dir}",
               f"trainer.val_check_interval={val_every}", "progress_bar=false", *overrides]
    start = time.perf_counter()
    with (out / f"seed_{seed}.log").open("w") as log:
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)
    process_seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"time_to_quality: seed {seed} failed (exit {code}); see {out / f'seed_{seed}.log'}")
    rows = validations(run_dir)
    if not rows:
        raise SystemExit(f"time_to_quality: seed {seed} logged no validation with val/training_seconds in {run_dir}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"seed": seed, "val_every": val_every, "process_seconds": process_seconds,
            "training_seconds": rows[-1]["seconds"], "final_gain": metrics["gain"],
            "reached": {f"+{t:g} dB": first_crossing(rows, t) for t in THRESHOLDS}, "validations": rows}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="a new or empty folder for the runs and the report")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: %(default)s)")
    parser.add_argument("--val-every", type=int, default=50, help="validate every N updates (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="dvae-train overrides after --, applied to every seed")
    args = parser.parse_args(argv)
    try:
        args.seeds = [int(seed) for seed in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r} must be whole numbers separated by commas, e.g. 0,1,2.")
    if args.val_every < 1:
        parser.error(f"--val-every {args.val_every} must be at least 1.")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        parser.error(f"--out {out} already holds files; give a new or empty folder.")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    per_seed = []
    for seed in args.seeds:
        print(f"time_to_quality: seed {seed} ...", file=sys.stderr, flush=True)
        per_seed.append(run_seed(seed, out, args.val_every, args.overrides))
    summary = summarise(per_seed)
    command = " ".join(["dvae-train", *args.overrides]) if args.overrides else "dvae-train"
    report = markdown(per_seed, summary, command)
    (out / "time_to_quality.md").write_text(report)
    (out / "time_to_quality.json").write_text(json.dumps({"runs": per_seed, "median": summary}, indent=2) + "\n")
    print(report)
    return summary


if __name__ == "__main__":
    main()
