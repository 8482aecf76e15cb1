#!/usr/bin/env bash
# Separate virtual environments the test suite drives as real clients, built once per machine:
#   clip-retrieval 2.45 (its ClipClient talks to clipsearch's clip back API in tests/serve/test_clip_back.py).
# They live outside the repository (shared by every clone and worktree), in
# ${CLIPSEARCH_TEST_VENVS:-~/.cache/clipsearch/test-venvs}; a venv is rebuilt when its requirements change.
# Prints the venv's path. Usage: scripts/install-test-venvs.sh [clip-retrieval]
set -euo pipefail
root="${CLIPSEARCH_TEST_VENVS:-${XDG_CACHE_HOME:-$HOME/.cache}/clipsearch/test-venvs}"
name="${1:-clip-retrieval}"
case "$name" in
  clip-retrieval) reqs=(torch==2.14.1 torchvision==0.29.1 clip-retrieval==2.45.0 "setuptools<81") ;;
  *) echo "install-test-venvs: unknown venv $name" >&2; exit 2 ;;
esac
python="${PYTHON:-python3}"
key="$(printf '%s\n' "${reqs[@]}" "$("$python" -c 'import sys; print(sys.version_info[:2])')" | sha256sum | cut -c1-12)"
venv="$root/$name-$key"
mkdir -p "$root"
exec 9>"$root/.$name.lock"
flock 9   # one build at a time; the others wait and reuse it
if [ ! -f "$venv/.complete" ]; then
  rm -rf "$venv"
  echo "install-test-venvs: building $venv (${reqs[*]}), a few minutes" >&2
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "${reqs[@]}" >&2
  touch "$venv/.complete"
fi
echo "$venv"
