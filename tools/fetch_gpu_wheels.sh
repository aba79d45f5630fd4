#!/usr/bin/env bash
# Download the wheels benchmarks/gpu_check.py needs beyond what a GPU machine has (Python 3.12 with torch,
# torchvision and numpy): the distributions `gpu_check.py --list-wheels` names, at the versions installed in
# .venv, built for CPython 3.12 on manylinux x86-64, into the git-ignored wheels/gpu_check (or the folder given).
# Fails, leaving the previous folder as it was, unless they fit the device machine's 64 MiB carry budget.
# On the GPU machine (docstring of benchmarks/gpu_check.py, README "GPU check"):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/gpu_check_site wheels/gpu_check/*.whl &&
#     PYTHONPATH=/tmp/gpu_check_site python3 benchmarks/gpu_check.py --json gpu_check.json
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
dest="${1:-wheels/gpu_check}"
limit=$((64 * 1024 * 1024))
mapfile -t wanted < <("$python" benchmarks/gpu_check.py --list-wheels)
part="$dest.part"
rm -rf "$part"
mkdir -p "$part"
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --abi cp312 --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any --dest "$part" "${wanted[@]}"
count=$(find "$part" -name '*.whl' | wc -l)
if [ "$count" -ne "${#wanted[@]}" ]; then
  echo "fetch_gpu_wheels: got $count wheels for ${#wanted[@]} distributions (${wanted[*]}) in $part" >&2
  exit 1
fi
size=$(du -cb "$part"/*.whl | tail -n 1 | cut -f 1)
if [ "$size" -gt "$limit" ]; then
  echo "fetch_gpu_wheels: the wheels take $size bytes, more than the 64 MiB ($limit bytes) a device run carries" >&2
  exit 1
fi
rm -rf "$dest"
mv "$part" "$dest"
ls -1 "$dest"
echo "fetch_gpu_wheels: $count wheels, $size bytes ($((size / 1024 / 1024)) MiB of 64 MiB) in $dest"
