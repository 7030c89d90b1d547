"""`dvae-report DIR`: one table and one figure for a sweep (or a single run).

    dvae-report multirun/2024-05-01/12-00-00     # writes report.md and report.png there, prints the table
    dvae-report outputs/2024-05-01/12-00-00      # a single run directory works too

Each job directory holds `.hydra/overrides.yaml` (what was swept), `config.yaml` (resolved) and,
once finished, `metrics.json`; a failed job holds `status.json` / `error.txt` instead. A job with
neither is still running (or was killed): it is listed but not tabulated, so a sweep can be
reported while it is still being written.
"""

from __future__ import annotations

import argparse
import sys

from dvae.cli.exits import run_tool
from dvae.errors import os_error_sentence
from dvae.training.sweep_report import write_report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="dvae-report",
        description="Tabulate and plot the runs of a dvae-train sweep (or one run): writes report.md and "
                    "report.png in DIR and prints the table. Unfinished jobs are listed, not tabulated.",
    )
    parser.add_argument("directory", metavar="DIR", help="multirun/DATE/TIME (a sweep) or outputs/DATE/TIME")
    parser.add_argument("--no-plot", action="store_true", help="write report.md only")
    args = parser.parse_args(argv)

    def work() -> None:
        text = write_report(args.directory, make_plot=not args.no_plot)
        print(text, end="")
        print(f"\nwrote {'report.md' if args.no_plot else 'report.md and report.png'} in {args.directory}")

    status = run_tool("dvae-report", work, lambda error: (
        f"could not write the report in {args.directory} ({os_error_sentence(error)}); make the directory writable, "
        f"or copy it somewhere writable and report there."))
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
