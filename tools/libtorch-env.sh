# shellcheck shell=bash
# Source this to build and run distclip's `tch` feature against the libtorch inside
# `pip install torch==2.9.0` (burn-tch 0.22 / tch 0.22 check for exactly 2.9.0).
# Idempotent: the virtualenv is created and torch installed only when missing.
# Override the location with DISTCLIP_TORCH_VENV.
venv="${DISTCLIP_TORCH_VENV:-$HOME/.cache/distclip-anchor-venv}"
if ! "$venv/bin/python" -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.9.0") else 1)' 2>/dev/null; then
    echo "installing torch==2.9.0 into $venv (once; several GB)" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet torch==2.9.0
fi
export PATH="$venv/bin:$PATH"
export VIRTUAL_ENV="$venv"
export LIBTORCH_USE_PYTORCH=1
torch_lib="$("$venv/bin/python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
