"""A sweep's (or one run's) results: the jobs' metrics.json and overrides, as a Markdown table with the
spread over seeds, and plots of each metric against the swept key."""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dvae.errors import ConfigError
from dvae.files import atomic_write

# metrics.json key -> column title, number format
COLUMNS = {
    "psnr": ("PSNR", "{:.2f}"),
    "psnr_mean_color": ("mean-colour PSNR", "{:.2f}"),
    "gain": ("gain dB", "{:+.2f}"),
    "psnr_edges": ("edge PSNR", "{:.2f}"),
    "ssim": ("SSIM", "{:.3f}"),
    "bits_per_dim": ("bits/dim", "{:.3f}"),
    "perplexity": ("perplexity", "{:.1f}"),
    "codes_used_fraction": ("codes used", "{:.3f}"),
    "steps": ("steps", "{:d}"),
    "wall_seconds": ("wall s", "{:.1f}"),
}
PLOTTED = ("psnr", "psnr_mean_color", "psnr_edges", "ssim", "bits_per_dim", "perplexity", "codes_used_fraction")
AVERAGED = ("psnr", "psnr_edges", "psnr_mean_color", "ssim", "bits_per_dim", "perplexity", "codes_used_fraction")
# what a run leaves in images/ when it ends (training/pictures.py), linked from report.md
RUN_PICTURES = (("training curves", "training_curves.png"), ("codebook atlas", "codebook_atlas.png"))
# the recipe check (experiment=recipe_check): min and median over seeds of what decides whether a run is usable
SEED_SUMMARY = ("gain", "psnr", "codes_used_fraction", "perplexity", "wall_seconds")
JOB_FILES = ("metrics.json", "config.yaml", "status.json", "error.txt", ".hydra/overrides.yaml")


@dataclass
class Job:
    name: str
    path: Path
    overrides: dict[str, str] = field(default_factory=dict)
    metrics: dict | None = None
    status: str = "unfinished"  # finished, failed, damaged (metrics.json unreadable) or unfinished
    error: str | None = None


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # missing, or still being written
        return None
    return data if isinstance(data, dict) else None


def _read_overrides(job_dir: Path) -> dict[str, str]:
    try:
        items = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()) or []
    except (OSError, yaml.YAMLError):
        return {}
    overrides = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        if sep:
            overrides[key.lstrip("+~")] = value
    return overrides


def load_job(job_dir: Path) -> Job:
    job = Job(name=job_dir.name, path=job_dir, overrides=_read_overrides(job_dir))
    metrics = _read_json(job_dir / "metrics.json")
    status = _read_json(job_dir / "status.json") or {}
    if metrics is not None:
        job.metrics, job.status = metrics, "finished"
        psnr, mean_color = _number(metrics.get("psnr")), _number(metrics.get("psnr_mean_color"))
        if psnr is not None and mean_color is not None:  # the gain over the mean-colour baseline
            metrics.setdefault("gain", psnr - mean_color)
    elif (job_dir / "metrics.json").is_file():  # written once, at the end of a run: not one still running
        job.status = "damaged"
        job.error = f"{job_dir / 'metrics.json'} is damaged (not a JSON object); rerun the job or restore the file"
    elif status.get("status") == "failed" or (job_dir / "error.txt").is_file():
        job.status = "failed"
        job.error = status.get("error")
        if not job.error and (job_dir / "error.txt").is_file():
            lines = [line for line in (job_dir / "error.txt").read_text().splitlines() if line.strip()]
            job.error = lines[-1] if lines else "unknown error"
    return job


def _is_job_dir(path: Path) -> bool:
    return any((path / name).exists() for name in JOB_FILES)


def _natural(path: Path):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def find_jobs(directory: Path) -> list[Job]:
    """The jobs of a multirun directory (its numbered sub-directories), or the run itself."""
    if not directory.is_dir():
        raise ConfigError(f"{directory} is not a directory; pass a multirun directory "
                          "(multirun/DATE/TIME) or a run directory (outputs/DATE/TIME).")
    if _is_job_dir(directory):
        return [load_job(directory)]
    subdirs = [d for d in directory.iterdir() if d.is_dir() and not d.name.startswith(".") and _is_job_dir(d)]
    if not subdirs:
        raise ConfigError(f"{directory} holds no run: no config.yaml, metrics.json or job sub-directories; "
                          "pass the directory dvae-train printed (multirun/DATE/TIME or outputs/DATE/TIME).")
    return [load_job(d) for d in sorted(subdirs, key=_natural)]


def swept_keys(jobs: list[Job]) -> list[str]:
    """Override keys whose value differs between jobs, in command-line order."""
    keys: list[str] = []
    for job in jobs:
        keys += [k for k in job.overrides if k not in keys]
    return [k for k in keys if len({job.overrides.get(k) for job in jobs}) > 1]


def _number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _cell(key: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    title, fmt = COLUMNS[key]
    try:
        return fmt.format(int(value) if fmt == "{:d}" else float(value))
    except (TypeError, ValueError):
        return str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _describe(job: Job, keys: list[str]) -> str:
    return " ".join(f"{k}={job.overrides.get(k, '')}" for k in keys) or job.name


def _mean_std(metric: str, values: list[float]) -> str:
    if not values:
        return "–"
    fmt = COLUMNS[metric][1]
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def render(directory: Path, jobs: list[Job]) -> str:
    keys = swept_keys(jobs)
    finished = [j for j in jobs if j.status == "finished"]
    failed = [j for j in jobs if j.status == "failed"]
    unfinished = [j for j in jobs if j.status == "unfinished"]
    damaged = [j for j in jobs if j.status == "damaged"]
    lines = [f"# Report: {directory}", ""]
    lines.append(f"{len(jobs)} job(s): {len(finished)} finished, {len(failed)} failed, "
                 f"{len(unfinished)} unfinished" + (f", {len(damaged)} damaged." if damaged else "."))
    common = [f"{k}={v}" for k, v in jobs[0].overrides.items() if k not in keys]
    if common:
        lines.append("Common overrides: `" + " ".join(common) + "`.")
    lines.append("")
    header = ["job", *keys, *(title for title, _ in COLUMNS.values())]
    rows = [[j.name, *(j.overrides.get(k, "") for k in keys), *(_cell(m, j.metrics.get(m)) for m in COLUMNS)]
            for j in finished]
    lines += _table(header, rows) if rows else ["No finished job yet."]
    groups = [k for k in keys if k != "seed"]
    if "seed" in keys and groups and finished:
        lines += ["", f"Mean ± standard deviation over seeds ({', '.join(groups)}):", ""]
        lines += _table([*groups, "seeds", *(COLUMNS[m][0] for m in AVERAGED)],
                        _per_group(finished, groups, AVERAGED, _mean_std))
    if "seed" in keys and finished:
        lines += ["", "Min / median over seeds" + (f" ({', '.join(groups)})" if groups else "") + ":", ""]
        lines += _table([*groups, "seeds", *(COLUMNS[m][0] for m in SEED_SUMMARY)],
                        _per_group(finished, groups, SEED_SUMMARY, _min_median))
    pictures = [(j, [(label, j.path / "images" / name) for label, name in RUN_PICTURES
                     if (j.path / "images" / name).is_file()]) for j in finished]
    if any(found for _, found in pictures):
        lines += ["", "Each run's pictures:", ""]
        lines += [f"- job {j.name}: " + ", ".join(f"[{label}]({path.relative_to(directory).as_posix()})"
                                                  for label, path in found) for j, found in pictures if found]
    if failed:
        lines += ["", "Failed jobs:", ""]
        lines += [f"- job {j.name} ({_describe(j, keys)}): {j.error or 'unknown error'}" for j in failed]
    if damaged:
        lines += ["", "Damaged jobs:", ""]
        lines += [f"- job {j.name} ({_describe(j, keys)}): {j.error}" for j in damaged]
    if unfinished:
        lines += ["", "Unfinished jobs (no metrics.json yet):", ""]
        lines += [f"- job {j.name} ({_describe(j, keys)})" for j in unfinished]
    return "\n".join(lines) + "\n"


def _min_median(metric: str, values: list[float]) -> str:
    fmt = COLUMNS[metric][1]
    return f"{fmt.format(min(values))} / {fmt.format(statistics.median(values))}" if values else "–"


def _per_group(finished: list[Job], groups: list[str], metrics: tuple[str, ...], summarize) -> list[list[str]]:
    """One row per combination of the other swept keys: its values, how many seeds, and `summarize(metric,
    values)` of each metric over those seeds."""
    combos: dict[tuple, list[Job]] = {}
    for job in finished:
        combos.setdefault(tuple(job.overrides.get(k, "") for k in groups), []).append(job)
    rows = []
    for combo, members in combos.items():
        cells = []
        for metric in metrics:
            values = [v for v in (_number(m.metrics.get(metric)) for m in members) if v is not None]
            cells.append(summarize(metric, values))
        rows.append([*combo, str(len(members)), *cells])
    return rows


def _x_key(keys: list[str], jobs: list[Job]) -> str | None:
    candidates = [k for k in keys if k != "seed"] or keys
    numeric = [k for k in candidates if all(_number(j.overrides.get(k)) is not None for j in jobs)]
    scales = [k for k in numeric if "scale" in k]
    return (scales or numeric or candidates or [None])[0]


def plot(path: Path, jobs: list[Job], title: str = ""):
    """Each metric against the swept key (log axis for a scale, whole numbers for an integer key); one series
    per other key. A sweep over seeds alone has no axis: seeds are repeats, so each metric is shown as its
    distribution (every seed a point, the mean with one standard deviation). Returns the closed figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finished = [j for j in jobs if j.status == "finished"]
    keys = swept_keys(jobs)
    x_key = _x_key(keys, jobs)
    if x_key == "seed":
        fig = _plot_seed_distributions(plt, finished, title)
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
        plt.close(fig)
        return fig
    others = [k for k in keys if k not in (x_key, "seed")]
    numeric = x_key is not None and all(_number(j.overrides.get(x_key)) is not None for j in finished)
    whole = numeric and all(float(_number(j.overrides.get(x_key))).is_integer() for j in finished)
    categories = sorted({j.overrides.get(x_key, "") for j in finished}) if x_key and not numeric else []
    if x_key is None:
        positions = {j.name: i for i, j in enumerate(finished)}

    def x_of(job: Job) -> float:
        if x_key is None:
            return positions[job.name]
        value = job.overrides.get(x_key, "")
        return _number(value) if numeric else categories.index(value)

    series: dict[str, list[Job]] = {}
    for job in finished:
        series.setdefault(" ".join(f"{k}={job.overrides.get(k, '')}" for k in others), []).append(job)
    fig, axes = plt.subplots(2, 4, figsize=(16, 7), squeeze=False)
    for ax, metric in zip(axes.flat, PLOTTED):
        for label, members in series.items():
            points = [(x_of(j), _number(j.metrics.get(metric))) for j in members]
            points = [(x, y) for x, y in points if y is not None]
            if not points:
                continue
            xs = sorted({x for x, _ in points})
            means = [statistics.mean(y for x, y in points if x == xv) for xv in xs]
            line = ax.plot(xs, means, marker="o", label=label or None)[0]
            ax.scatter([x for x, _ in points], [y for _, y in points], s=12, alpha=0.5, color=line.get_color())
        ax.set_title(COLUMNS[metric][0])
        ax.set_xlabel(x_key or "job")
        if numeric and x_key and "scale" in x_key and all(_number(j.overrides.get(x_key)) > 0 for j in finished):
            ax.set_xscale("log")
        elif whole:  # an integer key gets its own values as ticks, not 1.5, 2.5, ...
            values = sorted({_number(j.overrides.get(x_key)) for j in finished})
            ax.set_xticks(values, [f"{v:g}" for v in values])
        if categories:
            ax.set_xticks(range(len(categories)), categories)
        elif x_key is None:
            ax.set_xticks(range(len(finished)), [j.name for j in finished])
        ax.grid(alpha=0.3)
        if numeric or categories or x_key is None:
            ax.ticklabel_format(axis="y", useOffset=False)
    for ax in axes.flat[len(PLOTTED):]:
        ax.set_visible(False)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if labels:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize="small")
    seeds = "; points: seeds, lines: their mean" if "seed" in keys else ""
    fig.suptitle(f"{title}: {len(finished)} finished job(s){seeds}", fontsize="small")
    fig.tight_layout(rect=(0, 0.06 if labels else 0, 1, 1))
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return fig


def _plot_seed_distributions(plt, finished: list[Job], title: str):
    """One panel per metric: each seed a point (spread sideways so equal values stay visible), the mean as a
    bar with one standard deviation."""
    fig, axes = plt.subplots(2, 4, figsize=(16, 7), squeeze=False)
    for ax, metric in zip(axes.flat, PLOTTED):
        values = [(j.overrides.get("seed", j.name), _number(j.metrics.get(metric))) for j in finished]
        values = [(seed, y) for seed, y in values if y is not None]
        ax.set_title(COLUMNS[metric][0])
        if values:
            ys = [y for _, y in values]
            offsets = [0.15 * ((i % 5) - 2) / 2 for i in range(len(ys))]
            ax.scatter(offsets, ys, s=24, alpha=0.8, zorder=3)
            for x, (seed, y) in zip(offsets, values):
                ax.annotate(str(seed), (x, y), textcoords="offset points", xytext=(5, 0), fontsize="x-small")
            spread = statistics.stdev(ys) if len(ys) > 1 else 0.0
            ax.errorbar([0.45], [statistics.mean(ys)], yerr=[spread], fmt="s", color="black", capsize=6)
        ax.set_xticks([0, 0.45], [f"{len(values)} seeds", "mean ± sd"])
        ax.set_xlim(-0.4, 0.7)
        ax.grid(alpha=0.3, axis="y")
        ax.ticklabel_format(axis="y", useOffset=False)
    for ax in axes.flat[len(PLOTTED):]:
        ax.set_visible(False)
    fig.suptitle(f"{title}: {len(finished)} finished job(s), the same settings over seeds "
                 f"(each point a seed, labelled with it)", fontsize="small")
    fig.tight_layout()
    return fig


def write_report(directory: str | Path, make_plot: bool = True) -> str:
    """Write report.md (and report.png) in `directory`; returns the markdown."""
    directory = Path(directory)
    jobs = find_jobs(directory)
    text = render(directory, jobs)
    # Replaced, never written through: a symlink planted as report.md (to ~/.bashrc, say) becomes our file.
    atomic_write(directory / "report.md", lambda f: f.write(text.encode()))
    if make_plot:
        plot(directory / "report.png", jobs, title=str(directory))
    return text
