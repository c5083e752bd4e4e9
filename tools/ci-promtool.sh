#!/usr/bin/env bash
# CI: check the coordinator's /metrics with Prometheus' own linter, `promtool check metrics`,
# after a real 2-worker run, so the exposition is what a Prometheus server scrapes: names,
# types, HELP text, units and label sets as promtool wants them.
#
#   tools/ci-promtool.sh PATH/TO/distclip
#
# Installs Debian's `prometheus` package (which holds promtool) when promtool is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

bin=$(realpath "${1:?usage: tools/ci-promtool.sh PATH/TO/distclip}")
if ! command -v promtool >/dev/null; then
    echo "== installing promtool (Debian package prometheus)"
    sudo=()
    if [[ $(id -u) -ne 0 ]]; then sudo=(sudo); fi
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus ||
        { "${sudo[@]}" apt-get update -q &&
            "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus; }
fi
promtool --version | head -n1

work=$(mktemp -d /tmp/distclip-promtool.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

"$bin" synth --out "$work/data" --samples 64 --samples-per-shard 16 --seed 1 >/dev/null
# Port 0 everywhere: the coordinator writes the addresses it bound in its log.
"$bin" coordinator --data "$work/data/train/{00000..00003}.tar" --run-dir "$work/run" \
    --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 --keep-serving \
    --model tiny --batch-size 8 --max-steps 4 --min-workers 2 >"$work/coordinator.json" 2>"$work/coordinator.log" &
pids+=($!)
waited=0
until grep -q '^coordinator listening on ' "$work/coordinator.log"; do
    if ((waited >= 600)); then
        cat "$work/coordinator.log" >&2
        echo "ci-promtool: the coordinator did not start" >&2
        exit 1
    fi
    sleep 0.1
    waited=$((waited + 1))
done
grpc=$(sed -n 's/^coordinator listening on //p' "$work/coordinator.log" | head -n1)
http=$(sed -n 's/^coordinator http listening on //p' "$work/coordinator.log" | head -n1)

for i in 0 1; do
    "$bin" worker --coordinator "http://$grpc" --listen 127.0.0.1:0 --threads 1 \
        >"$work/worker-$i.json" 2>"$work/worker-$i.log" &
    pids+=($!)
done
for p in "${pids[@]:1}"; do
    wait "$p" || { cat "$work"/worker-*.log >&2; echo "ci-promtool: a worker failed" >&2; exit 1; }
done

curl -fsS "http://$http/metrics" >"$work/metrics.txt"
echo "ci-promtool: $(grep -c '^# TYPE ' "$work/metrics.txt") metric families from http://$http/metrics"
grep -q '^distclip_' "$work/metrics.txt" || { echo "ci-promtool: no distclip_ metrics" >&2; exit 1; }
promtool check metrics <"$work/metrics.txt"
echo "ci-promtool: promtool check metrics passed"
