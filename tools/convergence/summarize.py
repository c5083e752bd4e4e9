#!/usr/bin/env python3
"""The tables of compare.sh from the files it leaves in WORK_DIR/seed-S (see compare.sh).

    python3 tools/convergence/summarize.py WORK_DIR SEED...

Prints Markdown: the demo's metric (held-out zero-shot top-1 with zeroshot.json's prompts, colour
and shape) per seed for distclip, OpenCLIP, and OpenCLIP started from distclip's initial weights,
then mean ± sd (sample sd) and the differences in points; then the diagnostics (OpenCLIP's own
zero-shot classifier on OpenCLIP's weights, the short prompts of earlier versions for both,
training times).
Also writes WORK_DIR/results.json. Standard library only.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path


def load(path: Path):
    return json.loads(path.read_text()) if path.exists() and path.stat().st_size else None


def top1(evaljson, task):
    return None if evaljson is None else evaljson["zeroshot"][task]["top1"]


def pts(x):
    return "" if x is None else f"{100 * x:.1f}"


def ms(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return ""
    m = statistics.mean(xs)
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{100 * m:.1f} ± {100 * sd:.1f}"


def diff(a, b):
    return None if a is None or b is None else a - b


def signed(x):
    return "" if x is None else f"{100 * x:+.1f}"


def main() -> None:
    work, seeds = Path(sys.argv[1]), sys.argv[2:]
    rows = []
    for s in seeds:
        d = work / f"seed-{s}"
        demo = load(d / "demo.json")
        oc = load(d / "openclip.json")
        oci = load(d / "openclip-dcinit.json")
        row = {"seed": int(s), "before_colour": demo["zero_shot_top1_before"]}
        dc_eval = load(d / "distclip-eval.json")
        for task in ("colour", "shape"):
            row[f"distclip_{task}"] = top1(dc_eval, task)
            row[f"openclip_{task}"] = oc["distclip_eval"][task] if oc else None
            row[f"openclip_dcinit_{task}"] = oci["distclip_eval"][task] if oci else None
            row[f"openclip_{task}_openclip_eval"] = oc["openclip_eval"][task] if oc else None
            row[f"distclip_{task}_short"] = top1(load(d / "distclip-short-eval.json"), task)
            row[f"openclip_{task}_short"] = top1(load(d / "openclip-short-eval.json"), task)
        row["demo_after_colour"] = demo["zero_shot_top1_after"]
        for side in ("distclip", "openclip", "openclip-dcinit"):
            f = d / f"{side}.seconds"
            row[f"{side}_s"] = int(f.read_text()) if f.exists() else None
        rows.append(row)
    (work / "results.json").write_text(json.dumps(rows, indent=1) + "\n")

    print("Held-out zero-shot top-1 (%), zeroshot.json prompts, `distclip eval` for every model:\n")
    print("| seed | task | distclip | OpenCLIP | distclip − OpenCLIP | OpenCLIP from distclip's init | distclip − that |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for task in ("colour", "shape"):
        for r in rows:
            dc, oc, oci = r[f"distclip_{task}"], r[f"openclip_{task}"], r[f"openclip_dcinit_{task}"]
            print(f"| {r['seed']} | {task} | {pts(dc)} | {pts(oc)} | {signed(diff(dc, oc))} | {pts(oci)} | {signed(diff(dc, oci))} |")
        col = lambda k: [r[k] for r in rows]
        d1 = [diff(a, b) for a, b in zip(col(f"distclip_{task}"), col(f"openclip_{task}"))]
        d2 = [diff(a, b) for a, b in zip(col(f"distclip_{task}"), col(f"openclip_dcinit_{task}"))]
        print(f"| mean ± sd | {task} | {ms(col(f'distclip_{task}'))} | {ms(col(f'openclip_{task}'))} | {ms(d1)} "
              f"| {ms(col(f'openclip_dcinit_{task}'))} | {ms(d2)} |")

    print("\nDiagnostics (%): OpenCLIP's weights under OpenCLIP's own zero-shot classifier; both under "
          "the short prompts of earlier versions (`zeroshot-short.json`):\n")
    print("| seed | task | OpenCLIP, OpenCLIP's classifier | distclip, short prompts | OpenCLIP, short prompts |")
    print("| --- | --- | ---: | ---: | ---: |")
    for task in ("colour", "shape"):
        for r in rows:
            print(f"| {r['seed']} | {task} | {pts(r[f'openclip_{task}_openclip_eval'])} "
                  f"| {pts(r[f'distclip_{task}_short'])} | {pts(r[f'openclip_{task}_short'])} |")
        col = lambda k: [r[k] for r in rows]
        print(f"| mean ± sd | {task} | {ms(col(f'openclip_{task}_openclip_eval'))} "
              f"| {ms(col(f'distclip_{task}_short'))} | {ms(col(f'openclip_{task}_short'))} |")

    dc = [r["distclip_colour"] for r in rows]
    oc = [r["openclip_colour"] for r in rows]
    d = [a - b for a, b in zip(dc, oc)]
    se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    verdict = "within 2 points of OpenCLIP or better" if statistics.mean(dc) >= statistics.mean(oc) - 0.02 \
        else "NOT within 2 points of OpenCLIP"
    print(f"\ncolour, mean over seeds {', '.join(seeds)}: distclip {pts(statistics.mean(dc))}, OpenCLIP "
          f"{pts(statistics.mean(oc))}, difference {100 * statistics.mean(d):+.1f} points (standard error "
          f"{100 * se:.1f}): {verdict}")
    same = [r["seed"] for r in rows if r["demo_after_colour"] != r["distclip_colour"]]
    if same:
        print(f"note: the demo's own after-accuracy differs from `distclip eval` for seeds {same}")
    print("before training (colour): " + ", ".join(f"{r['seed']}: {pts(r['before_colour'])}" for r in rows))
    print("seconds (distclip demo / OpenCLIP / OpenCLIP from distclip's init): " + ", ".join(
        f"{r['seed']}: {r['distclip_s']} / {r['openclip_s']} / {r['openclip-dcinit_s']}" for r in rows))


if __name__ == "__main__":
    main()
