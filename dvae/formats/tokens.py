"""The token set format: token grids in .npy shards, an index line per image, and meta.json.

A TOKENS directory holds:

    shard_00000.npy ...   [N, h, w] token grids (uint16 when K <= 65536), `--shard-size` images each
    index.jsonl           one line per image: {"i", "shard", "row", "source"} (the source file's path
                          relative to the image folder, or NAME/SPLIT/INDEX for a data config)
    meta.json             the model's fingerprint, K, grid size, image size and the data it came from

Each shard is written whole (temporary file + rename) before its index lines are appended, so a run
that stops leaves only complete shards, and the same command continues from the first missing one."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dvae.errors import ConfigError
from dvae.files import atomic_write

SHARD_NAME = "shard_{:05d}.npy"
INDEX_FILE = "index.jsonl"
META_FILE = "meta.json"


def token_dtype(K: int) -> np.dtype:
    """The smallest unsigned type that holds every token: uint16 for K <= 65536."""
    return np.dtype(np.uint16) if K <= 2**16 else np.dtype(np.uint32)


def first_shard(tokens: Path) -> np.ndarray:
    records = read_index(tokens, strict=True)
    return np.load(tokens / SHARD_NAME.format(records[0]["shard"] if records else 0), mmap_mode="r")


def _index_problem(record: Any) -> str | None:
    """What is wrong with one parsed index line, or None: it needs integer i, shard and row of at
    least 0 (a row of -1 would quietly pick another grid) and a source name."""
    if not isinstance(record, dict):
        return "not a JSON object"
    for key in ("i", "shard", "row"):
        value = record.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return f"{key}={_short(value)}, not an integer of at least 0"
    if not isinstance(record.get("source"), str):
        return f"source={_short(record.get('source'))}, not a file name"
    return None


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def read_index(out: Path, strict: bool = False) -> list[dict[str, Any]]:
    """The index lines up to the first broken one (a run stopped while appending). `strict` (reading
    the tokens back) refuses a broken line with a sentence naming the file and the line, unless it
    is a torn last line (no newline: an append that was cut short)."""
    records = []
    index = out / INDEX_FILE
    if not index.exists():
        return records
    try:
        text = index.read_text()
    except UnicodeDecodeError as error:
        if strict:
            raise ConfigError(f"{index} is not text ({error.reason}); the directory is damaged: run dvae-encode "
                              f"again into a new --out.") from error
        return records
    lines = text.splitlines()
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
            problem = "not JSON"
        else:
            problem = _index_problem(record)
        if problem:
            torn = number == len(lines) and not text.endswith("\n")
            if strict and not torn:
                raise ConfigError(f"{index} line {number} is damaged ({problem}); run dvae-encode again into a "
                                  f"new --out to redo the tokens.")
            break
        records.append(record)
    return records


def completed(out: Path) -> tuple[int, int]:
    """(images, shards) in complete shards: the shard file on disk and every one of its index lines.
    Leftovers of an interrupted run after them (a torn index line, a shard without its index lines)
    are removed, so that the run continues right after the last complete shard."""
    records = read_index(out)
    done = shard = 0
    while (out / SHARD_NAME.format(shard)).is_file():
        try:
            n = np.load(out / SHARD_NAME.format(shard), mmap_mode="r", allow_pickle=False).shape[0]
        except (OSError, ValueError):
            break
        block = records[done:done + n]
        if len(block) != n or any(r["shard"] != shard or r["row"] != k or r["i"] != done + k
                                  for k, r in enumerate(block)):
            break
        done, shard = done + n, shard + 1
    index = out / INDEX_FILE
    if index.exists() and len([line for line in index.read_text().splitlines() if line.strip()]) != done:
        text = "".join(json.dumps(r) + "\n" for r in records[:done])
        atomic_write(index, lambda f: f.write(text.encode()))
    for partial in out.glob(".shard_*.tmp"):  # a shard being written when the run was killed
        partial.unlink()
    for stale in out.glob("shard_*.npy"):
        if not stale.stem.split("_")[-1].isdigit() or int(stale.stem.split("_")[-1]) >= shard:
            stale.unlink()
    return done, shard


def clear_tokens(out: Path) -> None:
    """Remove what an earlier dvae-encode wrote in `out` (and nothing else)."""
    for path in [*out.glob("shard_*.npy"), *out.glob(".shard_*.tmp"), out / INDEX_FILE, out / META_FILE]:
        path.unlink(missing_ok=True)


def write_shard(out: Path, shard: int, tokens: np.ndarray, sources: list[str], first: int) -> None:
    """The shard file first (atomically), then its index lines: an index line is never ahead of its data."""
    atomic_write(out / SHARD_NAME.format(shard), lambda f: np.save(f, tokens, allow_pickle=False))
    lines = "".join(json.dumps({"i": first + row, "shard": shard, "row": row, "source": source}) + "\n"
                    for row, source in enumerate(sources))
    with open(out / INDEX_FILE, "a") as index:
        index.write(lines)
        index.flush()


def load_npy(path: Path) -> np.ndarray:
    """One array from a .npy file, or a ConfigError naming what the file is instead."""
    try:
        tokens = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"--tokens {path} could not be read as a .npy file ({reason}); pass a .npy file of "
                          f"[N, h, w] token grids or a directory written by dvae-encode.") from error
    if not isinstance(tokens, np.ndarray):  # np.load opens a .npz archive instead
        tokens.close()
        raise ConfigError(f"--tokens {path} is a .npz archive, not a .npy array; save the token grids with np.save, "
                          f"or pass a directory written by dvae-encode.")
    return tokens


def check_grid_shape(shape: tuple[int, ...], where: str, grid: list[int] | None = None) -> None:
    """Refuse [N, h, w] token grids of no cells, or other than the grid meta.json records."""
    if 0 in shape[1:]:
        raise ConfigError(f"{where} holds empty token grids (shape {list(shape)}); each grid needs h, w >= 1.")
    if grid is not None and list(shape[1:]) != list(grid):
        raise ConfigError(f"{where} holds {shape[1]}x{shape[2]} token grids but its meta.json says "
                          f"{grid[0]}x{grid[1]}; the directory is damaged: run dvae-encode again.")


def check_token_grids(tokens: np.ndarray, K: int, where: str, grid: list[int] | None = None) -> None:
    """Refuse token grids the model cannot decode, before any of them is: a wrong grid shape
    (`check_grid_shape`) or values outside [0, K)."""
    check_grid_shape(tokens.shape, where, grid)
    if tokens.size:
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= K:
            raise ConfigError(f"{where} holds token values in [{low}, {high}] but the model has K={K} codes "
                              f"(values 0 to {K - 1}); decode them with the model that made them.")


def tokens_meta(tokens: Path) -> dict[str, Any]:
    """meta.json of a TOKENS directory ({} for a .npy file or a directory without one)."""
    file = tokens / META_FILE
    if not file.is_file():
        return {}
    try:
        meta = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{file} is not valid JSON ({error}); run dvae-encode again.") from error
    if not isinstance(meta, dict):
        raise ConfigError(f"{file} is not a dvae-encode description; run dvae-encode again.")
    return meta


def check_tokens_fit_model(tokens: Path, config: dict[str, Any], model_dir: Path) -> dict[str, Any]:
    """The TOKENS directory's meta.json ({} for a .npy file), after the checks that need no weights:
    the tokens were made with as many codes as `--model` has (else they decode into nonsense, or fail
    half-way), every shard holds the grid meta.json records, and a .npy file's values are in [0, K)."""
    meta = tokens_meta(tokens)
    made_with = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    K = made_with.get("K")
    if K is not None and K != config["K"]:
        raise ConfigError(
            f"--tokens {tokens} were made by a model with K={K} codes ({made_with.get('path', 'see meta.json')}) "
            f"but --model {model_dir} has K={config['K']}; decode them with the model that made them."
        )
    if tokens.is_file():
        check_token_grids(next(iter_tokens(tokens))[0], config["K"], f"--tokens {tokens}")
        return meta
    require_index(tokens)
    for shard, records in sorted(by_shard(read_index(tokens, strict=True)).items()):
        file = tokens / SHARD_NAME.format(shard)
        try:
            shape = np.load(file, mmap_mode="r", allow_pickle=False).shape  # the header only
        except (OSError, ValueError) as error:
            raise ConfigError(f"{file} could not be read ({error}); run dvae-encode again with the same "
                              f"arguments to redo it.") from error
        check_grid_shape(shape, f"--tokens {tokens}", meta.get("grid"))
        check_rows(file, shape[0], records)
    return meta


def by_shard(records: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    by_shard: dict[int, list[dict[str, Any]]] = {}
    for record in records:
        by_shard.setdefault(record["shard"], []).append(record)
    return by_shard


def check_rows(shard_file: Path, n: int, records: list[dict[str, Any]]) -> None:
    """Every index line of a shard points at one of its `n` grids."""
    beyond = next((r for r in records if r["row"] >= n), None)
    if beyond is not None:
        raise ConfigError(f"{shard_file.parent / INDEX_FILE} is damaged: the line of {beyond['source']} points at "
                          f"row {beyond['row']} of {shard_file.name}, which holds {n} grids; run dvae-encode again "
                          f"into a new --out.")


def require_index(path: Path) -> None:
    if not (path / INDEX_FILE).is_file():
        raise ConfigError(
            f"--tokens {path} has no {INDEX_FILE}; pass a directory written by dvae-encode or a .npy file."
        )


def iter_tokens(path: str | Path) -> Iterator[tuple[np.ndarray, list[dict[str, Any]]]]:
    """(tokens [n, h, w], index records) per shard of a TOKENS directory, or once for a .npy file
    of [N, h, w] (or one [h, w]) token grids."""
    path = Path(path)
    if path.is_file():
        tokens = load_npy(path)
        tokens = tokens[None] if tokens.ndim == 2 else tokens
        if tokens.ndim != 3 or not np.issubdtype(tokens.dtype, np.integer):
            raise ConfigError(
                f"--tokens {path} holds a {tokens.dtype} array of shape {list(tokens.shape)}; it must hold "
                f"integer token grids [N, h, w]."
            )
        yield tokens, [{"i": i, "source": f"{i:06d}"} for i in range(len(tokens))]
        return
    require_index(path)
    for shard, rows in sorted(by_shard(read_index(path, strict=True)).items()):
        file = path / SHARD_NAME.format(shard)
        try:
            tokens = np.load(file, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise ConfigError(
                f"{file} could not be read ({error}); run dvae-encode again with the same arguments to redo it."
            ) from error
        check_rows(file, len(tokens), rows)
        yield tokens[[r["row"] for r in rows]], rows


def count_tokens(path: str | Path) -> int:
    """How many token grids `iter_tokens` yields, without reading them."""
    path = Path(path)
    if path.is_file():
        try:
            shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
        except (OSError, ValueError, AttributeError):  # AttributeError: a .npz archive has no shape
            return 0  # iter_tokens says what is wrong
        return 1 if len(shape) == 2 else (shape[0] if shape else 0)
    return len(read_index(path, strict=True)) if (path / INDEX_FILE).is_file() else 0


def load_tokens(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """All token grids of a TOKENS directory (or .npy file) as one [N, h, w] array, and the source of
    each: what a transformer trains on."""
    arrays, sources = [], []
    for tokens, records in iter_tokens(path):
        arrays.append(tokens)
        sources += [r["source"] for r in records]
    if not arrays:
        raise ConfigError(f"--tokens {path} holds no token grids yet; run dvae-encode first.")
    return np.concatenate(arrays), sources
