"""Prints, for each built-in model on seeded random weights: build time, resident memory after
loading, logits scale and the time of one input gradient at batch 1.

Each model runs in its own subprocess so that resident memory is that model's alone.

    .venv/bin/python scripts/model_figures.py [NAME ...]
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

CHILD = r"""
import json, resource, sys, time
import layergrad_server  # applies the numpy 2 shim before Chainer loads
import chainer, chainer.functions as F, numpy as np
from layergrad_server.models import BUILTINS, trace

adapter = BUILTINS[sys.argv[1]]()
started = time.perf_counter()
net = adapter.random(0)
built = time.perf_counter() - started
with open("/proc/self/status") as status:
    rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) * 1024
trace(adapter, net)
shape = (1, *adapter.input_spec.shape)
x = chainer.Variable((np.random.default_rng(1).standard_normal(shape) * 50).astype(np.float32))
with chainer.using_config("train", False):
    started = time.perf_counter()
    acts = adapter.forward(net, x, [adapter.logits_layer, adapter.probability_layer]).layers
    (grad,) = chainer.grad([F.sum(F.square(acts[adapter.probability_layer]))], [x])
    seconds = time.perf_counter() - started
print(json.dumps({
    "model": adapter.name, "build_s": built, "rss_gb": rss / 1e9, "input_gradient_s": seconds,
    "logits_std": float(acts[adapter.logits_layer].array.std()),
    "max_prob": float(acts[adapter.probability_layer].array.max()),
    "parameters": sum(p.size for p in net.params()),
}))
"""


def main(names: list[str]) -> None:
    names = names or ["VGG16", "VGG19", "GoogLeNet", "ResNet50", "ResNet101", "ResNet152"]
    header = ("params", 11), ("build s", 8), ("RSS GB", 7), ("grad s", 7), ("logit std", 9), ("max p", 6)
    print(f"{'model':10} " + " ".join(f"{title:>{width}}" for title, width in header))
    for name in names:
        started = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", CHILD, name], capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{row['model']:10} {row['parameters']:>11,} {row['build_s']:>8.1f} {row['rss_gb']:>7.2f} "
            f"{row['input_gradient_s']:>7.2f} {row['logits_std']:>9.2f} {row['max_prob']:>6.3f}"
            f"   ({time.perf_counter() - started:.0f} s in all)"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
