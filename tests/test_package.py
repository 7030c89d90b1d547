"""The package's shape: the public API, no import circle, no layer importing one above it, the
torch-only layers loading without Lightning or Hydra, and what `import dvae` sets up (huge pages)."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGE = ROOT / "dvae"

# Lower layers first; a module may import its own layer and those before it. The model reads and writes
# its own export format (pretrained); the other formats use the model.
LAYERS = [
    ("dvae.version", "dvae.errors", "dvae.files", "dvae.nll_kernel", "dvae.losses", "dvae.schedules"),
    ("dvae.nn",),
    ("dvae.data",),
    ("dvae.pretrained",),
    ("dvae.model",),
    ("dvae.formats",),
    ("dvae.training",),
    ("dvae.cli",),
]
TORCH_ONLY = ("dvae", "dvae.model", "dvae.pretrained", "dvae.losses", "dvae.nll_kernel", "dvae.schedules", "dvae.nn",
              "dvae.formats")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The dvae modules `path` imports, at the top or inside a function: `from dvae.x import y` counts as
    dvae.x.y where that is a module, else as dvae.x."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):  # imports for type annotations only run no code
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            node.body = []
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("dvae")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dvae"):
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                found.add(name if name in known else node.module)
    return found & known


def layer_of(module: str) -> int:
    best = None
    for rank, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and (best is None or len(name) > len(best[1])):
                best = (rank, name)
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS"
    return best[0]


def test_the_public_api():
    import dvae

    assert {"DVAE", "DVAEConfig", "load_openai", "__version__"} <= set(dvae.__all__)
    from dvae import DVAE, DVAEConfig, load_openai  # noqa: F401

    assert DVAE.__module__ == "dvae.model"


def test_no_module_imports_a_layer_above_its_own():
    modules = all_modules()
    upward = []
    for name, path in modules.items():
        if name == "dvae":  # the public API gathers names from every layer
            continue
        for target in imports_of(path, set(modules)):
            if target != "dvae" and layer_of(target) > layer_of(name):
                upward.append(f"{name} -> {target}")
    assert upward == []


def test_there_is_no_import_circle():
    modules = all_modules()
    graph = {name: imports_of(path, set(modules)) - {name, "dvae"} for name, path in modules.items()}
    graph = {name: {t for t in targets if not name.startswith(t + ".")} for name, targets in graph.items()}
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            assert state.get(target) != "open", " -> ".join([*trail, node, target])
            if target not in state:
                visit(target, [*trail, node])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_the_torch_only_layers_load_without_lightning_or_hydra():
    modules = sorted(name for name in all_modules()
                     if any(name == p or name.startswith(p + ".") for p in TORCH_ONLY if p != "dvae") or name == "dvae")
    script = (f"import importlib, sys\nfor name in {modules!r}:\n    importlib.import_module(name)\n"
              "print(sorted(n for n in ('lightning', 'pytorch_lightning', 'hydra', 'omegaconf') if n in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[]"]
    assert "dvae.nn.codebook" in modules and "dvae.formats.tokens" in modules


HUGE_PAGE_FLAG_OF_A_TENSOR = """
import dvae, os, torch
tensor = torch.empty(64 << 20, dtype=torch.uint8)
lines = open("/proc/self/smaps").read().splitlines()
starts = [i for i, line in enumerate(lines) if "-" in line.split(" ")[0] and ":" not in line.split(" ")[0]]
for i, j in zip(starts, starts[1:] + [len(lines)]):
    low, high = (int(a, 16) for a in lines[i].split()[0].split("-"))
    if low <= tensor.data_ptr() < high:
        flags = next(line for line in lines[i:j] if line.startswith("VmFlags:")).split()[1:]
print(os.environ["THP_MEM_ALLOC_ENABLE"], "hg" in flags)
"""


def _run_python(code: str, env: dict) -> str:
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage").is_dir(), reason="no transparent huge pages")
def test_importing_dvae_first_asks_for_huge_pages_for_large_cpu_tensors():
    """`import dvae` sets THP_MEM_ALLOC_ENABLE=1: torch then madvises allocations of 2 MB and more for
    transparent huge pages (14x fewer page faults per step), which the kernel shows as the "hg" flag of
    the tensor's mapping. A fresh process: torch reads the variable once."""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    assert _run_python(HUGE_PAGE_FLAG_OF_A_TENSOR, env).split() == ["1", "True"]


def test_a_huge_page_setting_the_user_made_is_kept():
    env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "0"}
    assert _run_python("import dvae, os; print(os.environ['THP_MEM_ALLOC_ENABLE'])", env).split() == ["0"]


def test_a_light_command_does_not_import_torch():
    """The public names of `dvae` load on first use, so dvae-report (tables and plots) starts without torch."""
    script = "import sys, dvae.cli.report; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False"]
