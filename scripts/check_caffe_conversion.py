"""Compares the weights converter with Chainer's own conversion on a synthetic model, bit for bit.

    PYTHONPATH=client:server python scripts/check_caffe_conversion.py MODEL [DIR]

MODEL is googlenet, resnet50, resnet101 or resnet152.

Writes seeded random blobs shaped like the published caffemodel's layers, has
``tests/chainer_caffe_reference.py`` write them as a caffemodel with Chainer's schema
and convert it with Chainer (``CaffeFunction`` and the model's ``_transfer_*``),
converts the same file with :func:`layergrad_server.weights.convert.convert_caffemodel`,
and compares every array (keys, dtypes, shapes, values). Exits 1 on any difference.
Slow: Chainer's schema needs protobuf's pure-Python parser (about 5 minutes and
2.5 GB for ResNet-101).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from layergrad_server.weights.convert import MODELS, LinearLayer, convert_caffemodel

REPO = Path(__file__).resolve().parent.parent


def synthetic(model: str, directory: Path, seed: int = 1) -> None:
    """Writes ``layers.json`` and ``blobs.npz`` for ``model`` into ``directory``."""
    rng = np.random.default_rng(seed)
    layers: list[dict[str, object]] = []
    blobs: dict[str, np.ndarray] = {}

    def add(name: str, kind: str, arrays: list[np.ndarray]) -> None:
        layers.append({"name": name, "type": kind, "blobs": len(arrays)})
        blobs.update({f"{name}|{i}": array for i, array in enumerate(arrays)})

    for rule in MODELS[model].rules:
        if isinstance(rule, LinearLayer):
            arrays = [rng.standard_normal(rule.weight, dtype=np.float32)]
            if rule.bias is not None and not rule.bias_optional:
                arrays.append(rng.standard_normal(rule.bias, dtype=np.float32))
            add(rule.caffe_name, rule.caffe_type, arrays)
        else:
            c = rule.channels
            add(
                rule.bn_name,
                "BatchNorm",
                [
                    rng.standard_normal(c, dtype=np.float32),
                    rng.random(c, dtype=np.float32) + np.float32(0.1),
                    np.array([rng.uniform(0.5, 2.0)], np.float32),
                ],
            )
            add(rule.scale_name, "Scale", [rng.standard_normal(c, dtype=np.float32) for _ in range(2)])
    (directory / "layers.json").write_text(json.dumps(layers))
    np.savez(directory / "blobs.npz", **blobs)


def main(model: str, workdir: str | None = None) -> int:
    directory = Path(workdir or tempfile.mkdtemp(prefix=f"caffe-{model}-"))
    directory.mkdir(parents=True, exist_ok=True)
    synthetic(model, directory)
    started = time.monotonic()
    names = ("layers.json", "blobs.npz", "model.caffemodel", "chainer.npz")
    subprocess.run(
        [
            sys.executable,
            str(REPO / "tests" / "chainer_caffe_reference.py"),
            model,
            *(str(directory / n) for n in names),
        ],
        check=True,
    )
    chainer_s = time.monotonic() - started
    started = time.monotonic()
    ours = convert_caffemodel(directory / "model.caffemodel", directory / "ours.npz", model)
    ours_s = time.monotonic() - started
    with np.load(directory / "chainer.npz") as expected, np.load(ours) as got:
        differ = sorted(set(expected.files) ^ set(got.files))
        differ += [
            key
            for key in sorted(set(expected.files) & set(got.files))
            if expected[key].dtype != got[key].dtype or not np.array_equal(expected[key], got[key])
        ]
        count = len(expected.files)
    print(f"{model}: {count} arrays, {len(differ)} differ; Chainer {chainer_s:.0f} s, ours {ours_s:.1f} s")
    for key in differ[:20]:
        print(f"  differs: {key}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
