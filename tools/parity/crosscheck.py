"""Cross-check the `distclip` binary against OpenCLIP on configs and images beyond the fixtures.

Reference tooling only (the Rust tests never run it). Two directions:

1. OpenCLIP -> distclip: for several OpenCLIP-style ViT configs (presets and hand-made ones that
   switch on every option distclip supports), build the model with OpenCLIP's own class, perturb
   every parameter, save `open_clip_model.safetensors`, run `distclip embed` on real photos
   (scikit-image samples, JPEG and PNG, non-square) and captions, and compare the normalised
   embeddings and zero-shot probabilities with OpenCLIP's.
2. distclip -> OpenCLIP: `distclip init` writes a model; OpenCLIP loads it with
   `load_state_dict(strict=True)`; both embed the same inputs; compare.

Usage:
    ~/.cache/distclip-anchor-venv/bin/python tools/parity/crosscheck.py [--distclip PATH] [--device flex]

Exit status 1 if any max abs error exceeds 1e-4. Prints one JSON line per check.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import open_clip
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

TOL = 1e-4
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CAPTIONS = [
    "a photo of an astronaut",
    "a cup of coffee on a table",
    "a cat looking at the camera",
    "Ein Foto von einer Rakete 🚀 — &amp; 宇宙飛行士",
    "a very long caption " + "that keeps going and going " * 12,
]

# Hand-made configs that exercise every option distclip implements.
CUSTOM = {
    "custom-avgpool": {
        "embed_dim": 40,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 96, "head_width": 24, "patch_size": 16,
                       "mlp_ratio": 3.25, "pool_type": "avg", "final_ln_after_pool": True, "no_ln_pre": True},
        "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2,
                     "pool_type": "last", "proj_bias": True, "no_causal_mask": True, "final_ln_after_pool": True},
    },
    "custom-eos-ls-bias": {
        "embed_dim": 48,
        "quick_gelu": True,
        "init_logit_bias": -10.0,
        "vision_cfg": {"image_size": 56, "layers": 3, "width": 64, "head_width": 16, "patch_size": 14,
                       "ls_init_value": 0.1},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2,
                     "pool_type": "eos", "eos_id": 49407, "ls_init_value": 0.1},
    },
}
PRESETS = ["ViT-B-32", "ViT-B-16-quickgelu", "ViT-M-16-alt"]


def photos(outdir):
    """Real photos from scikit-image, saved as JPEG and PNG at awkward sizes."""
    from skimage import data

    paths = []
    for name, size, fmt in [("astronaut", (300, 220), "JPEG"), ("coffee", (451, 300), "PNG"),
                            ("chelsea", (180, 251), "JPEG"), ("rocket", (97, 143), "JPEG")]:
        img = Image.fromarray(getattr(data, name)()).convert("RGB").resize(size, Image.BICUBIC)
        path = os.path.join(outdir, f"{name}.{'jpg' if fmt == 'JPEG' else 'png'}")
        img.save(path, fmt, **({"quality": 87} if fmt == "JPEG" else {}))
        paths.append(path)
    grey = Image.fromarray(data.camera()).resize((120, 90), Image.BICUBIC)
    gpath = os.path.join(outdir, "camera-grey.jpg")
    grey.save(gpath, "JPEG", quality=80)
    paths.append(gpath)
    rgba = Image.fromarray(data.astronaut()).convert("RGBA").resize((64, 80))
    arr = np.array(rgba)
    arr[..., 3] = np.linspace(0, 255, arr.shape[1], dtype=np.uint8)[None, :]
    apath = os.path.join(outdir, "astronaut-alpha.png")
    Image.fromarray(arr, "RGBA").save(apath)
    paths.append(apath)
    return paths


def perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))


def openclip_embed(model, cfg, images, texts):
    preprocess = open_clip.image_transform(cfg["vision_cfg"]["image_size"], is_train=False)
    tok = open_clip.get_tokenizer("ViT-B-32", context_length=cfg["text_cfg"].get("context_length", 77))
    model.eval()
    with torch.no_grad():
        pix = torch.stack([preprocess(Image.open(p)) for p in images])
        img = model.encode_image(pix, normalize=True)
        txt = model.encode_text(tok(texts), normalize=True)
        logits = model.logit_scale.exp() * img @ txt.T
        if model.logit_bias is not None:
            logits = logits + model.logit_bias
        probs = logits.softmax(dim=-1)
    return img.numpy(), txt.numpy(), probs.numpy(), float(model.logit_scale.exp().detach())


def distclip_embed(binary, device, model_arg, ckpt, images, texts):
    cmd = [binary, "embed", "--model", model_arg, "--checkpoint", ckpt, "--device", device]
    for p in images:
        cmd += ["--image", p]
    for t in texts:
        cmd += ["--text", t]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    return (np.array(r["image_embeddings"]), np.array(r["text_embeddings"]), np.array(r["probs"]),
            r["logit_scale"])


def compare(label, ours, theirs):
    names = ["image_embeddings", "text_embeddings", "probs"]
    errs = {n: float(np.abs(a - b).max()) for n, a, b in zip(names, ours[:3], theirs[:3])}
    errs["logit_scale_rel"] = abs(ours[3] - theirs[3]) / theirs[3]
    ok = all(v <= TOL for v in errs.values())
    print(json.dumps({"check": label, "ok": ok, "max_abs_err": errs}), flush=True)
    return ok


def compare_init(name, ours, theirs):
    """distclip's init scheme against OpenCLIP's: same keys, shapes, and per-tensor mean/std."""
    bad = []
    for k, t in theirs.items():
        o = ours[k]
        if o.shape != t.shape:
            bad.append(f"{k}: shape {tuple(o.shape)} vs {tuple(t.shape)}")
            continue
        if t.numel() < 64:  # scalars and tiny vectors: compare the values' spread loosely
            if abs(float(o.float().mean()) - float(t.float().mean())) > 0.1:
                bad.append(f"{k}: mean {float(o.mean()):.4f} vs {float(t.mean()):.4f}")
            continue
        so, st = float(o.float().std()), float(t.float().std())
        mo, mt = float(o.float().mean()), float(t.float().mean())
        # Two independent samples of n draws: their stds differ by ~1/sqrt(n) relative and their
        # means by ~sqrt(2/n) std; allow 5 of those (hundreds of tensors are compared).
        n = t.numel()
        std_tol = 5 / n ** 0.5 + 0.01
        mean_tol = 5 * 2 ** 0.5 * max(st, 1e-3) / n ** 0.5 + 1e-6
        if (st > 0 and abs(so / st - 1) > std_tol) or (st == 0 and so != 0) or abs(mo - mt) > mean_tol:
            bad.append(f"{k}: mean/std {mo:.4g}/{so:.4g} vs OpenCLIP {mt:.4g}/{st:.4g}")
    ok = not bad and set(ours) == set(theirs)
    print(json.dumps({"check": f"distclip init scheme vs OpenCLIP init {name}", "ok": ok, "mismatches": bad[:10]}), flush=True)
    return ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--distclip", default=os.path.join(
        os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release", "distclip"))
    ap.add_argument("--device", default="flex")
    args = ap.parse_args()
    torch.set_num_threads(2)
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        images = photos(tmp)
        configs = {name: json.load(open(os.path.join(ROOT, "crates/distclip-model/configs", f"{name}.json")))
                   for name in PRESETS}
        configs.update(CUSTOM)
        for i, (name, cfg) in enumerate(configs.items()):
            torch.manual_seed(i)
            model = open_clip.model.CLIP(**cfg)
            perturb(model, i)
            cfg_path = os.path.join(tmp, f"{name}.json")
            json.dump(cfg, open(cfg_path, "w"))
            ckpt = os.path.join(tmp, f"{name}.safetensors")
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ckpt)
            theirs = openclip_embed(model, cfg, images, CAPTIONS)
            ours = distclip_embed(args.distclip, args.device, cfg_path, ckpt, images, CAPTIONS)
            ok &= compare(f"openclip->distclip {name}", ours, theirs)

        for name in ["tiny", "ViT-B-32"]:
            out = os.path.join(tmp, f"init-{name}.safetensors")
            subprocess.run([args.distclip, "init", "--model", name, "--out", out, "--seed", "7"],
                           check=True, capture_output=True)
            cfg = json.load(open(os.path.join(ROOT, "crates/distclip-model/configs", f"{name}.json")))
            model = open_clip.model.CLIP(**cfg)
            ok &= compare_init(name, load_file(out), model.state_dict())
            model.load_state_dict(load_file(out), strict=True)
            theirs = openclip_embed(model, cfg, images, CAPTIONS)
            ours = distclip_embed(args.distclip, args.device, name, out, images, CAPTIONS)
            ok &= compare(f"distclip init -> openclip strict load {name}", ours, theirs)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
