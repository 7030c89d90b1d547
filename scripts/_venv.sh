# Sourced by train.sh and test.sh: create .venv if absent and install the package into it.
# Re-installs only when pyproject.toml changed since the last install.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "dvae needs Python 3.10 or newer; set PYTHON=/path/to/python3.10+" >&2
  exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "creating $venv" >&2
  "$python" -m venv "$venv"
fi
stamp="$venv/.dvae-installed-${DVAE_EXTRAS:-base}"
extras="${DVAE_EXTRAS:-}"
want="$(cksum < "$root/pyproject.toml")"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "installing dvae${extras:+[$extras]} into $venv (the first time takes a few minutes: torch is large)" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$root${extras:+[$extras]}" 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" >&2 || true
  "$venv/bin/python" -c "import dvae.cli.train" || { echo "installing dvae failed; see the pip output above" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
