#!/usr/bin/env bash
# Run the whole test suite: sets up .venv (with the test extras) on the first run.
#   scripts/test.sh            # everything
#   scripts/test.sh -k losses  # extra arguments go to pytest
# ruff checks the code first: a lint error fails the suite.
DVAE_EXTRAS=test,sweep
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$root"
"$venv/bin/ruff" check --quiet dvae tests scripts || { echo "ruff found the problems above; fix them (ruff check --fix fixes many)" >&2; exit 1; }
exec "$venv/bin/python" -m pytest "$@"
