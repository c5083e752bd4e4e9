#!/usr/bin/env python3
"""Generate the fixture for OpenCLIP's training features: patch dropout, tower locking and
positional-embedding resizing, each run by OpenCLIP 3.3.0 itself.

    ~/.cache/distclip-anchor-venv/bin/python tools/parity/make_features_fixture.py

Starts from the step fixture (``tests/fixtures/parity/step``: its config, ``init.safetensors``,
``batches.safetensors`` and hyperparameters, written by ``make_step_fixture.py``) and runs the
same training step as that script with one feature switched on. Writes
``tests/fixtures/parity/features/``:

* ``patch_dropout_keep.safetensors``  ``keep`` i64 ``[batch, kept]``: the patch indices
                                  OpenCLIP's ``PatchDropout(0.5)`` kept for each row in step 1
                                  (in its ``topk`` order)
* ``patch_dropout.safetensors``   the state dict after that step
* ``epoch_1.pt``                  the same weights as ``open_clip_train`` saves a training
                                  checkpoint: ``{"epoch", "name", "state_dict", "optimizer"}``
* ``lock_image.safetensors``      the state dict after 2 steps with
                                  ``lock_image_tower(unlocked_groups=2)`` and
                                  ``lock_text_tower(unlocked_layers=0)`` (main.py's --lock-image
                                  --lock-image-unlocked-groups 2 --lock-text)
* ``lock_text.safetensors``       the state dict after 2 steps with
                                  ``lock_text_tower(unlocked_layers=2)``, image tower trainable
* ``pos_embed.safetensors``       ``resize_pos_embed`` (bicubic, antialias) of the init
                                  ``visual.positional_embedding`` from grid 2 to grid 3 (``up``),
                                  and of ``down_src`` (grid 4) to grid 3 (``down``)
* ``expected.json``               losses, kept counts, trainable parameter names per case
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import open_clip
from open_clip.loss import ClipLoss
from open_clip.model import CLIP, resize_pos_embed
from open_clip.transformer import PatchDropout
from open_clip_train.scheduler import cosine_lr

torch.set_num_threads(2)
torch.use_deterministic_algorithms(True)

REPO = Path(__file__).resolve().parents[2]
STEP = REPO / "tests" / "fixtures" / "parity" / "step"
OUT = REPO / "tests" / "fixtures" / "parity" / "features"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_step_fixture import CONFIG, HPARAMS, build_optimizer, state  # noqa: E402

DROP = 0.5
OPTIMIZER: list = []  # the last train()'s optimizer, for epoch_1.pt


def load_model(config: dict) -> CLIP:
    model = CLIP(**config, output_dict=True)
    model.load_state_dict(load_file(STEP / "init.safetensors"))
    model.train()
    return model


def train(model: CLIP, steps: int) -> list[float]:
    """make_step_fixture.py's step; frozen parameters leave the optimizer as in main.py."""
    batches = load_file(STEP / "batches.safetensors")
    optimizer = build_optimizer(model)
    OPTIMIZER[:] = [optimizer]
    scheduler = cosine_lr(optimizer, HPARAMS["lr"], HPARAMS["warmup"], HPARAMS["total_steps"])
    loss_fn = ClipLoss()
    losses = []
    for step in range(steps):
        scheduler(step)
        optimizer.zero_grad()
        out = model(batches["images"][step], batches["tokens"][step])
        total = sum(loss_fn(**out, output_dict=True).values())
        total.backward()
        params = [p for p in model.parameters() if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(params, HPARAMS["grad_clip_norm"], norm_type=2.0)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(float(total.detach()))
    return losses


def trainable(model: CLIP) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def patch_dropout_case() -> dict:
    model = load_model({**CONFIG, "vision_cfg": {**CONFIG["vision_cfg"], "patch_dropout": DROP}})
    assert isinstance(model.visual.patch_dropout, PatchDropout)
    kept = []
    original = torch.Tensor.topk

    def recording_topk(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        kept.append(out.indices.clone())
        return out

    torch.manual_seed(3)
    torch.Tensor.topk = recording_topk
    try:
        losses = train(model, 1)
    finally:
        torch.Tensor.topk = original
    assert len(kept) == 1, f"PatchDropout ran {len(kept)} times in one step"
    save_file({"keep": kept[0].contiguous()}, OUT / "patch_dropout_keep.safetensors")
    save_file(state(model), OUT / "patch_dropout.safetensors")
    # The same weights as open_clip_train/main.py saves a training checkpoint (epoch_N.pt).
    torch.save({"epoch": 1, "name": "features", "state_dict": model.state_dict(), "optimizer": OPTIMIZER[0].state_dict()},
               OUT / "epoch_1.pt")
    return {"prob": DROP, "kept": int(kept[0].shape[1]), "loss": losses[0]}


def lock_case(name: str, image_groups: int | None, text_layers: int | None) -> dict:
    model = load_model(CONFIG)
    if image_groups is not None:
        model.lock_image_tower(unlocked_groups=image_groups)
    if text_layers is not None:
        model.lock_text_tower(unlocked_layers=text_layers)
    losses = train(model, 2)
    save_file(state(model), OUT / f"{name}.safetensors")
    return {
        "lock_image_unlocked_groups": image_groups,
        "lock_text_unlocked_layers": text_layers,
        "losses": losses,
        "trainable": trainable(model),
    }


def pos_embed_case() -> dict:
    init = load_file(STEP / "init.safetensors")

    def resized(pos: torch.Tensor, image_size: int) -> torch.Tensor:
        cfg = {**CONFIG, "vision_cfg": {**CONFIG["vision_cfg"], "image_size": image_size}}
        sd = {"visual.positional_embedding": pos.clone()}
        resize_pos_embed(sd, CLIP(**cfg))
        return sd["visual.positional_embedding"].contiguous()

    g = torch.Generator().manual_seed(4)
    width = CONFIG["vision_cfg"]["width"]
    down_src = torch.randn(1 + 16, width, generator=g)
    up = resized(init["visual.positional_embedding"], 24)
    down = resized(down_src, 24)
    assert up.shape == (10, width) and down.shape == (10, width)
    save_file({"up": up, "down_src": down_src, "down": down}, OUT / "pos_embed.safetensors")
    return {"up": "grid 2 -> 3 (image_size 16 -> 24)", "down": "grid 4 -> 3"}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    expected = {
        "note": "OpenCLIP 3.3.0 training features; see tools/parity/make_features_fixture.py",
        "patch_dropout": patch_dropout_case(),
        "lock_image": lock_case("lock_image", 2, 0),
        "lock_text": lock_case("lock_text", None, 2),
        "pos_embed": pos_embed_case(),
        "open_clip_version": open_clip.__version__,
        "torch_version": torch.__version__,
    }
    (OUT / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    for p in sorted(OUT.iterdir()):
        print(f"{p.relative_to(REPO)}  {p.stat().st_size:>8} B")


if __name__ == "__main__":
    main()
