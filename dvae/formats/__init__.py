"""Files made with a model: token sets (encode, decode), a training checkpoint -> an export, the official DALL·E
weights. Torch only."""
