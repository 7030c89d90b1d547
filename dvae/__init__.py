"""dvae: train discrete VAEs (DALL·E's image tokenizer) with the exact logit-Laplace objective."""

__version__ = "0.1.0"
