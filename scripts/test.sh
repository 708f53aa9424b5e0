#!/usr/bin/env bash
# Install MyPT with its test extras into .venv and run the tests: the README's test command and
# what CI runs. Arguments go to pytest (e.g. `bash scripts/test.sh -m "not slow"`).
#
# Besides Python packages the tests use two system packages: Chromium, which drives the page of
# `mypt serve` (Playwright cannot download its own browser here), and a C++ compiler for the
# --compile test (torch.compile on a CPU). Missing ones are installed with apt-get when this runs
# as root (or with sudo that needs no password); otherwise the script names them and stops.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v g++ >/dev/null 2>&1 || command -v c++ >/dev/null 2>&1 || missing+=(g++ libc6-dev)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ]; then
        as_root=()
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        as_root=(sudo -n)
    else
        echo "error: the tests need these system packages: ${missing[*]}; install them (Debian/Ubuntu:" \
             "sudo apt-get install ${missing[*]}) and run this again" >&2
        exit 2
    fi
    echo "installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    "${as_root[@]}" apt-get update -qq >/dev/null
    "${as_root[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The torch release MyPT is tested on, named explicitly: an unpinned install could pull a
# multi-GB CUDA build. The package itself accepts a range (pyproject.toml).
python -m pip install -q torch==2.13.0 -e ".[test]"
# Two workers (pytest-xdist): many tests wait on a subprocess or a server, so even 2 cores do
# nearly twice the work in the wall time of one; `-n 0` among the arguments runs one process.
python -m pytest -q -n 2 "$@"
