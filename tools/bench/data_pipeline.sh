#!/usr/bin/env bash
# Side-by-side input-pipeline benchmark on the same shards, one after the other in one run:
#   - OpenCLIP's own pipeline (shared/bench/openclip_data_pipeline.py: webdataset, PIL decode,
#     RandomResizedCrop, normalise, tokenize; one process, one torch thread), the anchor;
#   - `distclip bench data --threads 1` and `--threads 2` (the train path);
#   - decoding alone, the limit: `distclip bench data --decode-only --threads 1` (distclip's
#     decoder), and PIL's decode + RGB convert over the same webdataset stream.
# Every command runs twice; the second (warm page cache) is the figure.
#
# Usage: tools/bench/data_pipeline.sh ANCHOR_DIR SPEC DISTCLIP [IMAGE_SIZE]
#   ANCHOR_DIR  the folder holding openclip_data_pipeline.py (shared/bench)
#   SPEC        shards from shared/bench/make_photo_shards.py, e.g. 'DIR/{00000..00007}.tar'
#   DISTCLIP    a release build of distclip
# Needs ~/.cache/distclip-anchor-venv (torch, open_clip_torch, webdataset); ANCHOR_PYTHON overrides.
set -euo pipefail
anchor_dir=$1 spec=$2 distclip=$3 size=${4:-224}
py=${ANCHOR_PYTHON:-$HOME/.cache/distclip-anchor-venv/bin/python}

twice() { "$@" >/dev/null 2>&1; "$@" 2>/dev/null; }

anchor=$(twice "$py" "$anchor_dir/openclip_data_pipeline.py" "$spec" "$size")
echo "openclip        $anchor"
t1=$(twice "$distclip" bench data "$spec" --threads 1 --image-size "$size")
echo "distclip t=1    $t1"
t2=$(twice "$distclip" bench data "$spec" --threads 2 --image-size "$size")
echo "distclip t=2    $t2"
dec=$(twice "$distclip" bench data "$spec" --threads 1 --image-size "$size" --decode-only)
echo "decode (ours)   $dec"
# (A file, not a heredoc: `twice` runs it twice and a heredoc feeds only the first run.)
pil_script=$(mktemp --suffix=.py)
trap 'rm -f "$pil_script"' EXIT
cat >"$pil_script" <<'PY'
import json, sys, time, webdataset as wds
ds = wds.WebDataset(sys.argv[1], shardshuffle=False).decode("pilrgb").to_tuple("jpg")
n = 0; t = time.perf_counter()
for (img,) in ds: n += 1
dt = time.perf_counter() - t
print(json.dumps({"samples": n, "seconds": dt, "samples_per_s": n / dt}))
PY
pil=$(twice "$py" "$pil_script" "$spec")
echo "decode (PIL)    $pil"
"$py" - "$anchor" "$t1" "$t2" "$dec" "$pil" <<'PY'
import json, sys
a, t1, t2, dec, pil = (json.loads(x) for x in sys.argv[1:])
base = a["samples_per_s_per_core"]
print(f"OpenCLIP pipeline:         {base:8.1f} samples/s per core")
print(f"distclip, 1 thread:        {t1['samples_per_s']:8.1f} samples/s -> {t1['samples_per_s'] / base:.2f}x OpenCLIP per core")
print(f"distclip, 2 threads:       {t2['samples_per_s']:8.1f} samples/s ({t2['samples_per_s'] / 2:.1f} per thread) -> {t2['samples_per_s'] / 2 / base:.2f}x OpenCLIP per core")
print(f"decode alone, distclip:    {dec['samples_per_s']:8.1f} samples/s -> pipeline takes {dec['samples_per_s'] / t1['samples_per_s']:.2f}x decode-alone time")
print(f"decode alone, PIL:         {pil['samples_per_s']:8.1f} samples/s -> OpenCLIP takes {pil['samples_per_s'] / base:.2f}x its decode-alone time")
PY
