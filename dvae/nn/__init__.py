"""The network: residual blocks, encoder, decoder and the Gumbel-softmax codebook (torch only)."""
