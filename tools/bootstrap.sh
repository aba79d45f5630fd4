#!/usr/bin/env bash
# Create .venv/ in the checkout with plain pip and install the project with its pinned dependencies.
# Idempotent: re-installs only when pyproject.toml changed. AUTOSSVH_FAISS=gpu installs faiss-gpu instead of
# faiss-cpu (they provide the same module; never both).
set -euo pipefail
cd "$(dirname "$0")/.."
faiss_extra="${AUTOSSVH_FAISS:-cpu}"
case "$faiss_extra" in cpu|gpu) ;; *) echo "AUTOSSVH_FAISS must be cpu or gpu, got '$faiss_extra'" >&2; exit 2;; esac
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv with $("$python" --version)" >&2
  "$python" -m venv .venv
fi
stamp=".venv/.autossvh-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $faiss_extra"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "bootstrap: installing the project into .venv (extras: $faiss_extra,test)" >&2
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[$faiss_extra,test]"
  .venv/bin/python -c "import matplotlib.font_manager"  # build matplotlib's font cache now, not in a job
  echo "$want" > "$stamp"
fi
