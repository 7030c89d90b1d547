#!/usr/bin/env bash
# Train a dVAE: sets up .venv on the first run, then runs dvae-train with your Hydra overrides.
#   scripts/train.sh                                  # the default: tiny model, bundled photos, CPU
#   scripts/train.sh data=shapes trainer.max_steps=500
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
exec "$venv/bin/dvae-train" "$@"
