"""dvae: train discrete VAEs (DALL·E's image tokenizer) with the exact logit-Laplace objective."""

import os

# A CPU training step allocates tens of MB of activations afresh every step; on 4 KB pages that is a storm
# of page faults, so PyTorch's CPU allocator is asked for huge pages (measured in docs/benchmarks.md).
# PyTorch reads the variable once, at the first CPU tensor, hence on import. The user's value wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from dvae.version import __version__  # noqa: E402

__all__ = ["DVAE", "DVAEConfig", "load_openai", "__version__"]


def __getattr__(name: str):
    """The public names load on first use: `import dvae.cli.report` need not import torch and the model."""
    if name in ("DVAE", "DVAEConfig"):
        from dvae import model

        return getattr(model, name)
    if name == "load_openai":
        from dvae.formats.openai import load_openai

        return load_openai
    raise AttributeError(f"module 'dvae' has no attribute {name!r}")
