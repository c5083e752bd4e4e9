#!/usr/bin/env bash
# Collective bandwidth on loopback, side by side in one run: raw TCP (the ceiling),
# torch.distributed gloo all-reduce (the anchor) and `distclip bench collective` over both of
# its transports (framed TCP, gRPC streams). Prints one JSON line per measurement and a table of
# ratios at the end.
#
# Usage: tools/bench/collective.sh SHARED_BENCH_DIR DISTCLIP_BIN [BYTES] [ITERS] [WORKERS...]
#   e.g. tools/bench/collective.sh ../shared/bench $CARGO_TARGET_DIR/release/distclip 67108864 10 2 4
set -euo pipefail
bench=${1:?shared bench dir}; bin=${2:?distclip binary}; bytes=${3:-67108864}; iters=${4:-10}
workers=("${@:5}"); [ ${#workers[@]} -eq 0 ] && workers=(2 4)
py=${PYTHON:-$HOME/.cache/distclip-anchor-venv/bin/python}
out=$(mktemp); trap 'rm -f "$out"' EXIT
run() { echo "+ $*" >&2; "$@" 2>/dev/null | tail -n 1 | tee -a "$out"; }
echo "# $(date -u +%FT%TZ) $(nproc) cores, $(uname -r), bytes=$bytes iters=$iters" >&2
run "$py" "$bench/tcp_loopback.py" "$bytes" >/dev/null
for w in "${workers[@]}"; do
  run "$py" "$bench/gloo_allreduce.py" "$w" "$bytes" "$iters" >/dev/null
  for t in tcp grpc; do
    run "$bin" bench collective --workers "$w" --bytes "$bytes" --op all_reduce --iters "$iters" --transport "$t" >/dev/null
  done
  run "$bin" bench collective --workers "$w" --bytes "$bytes" --op all_gather --iters "$iters" --transport tcp >/dev/null
done
cat "$out"
"$py" - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
tcp = next(r["GBps"] for r in rows if "GBps" in r)
gloo = {r["world"]: r["busbw_GBps"] for r in rows if "world" in r}
print(f"\nraw loopback TCP: {tcp:.3f} GB/s")
print("| system | op | workers | busbw GB/s | algbw GB/s | s/op | vs gloo | vs raw TCP |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
for r in rows:
    if "world" in r:
        print(f"| gloo (torch 2.9.0) | all_reduce | {r['world']} | {r['busbw_GBps']:.3f} | {r['algbw_GBps']:.3f} | {r['seconds']:.4f} | 1.00x | {r['busbw_GBps']/tcp:.0%} |")
    elif r.get("bench") == "collective":
        g = gloo.get(r["workers"])
        vs = f"{r['busbw_GBps']/g:.2f}x" if g and r["op"] == "all_reduce" else ""
        print(f"| distclip {r['transport']} | {r['op']} | {r['workers']} | {r['busbw_GBps']:.3f} | {r['algbw_GBps']:.3f} | {r['seconds']:.4f} | {vs} | {r['busbw_GBps']/tcp:.0%} |")
PY
