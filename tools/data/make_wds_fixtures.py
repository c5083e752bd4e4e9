#!/usr/bin/env python3
"""Write the WebDataset interop fixtures under tests/fixtures/wds/ with python webdataset 1.0.2.

Run with the anchor venv (it has webdataset 1.0.2 and Pillow):
    ~/.cache/distclip-anchor-venv/bin/python tools/data/make_wds_fixtures.py

Outputs:
- python-shards/00000.tar, 00001.tar: samples written by webdataset.ShardWriter (jpg/png/webp images,
  captions in txt or in json["caption"], grey and RGBA images, a LAION-style key layout).
- python-shards/expected.json: per sample the key, shard, index, caption, image extension and
  size, and the mean of PIL's RGB conversion per channel, which distclip must reproduce.
- python-gz/00000.tar.gz: a gzip-compressed shard written by webdataset.TarWriter, with
  gzip-compressed members (`txt.gz`, `json.gz`) and keys under directory prefixes.
- python-gz/truncated-*.tar: a plain shard cut inside a member's data and inside a header.
- python-gz/expected.json: what python webdataset (WebDataset(...).decode(), errors ignored)
  yields from each: keys, member extensions, and the decoded captions.
- writer-reference.json: the headers of a tar that webdataset.TarWriter writes for fixed samples
  with a pinned mtime (every 512-byte header block in hex, plus parsed fields and the file size);
  distclip's writer must produce the same headers for the same samples.
"""
import io
import json
import os
import tarfile

import numpy as np
import webdataset as wds
from PIL import Image

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "wds")
MTIME = 1700000000


def image_bytes(mode, size, fmt, seed, **kw):
    rng = np.random.default_rng(seed)
    w, h = size
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    # Smooth gradients plus mild noise: compressible, and lossy codecs keep the mean.
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // max(w - 1, 1) + 40 * c) % 256 for c in range(channels)], -1)
    noise = rng.integers(0, 20, size=(h, w, channels))
    arr = np.clip(base + noise, 0, 255).astype(np.uint8)
    if channels == 1:
        arr = arr[..., 0]
    img = Image.fromarray(arr, mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def rgb_mean(data):
    img = Image.open(io.BytesIO(data))
    img.load()
    rgb = np.asarray(img.convert("RGB"), dtype=np.float64)
    return [float(v) for v in rgb.reshape(-1, 3).mean(0)], img.size


def python_shards():
    d = os.path.join(OUT, "python-shards")
    os.makedirs(d, exist_ok=True)
    samples = [
        ("000000000", "jpg", image_bytes("RGB", (40, 30), "JPEG", 0, quality=90), "txt", "a red circle at the top left"),
        ("000000001", "png", image_bytes("RGB", (24, 36), "PNG", 1), "txt", "a blue square"),
        ("000000002", "webp", image_bytes("RGB", (32, 32), "WEBP", 2, lossless=True), "txt", "une photo d'un chat 🐱"),
        ("000000003", "jpg", image_bytes("L", (20, 28), "JPEG", 3, quality=95), "json", "a grey picture"),
        ("000000004", "png", image_bytes("RGBA", (30, 20), "PNG", 4), "txt", "a transparent star"),
        ("000000005", "webp", image_bytes("RGB", (28, 20), "WEBP", 5, quality=80), "json", "a lossy webp"),
    ]
    expected = []
    with wds.ShardWriter(os.path.join(d, "%05d.tar"), maxcount=4, mtime=MTIME) as sink:
        for i, (key, ext, img, cap_ext, caption) in enumerate(samples):
            sample = {"__key__": key, ext: img}
            if cap_ext == "txt":
                sample["txt"] = caption
            sample["json"] = {"key": key, "caption": caption, "status": "success"}
            sink.write(sample)
            mean, size = rgb_mean(img)
            expected.append({
                "key": key, "shard": i // 4, "index": i % 4, "caption": caption, "caption_in_txt": cap_ext == "txt",
                "ext": ext, "width": size[0], "height": size[1], "rgb_mean": mean,
            })
    with open(os.path.join(d, "expected.json"), "w") as f:
        json.dump({"webdataset": wds.__version__, "samples": expected}, f, indent=1, ensure_ascii=False)


def writer_reference():
    samples = [
        {"__key__": "000000000", "jpg": b"\xff\xd8\xff" + bytes(range(256)) * 3, "txt": "a red circle", "json": b'{"caption": "a red circle"}'},
        {"__key__": "000000001", "jpg": b"\xff\xd8\xff" + b"x" * 511, "txt": "", "json": b"{}"},
        {"__key__": "000000002", "jpg": b"\xff\xd8\xff" + b"y" * 509, "txt": "caf\u00e9 \u2603", "json": b'{"a": 1}'},
    ]
    buf = io.BytesIO()
    with wds.TarWriter(buf, mtime=MTIME) as w:
        for s in samples:
            w.write(dict(s))
    data = buf.getvalue()
    headers = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        for m in tf.getmembers():
            block = data[m.offset:m.offset + 512]
            headers.append({
                "name": m.name, "size": m.size, "mode": m.mode, "uid": m.uid, "gid": m.gid,
                "uname": m.uname, "gname": m.gname, "mtime": m.mtime, "type": m.type.decode(),
                "offset": m.offset, "header_hex": block.hex(),
            })
    ref = {
        "webdataset": wds.__version__, "mtime": MTIME, "file_size": len(data),
        "samples": [{k: (v.encode() if isinstance(v, str) else v).hex() if k != "__key__" else v for k, v in s.items()} for s in samples],
        "members": headers,
    }
    with open(os.path.join(OUT, "writer-reference.json"), "w") as f:
        json.dump(ref, f, indent=1)


def python_read(url):
    """What python webdataset yields from one shard: keys, extensions, decoded captions."""
    out = []
    ds = wds.WebDataset(url, shardshuffle=False, handler=wds.ignore_and_continue).decode(handler=wds.ignore_and_continue)
    for s in ds:
        exts = sorted(k for k in s if not k.startswith("__"))
        caption = s.get("txt", s.get("txt.gz"))
        meta = s.get("json", s.get("json.gz"))
        out.append({
            "key": s["__key__"], "exts": exts, "caption": caption,
            "json_caption": meta.get("caption") if isinstance(meta, dict) else None,
        })
    return out


def python_gz():
    d = os.path.join(OUT, "python-gz")
    os.makedirs(d, exist_ok=True)
    samples = []
    for i in range(4):
        key = f"{'part-a' if i < 2 else 'part-b/sub'}/{i:09d}"
        caption = f"a gzip caption number {i}"
        sample = {"__key__": key, "jpg": image_bytes("RGB", (16, 12), "JPEG", 10 + i, quality=90)}
        # TarWriter gzip-compresses the value of a `.gz` key itself.
        if i % 2 == 0:
            sample["txt.gz"] = caption
        else:
            sample["txt"] = caption
        sample["json.gz"] = {"caption": caption, "i": i}
        samples.append(sample)
    gz = os.path.join(d, "00000.tar.gz")
    with wds.TarWriter(gz, mtime=MTIME) as w:
        for s in samples:
            w.write(dict(s))
    plain = io.BytesIO()
    with wds.TarWriter(plain, mtime=MTIME) as w:
        for i in range(3):
            w.write({"__key__": f"{i:09d}", "jpg": image_bytes("RGB", (16, 12), "JPEG", 20 + i, quality=90),
                     "txt": f"caption {i}".encode()})
    data = plain.getvalue()
    members = tarfile.open(fileobj=io.BytesIO(data)).getmembers()
    last = {m.name: m for m in members}
    cuts = {
        # Inside the data of the last sample's txt: its jpg was read whole.
        "truncated-data.tar": last["000000002.txt"].offset_data + 3,
        # Inside the header of the last sample's txt.
        "truncated-header.tar": last["000000002.txt"].offset + 100,
    }
    expected = {"webdataset": wds.__version__, "shards": {}}
    expected["shards"]["00000.tar.gz"] = python_read(gz)
    for name, at in cuts.items():
        path = os.path.join(d, name)
        with open(path, "wb") as f:
            f.write(data[:at])
        expected["shards"][name] = python_read(path)
    with open(os.path.join(d, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)


if __name__ == "__main__":
    python_shards()
    python_gz()
    writer_reference()
