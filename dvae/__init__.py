"""dvae: train discrete VAEs (DALL·E's image tokenizer) with the exact logit-Laplace objective."""

import os

# A CPU training step allocates activations of tens of MB afresh every step; backed by 4 KB pages each one
# costs thousands of page faults (about 230,000 per small-model step at 64 px). With this set, PyTorch's
# CPU allocator asks for transparent huge pages for allocations of 2 MB and more: 14x fewer faults, and
# the step reached 55% instead of 48% of the matmul peak (docs/benchmarks.md). PyTorch reads the variable
# once, at its first allocation, so it is set here, before dvae imports torch; a value the user set wins
# (THP_MEM_ALLOC_ENABLE=0 turns it off). Numerics are unchanged: only where the memory lives differs.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
