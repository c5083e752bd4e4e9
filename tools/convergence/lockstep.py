#!/usr/bin/env python3
"""distclip and OpenCLIP on identical inputs for a whole run: same initial weights, same batches
in the same order, no augmentation, so any difference is the training itself.

    ~/.cache/distclip-anchor-venv/bin/python tools/convergence/lockstep.py \
        --data DIR/data --out OUT --distclip BIN [--seed 0] [--epochs 12]

compare.sh measures the two systems as a user runs them, where the initial draw, the sample
order and the crops differ between them. This script removes those three sources of difference
to tell them apart from a difference in the step, the schedule or the pipeline:

* weights: ``distclip init --model tiny --seed S`` (OpenCLIP names), or ``--init FILE``,
  loaded by both;
* distclip: ``distclip launch --workers 1 --batch-size 64 --no-shuffle --augment none
  --pretrained INIT --data-threads 1`` (the demo's lr 2e-3, warmup 50, cosine, AdamW
  0.9/0.98/1e-6, wd 0.2), so each epoch reads shards 0..15 and their samples in order,
  batches of 64 and a last one of 32, each sample once per epoch;
* OpenCLIP: the same sequence of batches, each image through the factory's eval transform
  (what ``--augment none`` is), with OpenCLIP's pieces of ``open_clip_train``, line for line as
  ``tools/parity/make_step_fixture.py`` (``cosine_lr``, ``ClipLoss``, ``torch.optim.AdamW``
  with main.py's two parameter groups, the ``logit_scale`` clamp), fp32, no clipping.

Both final weights are evaluated by ``distclip eval`` on ``zeroshot.json``. Prints the per-step
loss of both at a few steps, the largest relative loss difference over the first 20 steps and
over the run, and the final zero-shot top-1 of both; the last stdout line is JSON. Expect the
losses to agree to about 1e-6 (relative) through the first epoch and then to drift apart from
float rounding: 756 steps at this learning rate are chaotic, so the final accuracies agree only
as closely as that drift allows (BENCHMARKS.md, "Convergence against OpenCLIP").
"""

from __future__ import annotations

import argparse
import io
import json
import math
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "crates" / "distclip-model" / "configs" / "tiny.json"
MODEL_NAME = "distclip-tiny"


def read_shards(train: Path) -> list[tuple[bytes, str]]:
    """(jpg bytes, caption) of every training sample, shards in order, samples in tar order."""
    sizes = json.loads((train / "sizes.json").read_text())
    out = []
    for name in sorted(sizes):
        members: dict[str, dict[str, bytes]] = {}
        order: list[str] = []
        with tarfile.open(train / name) as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, _, ext = m.name.partition(".")
                if key not in members:
                    members[key] = {}
                    order.append(key)
                members[key][ext] = tar.extractfile(m).read()
        for key in order:
            out.append((members[key]["jpg"], members[key]["txt"].decode("utf-8")))
        assert len(order) == sizes[name], (name, len(order), sizes[name])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--distclip", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--init", type=Path, help="initial weights (default: distclip init --model tiny --seed SEED)")
    args = ap.parse_args()

    import torch
    from PIL import Image
    from safetensors.torch import save_file

    import open_clip
    from open_clip.loss import ClipLoss
    from open_clip_train.scheduler import cosine_lr

    torch.set_num_threads(args.threads)
    started = time.time()
    data, out = args.data.resolve(), args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    sizes = json.loads((data / "train" / "sizes.json").read_text())
    stems = sorted(Path(n).stem for n in sizes)
    spec = f"{data}/train/{{{stems[0]}..{stems[-1]}}}.tar"
    init = out / "init.safetensors"
    if args.init:
        shutil.copyfile(args.init, init)
    else:
        subprocess.run([str(args.distclip), "init", "--model", "tiny", "--seed", str(args.seed), "--out", str(init)],
                       check=True, stdout=subprocess.DEVNULL)

    # distclip.
    run_dir = out / "distclip-run"
    t0 = time.time()
    subprocess.run(
        [str(args.distclip), "launch", "--workers", "1", "--data", spec, "--run-dir", str(run_dir),
         "--model", "tiny", "--threads", str(args.threads), "--data-threads", "1",
         "--batch-size", str(args.batch_size), "--epochs", str(args.epochs), "--lr", repr(args.lr),
         "--warmup", str(args.warmup), "--seed", str(args.seed), "--no-shuffle", "--augment", "none",
         "--pretrained", str(init)],
        check=True, stdout=subprocess.DEVNULL, stderr=open(out / "distclip-run.log", "w"),
    )
    distclip_s = time.time() - t0
    dc_rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    dc_loss = [r["loss"] for r in sorted(dc_rows, key=lambda r: r["step"])]
    dc_samples = [r["samples"] for r in sorted(dc_rows, key=lambda r: r["step"])]

    # OpenCLIP, on the same batches.
    configs = out / "model_configs"
    configs.mkdir(exist_ok=True)
    (configs / f"{MODEL_NAME}.json").write_text(CONFIG.read_text())
    open_clip.add_model_config(configs)
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL_NAME, pretrained=str(init), output_dict=True)
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    samples = read_shards(data / "train")
    images = torch.stack([preprocess(Image.open(io.BytesIO(j)).convert("RGB")) for j, _ in samples])
    texts = tokenizer([c for _, c in samples])
    n, b = len(samples), args.batch_size
    batches = [(i, min(i + b, n)) for i in range(0, n, b)]
    total_steps = len(batches) * args.epochs
    assert total_steps == len(dc_loss), f"distclip ran {len(dc_loss)} steps, expected {total_steps}"
    assert dc_samples == [e - s for s, e in batches] * args.epochs, "distclip's batch sizes differ"

    # open_clip_train/main.py (3.3.0): two AdamW groups, no decay on gains, biases, logit_scale.
    exclude = lambda nm, p: p.ndim < 2 or "bn" in nm or "ln" in nm or "bias" in nm or "logit_scale" in nm
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [p for nm, p in named if exclude(nm, p) and p.requires_grad], "weight_decay": 0.0},
         {"params": [p for nm, p in named if not exclude(nm, p) and p.requires_grad], "weight_decay": 0.2}],
        lr=args.lr, betas=(0.9, 0.98), eps=1e-6,
    )
    scheduler = cosine_lr(optimizer, args.lr, args.warmup, total_steps)
    loss_fn = ClipLoss()
    model.train()
    oc_loss = []
    t0 = time.time()
    step = 0
    for _ in range(args.epochs):
        for s, e in batches:
            scheduler(step)
            optimizer.zero_grad()
            res = model(images[s:e], texts[s:e])
            loss = loss_fn(**res)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            oc_loss.append(float(loss.detach()))
            step += 1
    openclip_s = time.time() - t0
    weights = out / "openclip-final.safetensors"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(weights))

    def evaluate(ckpt: Path) -> dict:
        res = subprocess.run([str(args.distclip), "eval", "--model", "tiny", "--checkpoint", str(ckpt),
                              "--zeroshot", str(data / "zeroshot.json")],
                             check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        zs = json.loads(res.stdout.strip().splitlines()[-1])["zeroshot"]
        return {t: a["top1"] for t, a in zs.items()}

    dc_eval = evaluate(run_dir / "checkpoints" / "final" / "model.safetensors")
    oc_eval = evaluate(weights)
    rel = [abs(a - c) / max(abs(c), 1e-12) for a, c in zip(dc_loss, oc_loss)]
    print("step  distclip_loss  openclip_loss  rel_diff", file=sys.stderr)
    for k in sorted({0, 1, 2, 5, 10, 20, 49, 50, 62, 63, 100, 200, 300, 400, 500, 600, 700, total_steps - 1}):
        if k < total_steps:
            print(f"{k:4d}  {dc_loss[k]:.6f}  {oc_loss[k]:.6f}  {rel[k]:.2e}", file=sys.stderr)
    last = min(63, total_steps)
    summary = {
        "seed": args.seed,
        "steps": total_steps,
        "max_rel_loss_diff_first_20": max(rel[:20]),
        "max_rel_loss_diff": max(rel),
        "mean_loss_last_epoch": {"distclip": sum(dc_loss[-last:]) / last, "openclip": sum(oc_loss[-last:]) / last},
        "zero_shot_top1": {"distclip": dc_eval, "openclip": oc_eval},
        "seconds": {"distclip": distclip_s, "openclip": openclip_s, "total": time.time() - started},
    }
    (out / "losses.json").write_text(json.dumps({"distclip": dc_loss, "openclip": oc_loss}) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
