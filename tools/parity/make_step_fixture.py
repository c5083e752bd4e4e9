#!/usr/bin/env python3
"""Generate the step-parity fixture: OpenCLIP 3.3.0's own training step, 3 times.

    ~/.cache/distclip-anchor-venv/bin/python tools/parity/make_step_fixture.py

Writes ``tests/fixtures/parity/step/`` (deterministic: seeded, deterministic algorithms, CPU,
2 threads). distclip's Rust test (``crates/distclip-worker/tests/step_parity.rs``) starts from
``init.safetensors``, runs its step on the same batches and compares every parameter after
each step with ``step_<k>.safetensors``.

What one step is here, line for line with ``open_clip_train`` 3.3.0:

* ``scheduler(step)`` before the step: ``cosine_lr(optimizer, lr, warmup, steps)``
  (``scheduler.py``), with the warmup longer than the 3 steps so the LR differs each step;
* ``model(images, texts)`` -> ``ClipLoss()(**out)`` -> ``total_loss.backward()``
  (``train.py`` ``train_one_epoch``, ``accum_freq == 1``, fp32, world size 1);
* ``torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm, norm_type=2.0)``;
* ``optimizer.step()`` with ``torch.optim.AdamW`` over two parameter groups exactly as
  ``main.py`` builds them (no decay where ``p.ndim < 2`` or the name contains ``bn``, ``ln``,
  ``bias`` or ``logit_scale``);
* ``logit_scale.clamp_(0, math.log(100))``.

Files:

* ``config.json``           OpenCLIP model config (a tiny ViT/text transformer, vocabulary 64
                            so the weight files stay small)
* ``init.safetensors``      the starting state dict (OpenCLIP names; ``logit_scale`` 0-d)
* ``batches.safetensors``   ``images`` f32 ``[steps, batch, 3, S, S]`` and ``tokens`` i64
                            ``[steps, batch, context]``: step k trains on batch k
* ``step_<k>.safetensors``  the state dict after k optimizer steps (k = 1, 2, 3)
* ``expected.json``         hyperparameters, and per step: lr, loss, pre-clip grad norm,
                            logit_scale; library versions
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

import open_clip
from open_clip.loss import ClipLoss
from open_clip.model import CLIP
from open_clip_train.scheduler import cosine_lr

torch.set_num_threads(2)
torch.use_deterministic_algorithms(True)

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "tests" / "fixtures" / "parity" / "step"

CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16, "mlp_ratio": 4.0},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 2},
}

STEPS = 3
BATCH = 6
HPARAMS = {
    # Peak LR with a warmup longer than the run: lr = 2e-3·(k+1)/5 at step k (4e-4, 8e-4,
    # 1.2e-3), so a schedule off by one step shows.
    "lr": 2e-3,
    "warmup": 5,
    "schedule": "cosine",
    "total_steps": 20,
    "beta1": 0.9,
    "beta2": 0.98,
    "eps": 1e-6,
    "weight_decay": 0.2,
    # Between the gradient norms of the steps (57, 44, 29 before clipping), so clipping acts
    # on the first two steps and not on the third (checked below).
    "grad_clip_norm": 40.0,
}


def make_model() -> CLIP:
    torch.manual_seed(0)
    # main.py creates the model with output_dict=True, which train.py relies on.
    model = CLIP(**CONFIG, output_dict=True)
    # Perturb every parameter (LayerNorm gains off 1, biases off 0) so that a decay applied to
    # the wrong group, or a gradient missing for a gain or bias, changes the result.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "logit_scale":
                p.add_(0.1)
            else:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def make_batches() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    s = CONFIG["vision_cfg"]["image_size"]
    ctx = CONFIG["text_cfg"]["context_length"]
    vocab = CONFIG["text_cfg"]["vocab_size"]
    images = torch.randn(STEPS, BATCH, 3, s, s, generator=g)
    # SOT, ids in [1, vocab - 2), EOT (the largest id, which argmax pooling finds), zero padding;
    # lengths vary so the pooled position differs between rows.
    sot, eot = vocab - 2, vocab - 1
    tokens = torch.zeros(STEPS, BATCH, ctx, dtype=torch.int64)
    for k in range(STEPS):
        for i in range(BATCH):
            length = 3 + int(torch.randint(0, ctx - 2, (1,), generator=g))
            tokens[k, i, 0] = sot
            tokens[k, i, 1:length - 1] = torch.randint(1, vocab - 2, (length - 2,), generator=g)
            tokens[k, i, length - 1] = eot
    return images, tokens


def build_optimizer(model: CLIP) -> torch.optim.Optimizer:
    # open_clip_train/main.py (3.3.0), lines 335-351.
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
    include = lambda n, p: not exclude(n, p)
    named_parameters = list(model.named_parameters())
    gain_or_bias_params = [p for n, p in named_parameters if exclude(n, p) and p.requires_grad]
    rest_params = [p for n, p in named_parameters if include(n, p) and p.requires_grad]
    return torch.optim.AdamW(
        [
            {"params": gain_or_bias_params, "weight_decay": 0.0},
            {"params": rest_params, "weight_decay": HPARAMS["weight_decay"]},
        ],
        lr=HPARAMS["lr"],
        betas=(HPARAMS["beta1"], HPARAMS["beta2"]),
        eps=HPARAMS["eps"],
    )


def state(model: CLIP) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    model = make_model()
    model.train()
    images, tokens = make_batches()
    (OUT / "config.json").write_text(json.dumps(CONFIG, indent=1) + "\n")
    save_file(state(model), OUT / "init.safetensors", metadata={"format": "pt"})
    save_file({"images": images.contiguous(), "tokens": tokens.contiguous()}, OUT / "batches.safetensors")

    optimizer = build_optimizer(model)
    scheduler = cosine_lr(optimizer, HPARAMS["lr"], HPARAMS["warmup"], HPARAMS["total_steps"])
    loss_fn = ClipLoss()
    per_step = []
    for step in range(STEPS):
        # train.py train_one_epoch, accum_freq == 1, precision fp32.
        lr = scheduler(step)
        optimizer.zero_grad()
        out = model(images[step], tokens[step])
        losses = loss_fn(**out, output_dict=True)
        total_loss = sum(losses.values())
        total_loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), HPARAMS["grad_clip_norm"], norm_type=2.0)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        save_file(state(model), OUT / f"step_{step + 1}.safetensors", metadata={"format": "pt"})
        per_step.append({
            "step": step,
            "lr": lr,
            "loss": float(total_loss.detach()),
            "grad_norm": float(grad_norm),
            "clipped": bool(float(grad_norm) > HPARAMS["grad_clip_norm"]),
            "logit_scale": float(model.logit_scale),
        })
    clipped = [s["clipped"] for s in per_step]
    assert any(clipped) and not all(clipped), f"grad_clip_norm should act on some steps only: {clipped}"
    assert len({s["lr"] for s in per_step}) == STEPS
    expected = {
        "note": "OpenCLIP 3.3.0 training steps; see tools/parity/make_step_fixture.py",
        "batch_size": BATCH,
        "steps": STEPS,
        "hparams": HPARAMS,
        "per_step": per_step,
        "open_clip_version": open_clip.__version__,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
    }
    (OUT / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    for p in sorted(OUT.iterdir()):
        print(f"{p.relative_to(REPO)}  {p.stat().st_size:>8} B  sha256 {sha(p)}")
    for s in per_step:
        print(s)


if __name__ == "__main__":
    main()
