#!/usr/bin/env python3
"""Train the demo's tiny CLIP with OpenCLIP's own trainer on a `distclip synth` dataset.

    ~/.cache/distclip-anchor-venv/bin/python tools/convergence/openclip_train.py \
        --data DIR/data --out OUT --seed 0 [--distclip BIN]

``DIR/data`` is what ``distclip synth`` (or ``distclip demo --out DIR``, which writes its data to
``DIR/data``) wrote: ``train/*.tar`` with ``sizes.json``, ``val/*.tar`` and ``zeroshot.json``.

The training is ``open_clip_train.main.main`` itself (OpenCLIP 3.3.0), run in this process so
that the tiny config can be registered with ``open_clip.add_model_config`` first. Its arguments
are the demo's hyperparameters, spelled out because OpenCLIP's defaults differ (its betas and
eps default to 0.9/0.999/1e-8 for a model whose name lacks "vit", its warmup to 10000):

* global batch 64 (one process, ``--batch-size 64``; distclip: 2 workers x 32), 12 epochs of
  ``--train-num-samples`` (the shards' ``sizes.json`` total, 4000 for the demo);
* AdamW lr 2e-3, betas 0.9/0.98, eps 1e-6, weight decay 0.2 (not on gains, biases and
  ``logit_scale``), linear warmup 50 steps then cosine to 0, no gradient clipping, fp32;
* OpenCLIP's WebDataset train pipeline: shards shuffled by seed and epoch, samples through a
  5000-sample shuffle buffer, ``RandomResizedCrop(32, scale=(0.9, 1.0), bicubic)``; one
  dataloader worker.

What still differs from distclip by design of the two trainers, not by choice here: an OpenCLIP
epoch is ``ceil(4000 / 64) = 63`` full batches (the last 32 samples come from a second pass),
where distclip's is 62 full batches and one of 32 (every sample exactly once); both schedules
are 756 steps. webdataset 1.0.2 seeds the sample shuffle buffer from the pid and the clock, so
OpenCLIP's sample order (not its shard order or crops) differs between runs of one seed. And
each trainer draws its own initial weights for a seed; ``--init FILE`` starts OpenCLIP from
given weights instead (e.g. the ones a distclip run starts from), passed as ``--pretrained``.

Two shims let OpenCLIP's trainer run in the anchor venv (shared/bench/README.md), neither
touching what it computes: ``pandas`` (imported by ``open_clip_train.data`` for its CSV dataset
only) is stubbed when missing, and webdataset 1.0.2's end-of-shard markers are dropped before
OpenCLIP's ``group_by_keys_nothrow`` (open_clip_torch[training] pins webdataset<=0.2.86, which
has none; 1.0.2's make it fail with KeyError 'fname').

The final ``state_dict`` is written with OpenCLIP's names to ``OUT/open_clip_model.safetensors``.
Then the held-out split is evaluated twice:

* by OpenCLIP here (``build_zero_shot_classifier`` with the templates of ``zeroshot.json``,
  the factory's eval transform, top-1 over the val shards), as a cross-check;
* with ``--distclip BIN``, by ``distclip eval --model tiny --checkpoint ... --zeroshot
  zeroshot.json``: the same evaluation code that measures distclip's own runs.

The last stdout line is JSON: ``openclip_eval`` and ``distclip_eval`` (``{task: top1}``),
``checkpoint``, ``final_loss``, ``seconds``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / "crates" / "distclip-model" / "configs" / "tiny.json"
MODEL_NAME = "distclip-tiny"


def brace_spec(folder: Path) -> tuple[str, int, int]:
    """The shards of ``folder`` as a brace spec, their sample total and count (from sizes.json)."""
    sizes = json.loads((folder / "sizes.json").read_text())
    names = sorted(sizes)
    stems = [Path(n).stem for n in names]
    width = len(stems[0])
    first, last = int(stems[0]), int(stems[-1])
    expected = [f"{i:0{width}d}" for i in range(first, last + 1)]
    if stems != expected:
        raise SystemExit(f"{folder}: shards are not a contiguous numbered range: {names}")
    spec = f"{folder}/{{{stems[0]}..{stems[-1]}}}.tar"
    return spec, sum(int(v) for v in sizes.values()), len(names)


def openclip_zero_shot(model, preprocess, tokenizer, zeroshot: dict) -> dict:
    """Top-1 per task over the held-out shards, computed with OpenCLIP's own classifier."""
    import torch
    import webdataset as wds
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    model.eval()
    tasks = zeroshot["tasks"]
    images, labels = [], {t["name"]: [] for t in tasks}
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(zeroshot["spec"]),
        wds.tarfile_to_samples(),
        wds.decode("pilrgb"),
        wds.to_tuple("jpg;png;jpeg;webp", "json"),
    )
    for image, meta in pipeline:
        images.append(preprocess(image))
        for t in tasks:
            labels[t["name"]].append(int(meta[t["label_key"]]))
    out = {}
    with torch.no_grad():
        feats = []
        for i in range(0, len(images), 256):
            f = model.encode_image(torch.stack(images[i:i + 256]), normalize=True)
            feats.append(f)
        feats = torch.cat(feats)
        for t in tasks:
            classifier = build_zero_shot_classifier(
                model, tokenizer, t["classnames"], t["templates"], num_classes_per_batch=10, device="cpu",
                use_tqdm=False,
            )
            pred = (feats @ classifier).argmax(dim=1)
            target = torch.tensor(labels[t["name"]])
            out[t["name"]] = float((pred == target).float().mean())
    out["samples"] = len(images)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="a distclip synth folder (train/, val/, zeroshot.json)")
    ap.add_argument("--out", type=Path, required=True, help="where OpenCLIP's logs and the weights go")
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="OpenCLIP model config (default: tiny.json)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=64, help="global batch (one process)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--wd", type=float, default=0.2)
    ap.add_argument("--workers", type=int, default=1, help="dataloader worker processes")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--distclip", type=Path, help="distclip binary: also evaluate with distclip eval")
    ap.add_argument("--init", type=Path,
                    help="start from these weights (OpenCLIP names, e.g. `distclip init --model tiny --seed S`) "
                         "instead of OpenCLIP's own draw (passed as --pretrained)")
    ap.add_argument("--reuse", type=Path,
                    help="skip training: take the weights and log of an earlier --out of this script (trained "
                         "on identical data, which the caller checks) and only evaluate them again, e.g. after "
                         "zeroshot.json changed")
    args = ap.parse_args()

    started = time.time()
    import torch
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    import open_clip
    try:
        import pandas  # noqa: F401
    except ImportError:
        # open_clip_train.data imports pandas for its CSV dataset only; the anchor venv
        # (shared/bench/README.md) does not install it and the WebDataset path never calls it.
        import types
        sys.modules["pandas"] = types.ModuleType("pandas")
    from open_clip_train import data as oc_data
    from open_clip_train import main as oc_main

    # open_clip_train 3.3.0 pins webdataset<=0.2.86; the anchor venv has 1.0.2, whose
    # tar_file_expander yields an empty dict as an end-of-shard marker, which OpenCLIP's
    # group_by_keys_nothrow indexes (KeyError 'fname'). Drop the markers before the grouping,
    # as 0.2.86 (which has none) would. The DataLoader worker is forked, so it inherits this.
    group_by_keys = oc_data.group_by_keys_nothrow

    def group_by_keys_without_eof(data, *a, **kw):
        return group_by_keys((f for f in data if f), *a, **kw)

    oc_data.group_by_keys_nothrow = group_by_keys_without_eof
    from safetensors.torch import save_file

    data = args.data.resolve()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    train_spec, num_samples, num_shards = brace_spec(data / "train")
    zeroshot = json.loads((data / "zeroshot.json").read_text())

    # Register the config under a name of our own (the file's stem is the model name).
    configs = out / "model_configs"
    configs.mkdir(exist_ok=True)
    shutil.copyfile(args.config, configs / f"{MODEL_NAME}.json")
    open_clip.add_model_config(configs)
    assert MODEL_NAME in open_clip.list_models()

    name = "run"
    if (out / "logs" / name).exists():
        raise SystemExit(f"{out / 'logs' / name} exists: give a fresh --out")
    argv = [
        "--model", MODEL_NAME,
        "--train-data", train_spec,
        "--train-num-samples", str(num_samples),
        "--dataset-type", "webdataset",
        "--batch-size", str(args.batch_size),
        "--epochs", str(args.epochs),
        "--lr", repr(args.lr),
        "--warmup", str(args.warmup),
        "--lr-scheduler", "cosine",
        "--wd", repr(args.wd),
        "--beta1", "0.9",
        "--beta2", "0.98",
        "--eps", "1e-6",
        "--precision", "fp32",
        "--workers", str(args.workers),
        "--seed", str(args.seed),
        "--device", "cpu",
        "--logs", str(out / "logs"),
        "--name", name,
        "--save-frequency", str(args.epochs),
        "--log-every-n-steps", "10",
        "--report-to", "",
    ]
    if args.init:
        argv += ["--pretrained", str(args.init.resolve())]
    if args.reuse:
        print(f"reusing the OpenCLIP run in {args.reuse} (was: open_clip_train.main {' '.join(argv)})",
              file=sys.stderr, flush=True)
        shutil.copytree(args.reuse.resolve() / "logs" / name, out / "logs" / name)
    else:
        print("open_clip_train.main " + " ".join(argv), file=sys.stderr, flush=True)
        rc = oc_main.main(argv)
        if rc not in (None, 0):
            raise SystemExit(f"open_clip_train.main returned {rc}")

    run_dir = out / "logs" / name
    ckpt = torch.load(run_dir / "checkpoints" / f"epoch_{args.epochs}.pt", map_location="cpu", weights_only=False)
    state = {k.removeprefix("module."): v.detach().contiguous() for k, v in ckpt["state_dict"].items()}
    weights = out / "open_clip_model.safetensors"
    save_file(state, str(weights), metadata={"format": "pt"})

    # The last logged loss, from the trainer's log.
    log = (run_dir / "out.log").read_text()
    losses = re.findall(r"Contrastive_loss: ([0-9.]+) \(([0-9.]+)\)", log)
    final_loss = float(losses[-1][0]) if losses else math.nan

    # Cross-check: OpenCLIP's own zero-shot classifier on the held-out shards.
    model, _, preprocess_val = open_clip.create_model_and_transforms(MODEL_NAME, pretrained=str(weights))
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    oc_eval = openclip_zero_shot(model, preprocess_val, tokenizer, zeroshot)
    print(f"openclip zero-shot (OpenCLIP's classifier): {oc_eval}", file=sys.stderr, flush=True)

    dc_eval = None
    if args.distclip:
        res = subprocess.run(
            [str(args.distclip), "eval", "--model", "tiny" if args.config == DEFAULT_CONFIG else str(args.config),
             "--checkpoint", str(weights),
             "--zeroshot", str(data / "zeroshot.json")],
            check=True, stdout=subprocess.PIPE, text=True,
        )
        zs = json.loads(res.stdout.strip().splitlines()[-1])["zeroshot"]
        dc_eval = {task: acc["top1"] for task, acc in zs.items()}
        print(f"openclip zero-shot (distclip eval): {dc_eval}", file=sys.stderr, flush=True)

    print(json.dumps({
        "openclip_eval": oc_eval,
        "distclip_eval": dc_eval,
        "checkpoint": str(weights),
        "train_spec": train_spec,
        "train_num_samples": num_samples,
        "final_loss": final_loss,
        "seed": args.seed,
        "seconds": time.time() - started,
        "reused": str(args.reuse.resolve()) if args.reuse else None,
    }))


if __name__ == "__main__":
    main()
