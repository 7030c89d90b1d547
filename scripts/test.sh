#!/usr/bin/env bash
# Run the whole test suite: sets up .venv (with the test extras) on the first run.
#   scripts/test.sh            # everything
#   scripts/test.sh -k losses  # extra arguments go to pytest
DVAE_EXTRAS=test,sweep
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$root"
exec "$venv/bin/python" -m pytest "$@"
