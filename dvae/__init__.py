"""dvae: train discrete VAEs (DALL·E's image tokenizer) with the exact logit-Laplace objective."""

import os

# A CPU training step allocates activations of tens of MB afresh every step; backed by 4 KB pages each one
# costs thousands of page faults (about 230,000 per small-model step at 64 px). With this set, PyTorch's
# CPU allocator asks for transparent huge pages for allocations of 2 MB and more: 14x fewer faults, and
# the small model at 64 px went from 48% to 55% of the matmul peak (medians of three runs alternated with
# it off, docs/benchmarks.md). PyTorch reads the variable once, at the process's first CPU tensor, so it is
# set on import: for this process and the processes it starts. Costs: allocations are page-aligned, and
# memory is handed out in 2 MB pages where the kernel allows, so resident memory can be slightly higher.
# Numerics are unchanged. A value the user set wins: THP_MEM_ALLOC_ENABLE=0 turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from dvae.formats.openai import load_openai  # noqa: E402
from dvae.model import DVAE, DVAEConfig  # noqa: E402
from dvae.version import __version__  # noqa: E402

__all__ = ["DVAE", "DVAEConfig", "load_openai", "__version__"]
