#!/usr/bin/env bash
# Side-by-side train-step benchmark: OpenCLIP's own step (the anchor script in
# shared/bench/openclip_train_step.py) and `distclip bench train` on the same config, batch and
# thread count, one after the other in one run, so the ratio is measured on one machine state.
#
# Usage: tools/bench/train_step.sh ANCHOR_DIR CONFIG BATCH STEPS THREADS DISTCLIP [DISTCLIP_TCH]
#   ANCHOR_DIR    the folder holding openclip_train_step.py (shared/bench)
#   DISTCLIP      the flex build of distclip; DISTCLIP_TCH, optional, a `--features tch` build
# Needs ~/.cache/distclip-anchor-venv (torch==2.9.0, open_clip_torch==3.3.0).
set -euo pipefail
anchor_dir=$1 config=$2 batch=$3 steps=$4 threads=$5 distclip=$6 distclip_tch=${7:-}
py=${ANCHOR_PYTHON:-$HOME/.cache/distclip-anchor-venv/bin/python}

anchor=$("$py" "$anchor_dir/openclip_train_step.py" "$config" "$batch" "$steps" "$threads")
echo "openclip $anchor"
flex=$("$distclip" bench train --model "$config" --batch "$batch" --steps "$steps" --threads "$threads" --device flex 2>/dev/null)
echo "flex     $flex"
if [ -n "$distclip_tch" ]; then
    tch=$("$distclip_tch" bench train --model "$config" --batch "$batch" --steps "$steps" --threads "$threads" --device cpu 2>/dev/null)
    echo "tch      $tch"
fi
"$py" - "$anchor" "$flex" "${tch:-}" <<'PY'
import json, sys
a = json.loads(sys.argv[1])
for name, raw in (("flex", sys.argv[2]), ("tch", sys.argv[3])):
    if raw:
        d = json.loads(raw)
        print(f"{name}: {d['samples_per_s']:.2f} samples/s vs OpenCLIP {a['samples_per_s']:.2f} -> {d['samples_per_s'] / a['samples_per_s']:.2f}x")
PY
