#!/usr/bin/env python3
"""Generate OpenCLIP reference fixtures for distclip's Rust parity tests.

Run from anywhere (paths are resolved from this file's location):

    ~/.cache/distclip-anchor-venv/bin/python tools/parity/make_fixtures.py

Everything is written into ``tests/fixtures/parity/`` and is fully deterministic
(fixed seeds, fixed file formats): running the script twice gives byte-identical
files.  Python is reference tooling only; the Rust tests read the committed files.

What is produced (see tools/parity/README.md for the field-by-field description):

* ``images/``            five small procedurally generated images (PNG RGB / RGBA / L,
                         JPEG, an upsampling case) shared by both model configs, and
                         ``decoded_d_jpg.json`` (the JPEG's decoded bytes).
* ``<model>/config.json`` an OpenCLIP model config (``embed_dim``, ``quick_gelu``,
                         ``init_logit_bias``, ``vision_cfg``, ``text_cfg``).
* ``<model>/open_clip_model.safetensors``  the state dict of an ``open_clip.model.CLIP``
                         built from that config, with every parameter perturbed by
                         seeded noise (so transposes, swapped q/k/v, missing biases or
                         wrong LayerNorms cannot hide), and unused token-embedding rows
                         zeroed (so the 49408-row matrix compresses to almost nothing).
* ``<model>/keys.json``  the state-dict key list with shapes and dtypes.
* ``<model>/expected.json`` tokens, preprocessed pixels, features, embeddings,
                         logits and probabilities computed by OpenCLIP in fp32.
* ``tiny/open_clip_pytorch_model.bin`` (torch.save) and
  ``tiny/open_clip_model_fp16.safetensors`` (+ an ``fp16_weights`` section in
  ``tiny/expected.json``).
* ``losses.json``        ClipLoss (full batch and per-rank local loss with a
                         simulated all-gather) and SigLipLoss values and gradients.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import PIL
import PIL.features
import torch
import torchvision
from PIL import Image, ImageDraw
from safetensors.torch import save_file

import open_clip
import open_clip.loss
from open_clip.model import CLIP

torch.set_num_threads(2)
torch.use_deterministic_algorithms(True)

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "tests" / "fixtures" / "parity"
IMAGES_DIR = OUT / "images"

# Significant bits kept in every float32 parameter (24 = no rounding).  Rounding the
# perturbed parameters to 8 significant bits (i.e. values exactly representable in
# bfloat16) zeroes the low 16 bits of every float32, which roughly halves the weight files
# under git's zlib and keeps the whole fixture folder under ~1.5 MB compressed.  Such
# values are also exact in float16 unless |x| < 2**-14 (fp16 subnormal range), so the
# fp16 fixture differs from the fp32 one only through those few tiny values.
PARAM_SIGNIFICANT_BITS = 8

# ---------------------------------------------------------------------------------------
# Model configs (OpenCLIP model-config JSON format)
# ---------------------------------------------------------------------------------------

MODEL_CONFIGS = {
    # Plain ViT + text transformer with nn.GELU, square-ish small sizes.
    "tiny": {
        "embed_dim": 32,
        "vision_cfg": {
            "image_size": 32,
            "patch_size": 8,
            "width": 64,
            "layers": 2,
            "head_width": 32,
            "mlp_ratio": 4.0,
        },
        "text_cfg": {
            "context_length": 16,
            "vocab_size": 49408,
            "width": 48,
            "heads": 2,
            "layers": 2,
        },
    },
    # QuickGELU, LayerScale in both towers, non-integer vision MLP ratio
    # (hidden = int(40 * 2.6) = 104), text MLP ratio 3, logit_bias present.
    "tiny-variant": {
        "embed_dim": 24,
        "quick_gelu": True,
        "init_logit_bias": -3.0,
        "vision_cfg": {
            "image_size": 48,
            "patch_size": 16,
            "width": 40,
            "layers": 3,
            "head_width": 20,
            "mlp_ratio": 2.6,
            "ls_init_value": 0.5,
            "final_ln_after_pool": False,
        },
        "text_cfg": {
            "context_length": 20,
            "vocab_size": 49408,
            "width": 32,
            "heads": 4,
            "layers": 1,
            "mlp_ratio": 3.0,
            "ls_init_value": 0.5,
        },
    },
}

# Six captions: plain, mixed case/punctuation/HTML entity/extra whitespace (tests ftfy +
# html.unescape + whitespace cleaning + lower-casing), longer than both contexts (tests
# truncation: the last kept position becomes <end_of_text>), emoji, Chinese, digits.
TEXTS = [
    "a photo of a cat",
    "  A Diagram of TWO red squares &amp; a   blue circle!! ",
    "a very long caption that keeps going and going with many more words than the tiny "
    "context window can possibly hold, so the tokenizer must truncate it",
    "a dog wearing sunglasses \U0001F60E\U0001F436",
    "\u4e00\u53ea\u732b",  # 一只猫 ("a cat")
    "it's 3:45pm, isn't it? 100% sure",
]

IMAGE_FILES = ["a.png", "b.png", "c.png", "d.jpg", "e.png"]

# ---------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------


def to_list(t: torch.Tensor):
    """Tensor -> nested Python lists; float32 values become exact Python floats."""
    t = t.detach().cpu()
    if t.is_floating_point():
        return np.asarray(t.to(torch.float32).numpy(), dtype=np.float32).astype(np.float64).tolist()
    return t.numpy().tolist()


def scalar(t: torch.Tensor) -> float:
    """0-d / 1-element float32 tensor -> exact Python float."""
    return float(np.float32(t.detach().cpu().reshape(()).item()))


def fmt_float(x: float) -> str:
    """Shortest decimal that identifies a float32 exactly.

    Values that are exactly float32 (all tensor data) are written with numpy's shortest
    round-trip float32 repr (e.g. ``-1.7922626``): parsing it as f64 and casting to f32
    (serde_json's path) or parsing it directly as f32 gives back the same float32 bits.
    This is checked for every value written.  Other floats (config values like 2.6) are
    written with Python's repr.
    """
    if not math.isfinite(x):
        raise ValueError(f"non-finite value {x}")
    f = np.float32(x)
    if float(f) != x:
        return repr(x)
    s = str(f)
    assert np.float32(float(s)) == f and np.float32(s) == f, (x, s)
    return s


def _scalar_json(v) -> str:
    if isinstance(v, float):
        return fmt_float(v)
    return json.dumps(v, ensure_ascii=False)


def _dump(obj, indent: int) -> str:
    """JSON with one line per innermost list (readable yet compact)."""
    pad = " " * indent
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{pad} {json.dumps(k, ensure_ascii=False)}: {_dump(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list):
        if obj and any(isinstance(v, (list, dict)) for v in obj):
            items = [pad + " " + _dump(v, indent + 1) for v in obj]
            return "[\n" + ",\n".join(items) + "\n" + pad + "]"
        return "[" + ",".join(_scalar_json(v) for v in obj) + "]"
    return _scalar_json(obj)


def same_f32(a, b) -> bool:
    """Bit-exact float32 equality of two nested lists / scalars (as parsed back from JSON)."""
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    return a.shape == b.shape and a.tobytes() == b.tobytes()


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_dump(obj, 0) + "\n", encoding="utf-8")


def versions() -> dict:
    return {
        "open_clip_version": open_clip.__version__,
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "pillow_version": PIL.__version__,
        "numpy_version": np.__version__,
    }


# ---------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------


def _structured_rgb(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """An HxWx3 float image in [0, 255]: gradients, a sinusoid and seeded noise."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 255.0 * x / max(w - 1, 1)
    g = 255.0 * y / max(h - 1, 1)
    b = 127.5 + 100.0 * np.sin(2 * np.pi * (x / 9.0 + y / 13.0))
    img = np.stack([r, g, b], axis=-1) + rng.normal(0.0, 12.0, size=(h, w, 3))
    return np.clip(img, 0, 255)


def _draw_shapes(im: Image.Image, rng: np.random.Generator, n: int) -> None:
    """Draw n filled ellipses/rectangles with seeded positions and colours."""
    d = ImageDraw.Draw(im)
    w, h = im.size
    bands = len(im.getbands())
    for i in range(n):
        x0, x1 = sorted(int(v) for v in rng.integers(0, w, size=2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, h, size=2))
        x1, y1 = max(x1, x0 + 2), max(y1, y0 + 2)
        colour = tuple(int(v) for v in rng.integers(0, 256, size=bands))
        if bands == 1:
            colour = colour[0]
        (d.ellipse if i % 2 == 0 else d.rectangle)([x0, y0, x1, y1], fill=colour)


def make_images() -> list[dict]:
    """Write the five test images; return their descriptions."""
    IMAGES_DIR.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20240601)
    described = []

    # a.png: RGB 57x41 (W x H) - non-square, so resize (downsampling) and centre crop both act.
    im = Image.fromarray(_structured_rgb(rng, 57, 41).round().astype(np.uint8), "RGB")
    _draw_shapes(im, rng, 4)
    im.save(IMAGES_DIR / "a.png", optimize=False)
    described.append({"file": "images/a.png", "mode": "RGB", "size_wh": [57, 41]})

    # b.png: RGBA 30x50 - alpha varies from 0 to 255 (a transparent corner, a gradient,
    # an opaque disc), so the premultiplied-alpha behaviour of PIL's resize shows.
    rgb = _structured_rgb(rng, 30, 50)
    yy, xx = np.mgrid[0:50, 0:30].astype(np.float64)
    alpha = np.clip(255.0 * (xx / 29.0 * 0.6 + yy / 49.0 * 0.6) - 20.0, 0, 255)
    alpha[(yy - 32) ** 2 + (xx - 14) ** 2 < 64] = 255.0
    rgba = np.concatenate([rgb, alpha[..., None]], axis=-1).round().astype(np.uint8)
    im = Image.fromarray(rgba, "RGBA")
    _draw_shapes(im, rng, 3)
    im.save(IMAGES_DIR / "b.png", optimize=False)
    described.append({"file": "images/b.png", "mode": "RGBA", "size_wh": [30, 50]})

    # c.png: greyscale (mode L) 64x64 - checkerboard, radial gradient, noise, shapes.
    yy, xx = np.mgrid[0:64, 0:64].astype(np.float64)
    checker = ((xx // 8 + yy // 8) % 2) * 90.0
    radial = 160.0 * np.exp(-((xx - 40) ** 2 + (yy - 24) ** 2) / 300.0)
    grey = np.clip(checker + radial + rng.normal(0, 10.0, size=(64, 64)), 0, 255)
    im = Image.fromarray(grey.round().astype(np.uint8), "L")
    _draw_shapes(im, rng, 3)
    im.save(IMAGES_DIR / "c.png", optimize=False)
    described.append({"file": "images/c.png", "mode": "L", "size_wh": [64, 64]})

    # d.jpg: RGB 75x60 baseline JPEG, quality 90, 4:2:0 chroma subsampling (PIL's default,
    # and the common case in web data).  Its decoded RGB is also written to
    # images/decoded_d_jpg.json so JPEG-decoder differences can be told apart from resize ones.
    im = Image.fromarray(_structured_rgb(rng, 75, 60).round().astype(np.uint8), "RGB")
    _draw_shapes(im, rng, 5)
    im.save(IMAGES_DIR / "d.jpg", quality=90, subsampling="4:2:0", optimize=False, progressive=False)
    described.append({"file": "images/d.jpg", "mode": "RGB", "size_wh": [75, 60], "jpeg_quality": 90,
                      "jpeg_subsampling": "4:2:0"})

    # e.png: RGB 20x20 - smaller than both image sizes, so the resize upsamples.
    im = Image.fromarray(_structured_rgb(rng, 20, 20).round().astype(np.uint8), "RGB")
    _draw_shapes(im, rng, 2)
    im.save(IMAGES_DIR / "e.png", optimize=False)
    described.append({"file": "images/e.png", "mode": "RGB", "size_wh": [20, 20]})

    for d in described:
        with Image.open(OUT / d["file"]) as check:
            assert check.mode == d["mode"] and list(check.size) == d["size_wh"], (d, check.mode, check.size)

    with Image.open(IMAGES_DIR / "d.jpg") as im:
        decoded = np.asarray(im.convert("RGB"))
    write_json(IMAGES_DIR / "decoded_d_jpg.json", {
        "note": "d.jpg as decoded by Pillow (libjpeg-turbo, default DCT method and fancy "
                "upsampling): uint8, one line per image row of W*3 interleaved R,G,B values",
        "pillow_version": PIL.__version__,
        "libjpeg_turbo_version": PIL.features.version("libjpeg_turbo"),
        "size_wh": [decoded.shape[1], decoded.shape[0]],
        "rgb_rows": decoded.reshape(decoded.shape[0], -1).tolist(),
    })
    return described


def image_geometry(image_size: int) -> list[dict]:
    """Document what OpenCLIP's eval transform does to each image's geometry.

    Resize(image_size) on the shorter edge: new_short = image_size,
    new_long = int(image_size * long / short) (truncation, torchvision's formula); then
    CenterCrop: top = int(round((h - S) / 2)), left = int(round((w - S) / 2)) with Python's
    round (half to even!).  Asserted against torchvision's real Resize.
    """
    resize = torchvision.transforms.Resize(image_size, interpolation=torchvision.transforms.InterpolationMode.BICUBIC)
    rows = []
    for name in IMAGE_FILES:
        with Image.open(IMAGES_DIR / name) as im:
            w, h = im.size
            mode = im.mode
            resized = resize(im).size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = image_size, int(image_size * long / short)
        new_wh = (new_short, new_long) if w <= h else (new_long, new_short)
        assert tuple(resized) == new_wh, (name, resized, new_wh)
        left = int(round((new_wh[0] - image_size) / 2.0))
        top = int(round((new_wh[1] - image_size) / 2.0))
        rows.append({"file": "images/" + name, "mode": mode, "size_wh": [w, h],
                     "resized_wh": list(new_wh), "crop_left_top": [left, top]})
    return rows


def load_pixels(image_size: int) -> tuple[torch.Tensor, list[str]]:
    """Apply OpenCLIP's eval transform to each image file, exactly as OpenCLIP users do."""
    transform = open_clip.image_transform(image_size, is_train=False)
    pixels = []
    for name in IMAGE_FILES:
        with Image.open(IMAGES_DIR / name) as im:
            pixels.append(transform(im))
    steps = [repr(t) for t in transform.transforms]
    return torch.stack(pixels), steps


# ---------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------


def round_significant(t: torch.Tensor, bits: int) -> torch.Tensor:
    """Round float32 values to `bits` significant bits (round half to even on the bit pattern)."""
    if bits >= 24:
        return t
    drop = 24 - bits
    i = t.detach().contiguous().view(torch.int32).to(torch.int64)
    half = 1 << (drop - 1)
    lsb = (i >> drop) & 1
    i = ((i + half - 1 + lsb) >> drop) << drop
    return i.to(torch.int32).view(torch.float32).reshape(t.shape)


@torch.no_grad()
def perturb_(model: torch.nn.Module, seed: int) -> dict:
    """Perturb every parameter with seeded noise; returns the rule applied per parameter.

    * ``logit_scale``  -> ln(1/0.07) + 0.1
    * ``logit_bias``   -> init + 0.25
    * LayerNorm weights (``ln_*.weight``, ``ln_final.weight``) -> 1 + 0.1 * randn
    * LayerScale (``ls_*.gamma``) -> gamma + 0.1 * randn
    * every bias (1-d ``*bias``)  -> bias + 0.05 * randn (most start at zero)
    * everything else (matrices, conv, embeddings, class token, projections)
                                    -> p + 0.05 * randn
    Then every value is rounded to PARAM_SIGNIFICANT_BITS significant bits.
    """
    g = torch.Generator().manual_seed(seed)
    rules = {}
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        parent = name.rsplit(".", 2)[-2] if "." in name else ""
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if name == "logit_scale":
            p.fill_(math.log(1 / 0.07) + 0.1)
            rules[name] = "ln(1/0.07)+0.1"
        elif name == "logit_bias":
            p.add_(0.25)
            rules[name] = "init+0.25"
        elif leaf == "weight" and parent.startswith("ln"):
            p.copy_(1.0 + 0.1 * noise)
            rules[name] = "1+0.1*randn"
        elif leaf == "gamma":
            p.add_(0.1 * noise)
            rules[name] = "p+0.1*randn"
        elif leaf.endswith("bias"):
            p.add_(0.05 * noise)
            rules[name] = "p+0.05*randn"
        else:
            p.add_(0.05 * noise)
            rules[name] = "p+0.05*randn"
        p.copy_(round_significant(p, PARAM_SIGNIFICANT_BITS))
    return rules


@torch.no_grad()
def zero_unused_token_rows_(model: CLIP, used_ids: set[int]) -> None:
    """Zero token-embedding rows never used by a fixture token (keeps git blobs tiny)."""
    w = model.token_embedding.weight
    keep = torch.zeros(w.shape[0], dtype=torch.bool)
    keep[sorted(used_ids)] = True
    w[~keep] = 0.0


@torch.no_grad()
def evaluate(model: CLIP, pixels: torch.Tensor, tokens: torch.Tensor) -> dict:
    """All fp32 outputs OpenCLIP computes for the fixture images and texts."""
    model.eval()
    image_features = model.encode_image(pixels)
    image_embeddings = model.encode_image(pixels, normalize=True)
    text_features = model.encode_text(tokens)
    text_embeddings = model.encode_text(tokens, normalize=True)
    logits_per_image, logits_per_text = model.get_logits(pixels, tokens)
    # Cross-check get_logits against the formula the Rust side implements.
    manual = model.logit_scale.exp() * image_embeddings @ text_embeddings.T
    if model.logit_bias is not None:
        manual = manual + model.logit_bias
    assert torch.allclose(manual, logits_per_image, atol=1e-5, rtol=1e-5)
    assert torch.equal(logits_per_text, logits_per_image.T)
    out = {
        "image_features": to_list(image_features),
        "image_embeddings": to_list(image_embeddings),
        "text_features": to_list(text_features),
        "text_embeddings": to_list(text_embeddings),
        "logit_scale": scalar(model.logit_scale),
    }
    if model.logit_bias is not None:
        out["logit_bias"] = scalar(model.logit_bias)
    out["logits_per_image"] = to_list(logits_per_image)
    out["probs"] = to_list(logits_per_image.softmax(dim=-1))
    return out


def key_list(state_dict: dict) -> list:
    return [{"key": k, "shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
            for k, v in state_dict.items()]


def make_model_fixtures(name: str, cfg: dict, seed: int) -> dict:
    """Build, perturb, save and evaluate one OpenCLIP model; returns a summary."""
    out_dir = OUT / name
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "config.json", cfg)

    context_length = cfg["text_cfg"]["context_length"]
    image_size = cfg["vision_cfg"]["image_size"]

    # Tokens: OpenCLIP's default tokenizer, as open_clip.get_tokenizer returns for a
    # CLIP config without hf_tokenizer_name (SimpleTokenizer, clean='lower').
    tokens = open_clip.tokenize(TEXTS, context_length=context_length)
    tok2 = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)(TEXTS)
    assert torch.equal(tokens, tok2)
    used_ids = set(int(i) for i in tokens.flatten().tolist())

    torch.manual_seed(0)
    model = CLIP(**cfg)  # OpenCLIP's own class, fp32
    model.eval()
    rules = perturb_(model, seed)
    zero_unused_token_rows_(model, used_ids)

    state_dict = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    assert "attn_mask" not in state_dict, "attn_mask is a non-persistent buffer"
    assert set(state_dict) == {n for n, _ in model.named_parameters()}, "state dict == parameters"
    save_file(state_dict, str(out_dir / "open_clip_model.safetensors"), metadata={"format": "pt"})
    write_json(out_dir / "keys.json", {
        "note": "model.state_dict() of open_clip.model.CLIP, in order; 'attn_mask' is a "
                "non-persistent buffer and is not in it",
        "perturbation": rules,
        "keys": key_list(state_dict),
    })

    pixels, transform_steps = load_pixels(image_size)
    expected = versions()
    expected.update({
        "config": cfg,
        "texts": TEXTS,
        "tokens": to_list(tokens),
        "image_files": ["images/" + f for f in IMAGE_FILES],
        "image_transform": transform_steps,
        "image_geometry": image_geometry(image_size),
        "pixels": to_list(pixels),
    })
    expected.update(evaluate(model, pixels, tokens))

    if name == "tiny":
        save_torch_bin(state_dict, out_dir / "open_clip_pytorch_model.bin")
        sd16 = {k: v.to(torch.float16).contiguous() for k, v in state_dict.items()}
        save_file(sd16, str(out_dir / "open_clip_model_fp16.safetensors"), metadata={"format": "pt"})
        model16 = copy.deepcopy(model).half().float()  # fp16 weights, fp32 compute
        fp16 = {"note": "outputs of the fp16-weight model (state dict cast to float16, "
                        "loaded back into fp32) evaluated in fp32"}
        fp16.update(evaluate(model16, pixels, tokens))
        expected["fp16_weights"] = fp16

    write_json(out_dir / "expected.json", expected)
    n_params = sum(v.numel() for v in state_dict.values())
    return {"name": name, "params": n_params, "used_token_ids": len(used_ids),
            "tokens": tokens, "probs": expected["probs"]}


def verify_with_open_clip_loader(name: str) -> list[str]:
    """Reload the written files through OpenCLIP's public factory and compare.

    The config is registered with ``open_clip.add_model_config`` under its fixture name,
    then ``open_clip.create_model_and_transforms(name, pretrained=<file>)`` (OpenCLIP's
    ``load_checkpoint``, strict) loads each weight file; ``open_clip.get_tokenizer(name)``
    and the returned eval ``preprocess`` must reproduce ``tokens`` and ``pixels``, and the
    model must reproduce the recorded outputs exactly.
    """
    out_dir = OUT / name
    expected = json.loads((out_dir / "expected.json").read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = Path(tmp) / f"{name}.json"
        cfg_path.write_bytes((out_dir / "config.json").read_bytes())
        open_clip.add_model_config(cfg_path)
        tokens = open_clip.get_tokenizer(name)(expected["texts"])
        assert tokens.tolist() == expected["tokens"], "get_tokenizer differs"
        files = [("open_clip_model.safetensors", expected)]
        if name == "tiny":
            files += [("open_clip_pytorch_model.bin", expected),
                      ("open_clip_model_fp16.safetensors", expected["fp16_weights"])]
        checked = []
        for fname, want in files:
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(out_dir / fname))
            pixels = []
            for f in expected["image_files"]:
                with Image.open(OUT / f) as im:
                    pixels.append(preprocess(im))
            pixels = torch.stack(pixels)
            assert same_f32(to_list(pixels), expected["pixels"]), "preprocess differs"
            got = evaluate(model, pixels, tokens)
            for key, value in got.items():
                assert same_f32(value, want[key]), f"{name}/{fname}: {key} differs after reload"
            checked.append(fname)
    return checked


def save_torch_bin(state_dict: dict, path: Path) -> None:
    """torch.save the state dict (zip format); deterministic for a fixed file name."""
    torch.save(state_dict, str(path))


# ---------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------


def make_loss_fixtures() -> dict:
    """ClipLoss (full and per-rank local with a simulated all-gather) and SigLipLoss."""
    world, b, dim = 3, 4, 8
    n = world * b
    g = torch.Generator().manual_seed(1234)
    img = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1)
    # Texts correlated with images so the loss is neither trivial nor saturated.
    txt = torch.nn.functional.normalize(img + 0.8 * torch.randn(n, dim, generator=g), dim=-1)
    clip_scale_raw = 2.3

    def leaves(scale_raw: float, bias: float | None = None):
        li = img.clone().requires_grad_(True)
        lt = txt.clone().requires_grad_(True)
        ls = torch.tensor(scale_raw, dtype=torch.float32, requires_grad=True)
        lb = None if bias is None else torch.tensor(bias, dtype=torch.float32, requires_grad=True)
        return li, lt, ls, lb

    out = versions()
    out.update({
        "world_size": world,
        "batch_per_rank": b,
        "dim": dim,
        "image_features_all": to_list(img),
        "text_features_all": to_list(txt),
        "note": "features are already L2-normalised rows; losses receive exp(logit_scale_raw); "
                "gradients are w.r.t. the features and the raw (log) scale (and the bias)",
    })

    # -- clip_full: ClipLoss with world_size 1 on all 12 rows --------------------------
    li, lt, ls, _ = leaves(clip_scale_raw)
    loss = open_clip.loss.ClipLoss()(li, lt, ls.exp())
    loss.backward()
    full = {"logit_scale_raw": scalar(ls), "loss": scalar(loss),
            "grad_image_features": to_list(li.grad), "grad_text_features": to_list(lt.grad),
            "grad_logit_scale": scalar(ls.grad)}
    out["clip_full"] = full

    # -- clip_local: ClipLoss(local_loss, gather_with_grad) on each rank ---------------
    original_gather = open_clip.loss.gather_features
    per_rank = []
    try:
        for r in range(world):
            li, lt, ls, _ = leaves(clip_scale_raw)

            def fake_gather(image_features, text_features, local_loss=False, gather_with_grad=False,
                            rank=0, world_size=1, use_horovod=False, _li=li, _lt=lt, _r=r):
                """Stand-in for torch.distributed.nn.all_gather: every rank's rows are live
                views of the full leaf matrices (as gather_with_grad gives), rank r's rows are
                exactly the tensors this rank passed in."""
                assert local_loss and gather_with_grad and rank == _r and world_size == world
                imgs = [image_features if q == rank else _li[q * b:(q + 1) * b] for q in range(world)]
                txts = [text_features if q == rank else _lt[q * b:(q + 1) * b] for q in range(world)]
                return torch.cat(imgs), torch.cat(txts)

            open_clip.loss.gather_features = fake_gather
            loss_fn = open_clip.loss.ClipLoss(local_loss=True, gather_with_grad=True, rank=r, world_size=world)
            loss = loss_fn(li[r * b:(r + 1) * b], lt[r * b:(r + 1) * b], ls.exp())
            loss.backward()
            per_rank.append({"rank": r, "loss": scalar(loss),
                             "labels": [r * b + i for i in range(b)],
                             "grad_image_features": li.grad.clone(), "grad_text_features": lt.grad.clone(),
                             "grad_logit_scale": ls.grad.clone()})
    finally:
        open_clip.loss.gather_features = original_gather

    mean_loss = torch.tensor([p["loss"] for p in per_rank], dtype=torch.float32).mean()
    sum_gi = sum(p["grad_image_features"] for p in per_rank)
    sum_gt = sum(p["grad_text_features"] for p in per_rank)
    sum_gs = sum(p["grad_logit_scale"] for p in per_rank)
    # The mean of the local losses is the global loss, and the summed gradients are
    # world_size times its gradient.
    assert abs(mean_loss.item() - full["loss"]) < 1e-5
    assert torch.allclose(sum_gi / world, torch.tensor(full["grad_image_features"]), atol=1e-6)
    assert torch.allclose(sum_gt / world, torch.tensor(full["grad_text_features"]), atol=1e-6)
    assert abs(sum_gs.item() / world - full["grad_logit_scale"]) < 1e-5
    out["clip_local"] = {
        "logit_scale_raw": float(np.float32(clip_scale_raw)),
        "note": "per rank r: ClipLoss(local_loss=True, gather_with_grad=True, rank=r, world_size=3) "
                "on rows r*4..r*4+4 against all 12 gathered rows, labels r*4+i; gradients are "
                "w.r.t. the full 12x8 leaf matrices. mean_loss equals clip_full.loss; the summed "
                "gradients equal world_size * clip_full gradients",
        "per_rank": [{"rank": p["rank"], "loss": p["loss"], "labels": p["labels"],
                      "grad_image_features": to_list(p["grad_image_features"]),
                      "grad_text_features": to_list(p["grad_text_features"]),
                      "grad_logit_scale": scalar(p["grad_logit_scale"])} for p in per_rank],
        "mean_loss": scalar(mean_loss),
        "sum_grad_image_features": to_list(sum_gi),
        "sum_grad_text_features": to_list(sum_gt),
        "sum_grad_logit_scale": scalar(sum_gs),
    }

    # -- siglip: SigLipLoss(rank=0, world_size=1) on the 12 rows ------------------------
    cases = []
    for scale_raw, bias in [(math.log(10.0), -10.0), (1.7, -2.5)]:
        li, lt, ls, lb = leaves(scale_raw, bias)
        loss = open_clip.loss.SigLipLoss(rank=0, world_size=1)(li, lt, ls.exp(), lb)
        loss.backward()
        cases.append({"logit_scale_raw": scalar(ls), "logit_bias": scalar(lb), "loss": scalar(loss),
                      "grad_image_features": to_list(li.grad), "grad_text_features": to_list(lt.grad),
                      "grad_logit_scale": scalar(ls.grad), "grad_logit_bias": scalar(lb.grad)})
    out["siglip"] = cases

    write_json(OUT / "losses.json", out)
    return {"clip_full": full["loss"], "clip_local_mean": scalar(mean_loss),
            "siglip": [c["loss"] for c in cases]}


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    print(f"open_clip {open_clip.__version__}, torch {torch.__version__}, "
          f"torchvision {torchvision.__version__}, Pillow {PIL.__version__}")
    images = make_images()
    print(f"images: {', '.join(d['file'] + ' ' + d['mode'] + ' ' + 'x'.join(map(str, d['size_wh'])) for d in images)}")

    for seed, (name, cfg) in enumerate(MODEL_CONFIGS.items(), start=100):
        s = make_model_fixtures(name, cfg, seed)
        print(f"{name}: {s['params']} parameters, {s['used_token_ids']} token rows kept")
        print(f"  reloaded with open_clip.create_model_and_transforms: {', '.join(verify_with_open_clip_loader(name))}")
        print(f"  token lengths (incl. sot/eot, before padding): "
              f"{[int((row != 0).sum()) for row in s['tokens']]}")
        print("  probs (rows = images):")
        for row in s["probs"]:
            print("   ", " ".join(f"{p:.3f}" for p in row))

    losses = make_loss_fixtures()
    print(f"losses: clip_full {losses['clip_full']:.6f}, clip_local mean {losses['clip_local_mean']:.6f}, "
          f"siglip {', '.join(f'{v:.6f}' for v in losses['siglip'])}")

    print("files (sha256 prefix, bytes):")
    for path in sorted(p for p in OUT.rglob("*") if p.is_file()):
        data = path.read_bytes()
        print(f"  {hashlib.sha256(data).hexdigest()[:16]}  {len(data):>9}  {path.relative_to(OUT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
