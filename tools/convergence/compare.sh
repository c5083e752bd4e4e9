#!/usr/bin/env bash
# Convergence against OpenCLIP: the demo's tiny CLIP trained by distclip and by OpenCLIP's own
# trainer on the same synthetic shards with the same hyperparameters, both measured on the same
# held-out split by the same evaluation code (`distclip eval`).
#
#   tools/convergence/compare.sh DISTCLIP_BIN WORK_DIR [SEED...]      (seeds default: 0 1 2)
#
# Per seed S, in WORK_DIR/seed-S:
#   1. `distclip demo --out WORK_DIR/seed-S --seed S`: synthesises the dataset into data/
#      (4000 train + 500 held-out samples, 250 per shard, 32 px), trains with 2 workers x 32
#      for 12 epochs (lr 2e-3, warmup 50, cosine, AdamW 0.9/0.98/1e-6, wd 0.2, RandomResizedCrop
#      0.9-1, shuffled, seed S) and prints the zero-shot colour top-1 after training;
#   2. `distclip eval` of distclip's final weights on data/zeroshot.json (colour and shape);
#   3. tools/convergence/openclip_train.py on the same data/ with seed S (OpenCLIP 3.3.0's
#      open_clip_train.main, global batch 64, the same hyperparameters), whose final weights are
#      evaluated by `distclip eval` and, as a cross-check, by OpenCLIP's zero-shot classifier;
#   4. a control for the initial draw: OpenCLIP again, started from the very weights distclip's
#      run started from (a one-step distclip run at lr 0 writes them; its parameter checksum
#      must equal the demo run's at step 0), so that this pair differs only in sample order and
#      crops. CONTROL=0 skips it.
# zeroshot.json's prompts read like the training captions ("a {} circle at the top left",
# ensembled over the attributes not classified). As a diagnostic every model is also evaluated
# with the short prompts earlier versions of `distclip synth` wrote ("a {} circle",
# data/zeroshot-short.json), and summarize.py prints the tables (per seed, mean ± sd, differences in points) and writes
# WORK_DIR/results.json.
#
# Needs the anchor venv (torch 2.9.0, open_clip_torch 3.3.0, webdataset): PY overrides its
# python. OpenCLIP runs with one torch thread (OC_THREADS), as each distclip worker computes with
# one (`--threads 1` in the demo): on a loaded 2-core machine two OpenMP threads made OpenCLIP's
# step ten times slower, and the thread count does not change what is computed.
# RESUME=1 keeps the results of steps already done in WORK_DIR. OPENCLIP_FROM=OLD_WORK_DIR takes
# OpenCLIP's trained weights from an earlier compare.sh run instead of training again (hours on
# 2 cores), after checking that seed S's training shards are byte-identical to that run's (the
# dataset is a pure function of the seed); they are evaluated again with this run's zeroshot.json.
# The control (4.) depends on distclip's initial weights and is not reused.
set -euo pipefail

BIN=${1:?usage: compare.sh DISTCLIP_BIN WORK_DIR [SEED...]}
WORK=${2:?usage: compare.sh DISTCLIP_BIN WORK_DIR [SEED...]}
shift 2
SEEDS=("$@")
[ ${#SEEDS[@]} -gt 0 ] || SEEDS=(0 1 2)
PY=${PY:-$HOME/.cache/distclip-anchor-venv/bin/python}
OC_THREADS=${OC_THREADS:-1}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BIN=$(realpath "$BIN")
mkdir -p "$WORK"
WORK=$(realpath "$WORK")

log() { echo "compare: $*" >&2; }
checksum_at_step0() { head -n 1 "$1" | grep -o '"params_checksum":"[0-9a-f]*"'; }

for S in "${SEEDS[@]}"; do
  D=$WORK/seed-$S
  if [ "${RESUME:-0}" != 1 ]; then rm -rf "$D"; fi
  mkdir -p "$D"

  if [ ! -s "$D/demo.json" ]; then
    log "seed $S: distclip demo (data and distclip run in $D)"
    rm -rf "$D/data" "$D/run" "$D"/openclip* "$D"/init-run* "$D"/*eval.json
    t0=$(date +%s)
    "$BIN" demo --out "$D" --seed "$S" > "$D/demo.stdout" 2> "$D/demo.stderr"
    echo "$(( $(date +%s) - t0 ))" > "$D/distclip.seconds"
    tail -n 1 "$D/demo.stdout" > "$D/demo.json"
  fi
  log "seed $S: $(cat "$D/demo.json")"
  if [ ! -s "$D/distclip-eval.json" ]; then
    "$BIN" eval --model tiny --checkpoint "$D/run/checkpoints/final/model.safetensors" \
        --zeroshot "$D/data/zeroshot.json" 2> "$D/distclip-eval.stderr" | tail -n 1 > "$D/distclip-eval.json"
  fi
  log "seed $S: distclip weights, distclip eval: $(cat "$D/distclip-eval.json")"

  if [ ! -s "$D/openclip.json" ]; then
    log "seed $S: OpenCLIP on the same shards"
    rm -rf "$D/openclip"
    t0=$(date +%s)
    reuse=()
    if [ -n "${OPENCLIP_FROM:-}" ]; then
      old=$OPENCLIP_FROM/seed-$S
      for f in "$D"/data/train/*.tar; do
        cmp -s "$f" "$old/data/train/$(basename "$f")" || { log "seed $S: $f differs from $old's, cannot reuse"; exit 1; }
      done
      reuse=(--reuse "$old/openclip")
    fi
    "$PY" "$HERE/openclip_train.py" --data "$D/data" --out "$D/openclip" --seed "$S" --threads "$OC_THREADS" \
        --distclip "$BIN" "${reuse[@]}" > "$D/openclip.stdout" 2> "$D/openclip.stderr"
    echo "$(( $(date +%s) - t0 ))" > "$D/openclip.seconds"
    if [ -n "${OPENCLIP_FROM:-}" ]; then cp "$old/openclip.seconds" "$D/openclip.seconds"; fi
    tail -n 1 "$D/openclip.stdout" > "$D/openclip.json"
  fi
  log "seed $S: $(cat "$D/openclip.json")"

  if [ "${CONTROL:-1}" = 1 ] && [ ! -s "$D/openclip-dcinit.json" ]; then
    log "seed $S: OpenCLIP from distclip's initial weights"
    rm -rf "$D/init-run" "$D/openclip-dcinit"
    # One step at lr 0: AdamW moves nothing and decoupled decay (lr x wd) is 0, so the final
    # checkpoint is the initial model of a run with train.seed = S.
    spec=$(sed -n 's/^train = "\(.*\)"$/\1/p' "$D/run/config.toml")
    "$BIN" launch --workers 1 --data "$spec" --run-dir "$D/init-run" --model tiny --threads 1 --data-threads 1 \
        --batch-size 64 --lr 0 --warmup 50 --seed "$S" --max-steps 1 > /dev/null 2> "$D/init-run.log"
    a=$(checksum_at_step0 "$D/init-run/metrics.jsonl"); b=$(checksum_at_step0 "$D/run/metrics.jsonl")
    if [ "$a" != "$b" ]; then log "seed $S: initial weights differ from the demo run's ($a, $b)"; exit 1; fi
    t0=$(date +%s)
    "$PY" "$HERE/openclip_train.py" --data "$D/data" --out "$D/openclip-dcinit" --seed "$S" --threads "$OC_THREADS" \
        --init "$D/init-run/checkpoints/final/model.safetensors" --distclip "$BIN" \
        > "$D/openclip-dcinit.stdout" 2> "$D/openclip-dcinit.stderr"
    echo "$(( $(date +%s) - t0 ))" > "$D/openclip-dcinit.seconds"
    tail -n 1 "$D/openclip-dcinit.stdout" > "$D/openclip-dcinit.json"
    log "seed $S: $(cat "$D/openclip-dcinit.json")"
  fi

  # A diagnostic beside the demo's metric: the same held-out images and classes, with the short
  # prompts earlier versions of `distclip synth` wrote ("a {} circle", ensembled over the other
  # attribute), which end where no training caption ends. Same evaluation code, both sides'
  # weights.
  "$PY" - "$D/data" <<'EOF'
import json, sys
from pathlib import Path
data = Path(sys.argv[1])
zs, cl = json.loads((data / "zeroshot.json").read_text()), json.loads((data / "classes.json").read_text())
shapes, colours = cl["shape"], cl["colour"]
templates = {"shape": [f"a {c} {{}}" for c in colours], "colour": [f"a {{}} {s}" for s in shapes]}
for t in zs["tasks"]:
    t["templates"] = templates[t["name"]]
(data / "zeroshot-short.json").write_text(json.dumps(zs, indent=1) + "\n")
EOF
  for side in distclip openclip; do
    ckpt=$D/run/checkpoints/final/model.safetensors
    [ $side = openclip ] && ckpt=$D/openclip/open_clip_model.safetensors
    if [ ! -s "$D/$side-short-eval.json" ]; then
      "$BIN" eval --model tiny --checkpoint "$ckpt" --zeroshot "$D/data/zeroshot-short.json" 2>/dev/null \
          | tail -n 1 > "$D/$side-short-eval.json"
    fi
  done
done

"$PY" "$HERE/summarize.py" "$WORK" "${SEEDS[@]}"
