"""Per built-in model: the service's input gradient against the same Chainer code in-process,
side by side in one run, and the server's resident memory with that model loaded.

For each model a server is started serving only that model (``--model NAME=random:0``) and
the same seeded weights are built here; both compute ``chainer.grad`` of the class score
281 at the logits layer with respect to one prepared input (batch 1), with the server's
CPU kernels installed here too, so the ratio measures the service alone. Pairs alternate
which side goes first; a pair during which other processes kept CPUs busy is measured again
(see ``bench.side_by_side``). Writes ``bench-results/models.json`` and prints a table with
each model's target (service / in-process <= 1.03) as met or NOT met.

    .venv/bin/python scripts/bench_models.py [--repeat 5] [NAME ...]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time

import layergrad
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench import CpuMeter, side_by_side

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench-results" / "models.json"
MODELS = ("vgg16", "vgg19", "googlenet", "resnet50", "resnet101", "resnet152")
TARGET = 1.03
CLASS = 281


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) * 1024


def measure(name: str, repeat: int, warmup: int, logs: pathlib.Path) -> dict[str, object]:
    import chainer
    import chainer.functions as F  # noqa: N812
    from layergrad_server import kernels
    from layergrad_server.launch import ServerProcess
    from layergrad_server.models.repository import BUILTIN_NAMES
    from layergrad_server.models.vision import BUILTINS

    kernels.install()  # the server's default --cpu-kernels fast
    adapter = BUILTINS[BUILTIN_NAMES[name]]()
    net = adapter.random(0)
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((1, *adapter.input_spec.shape)) * 50).astype(np.float32)
    logits = adapter.logits_layer
    assert logits is not None

    def in_process() -> np.ndarray:
        with chainer.using_config("train", False):
            v = chainer.Variable(x)
            y = adapter.forward_layers(net, v, [logits])[logits]
            (grad,) = chainer.grad([F.sum(F.select_item(y, np.array([CLASS], np.int32)))], [v])
        return grad.array

    with ServerProcess([f"--model={name}=random:0"], logs / f"{name}.log") as server:
        server.wait_serving(timeout=900)
        resident = rss_bytes(server.process.pid)
        with layergrad.Client(server.address, timeout=900) as client:

            def service() -> np.ndarray:
                return client.input_gradient(x, layergrad.ClassScore(logits, [CLASS]), model=name)

            timing = side_by_side(in_process, service, repeat, warmup, CpuMeter(server.process.pid))
        server.terminate()
    expected, got = timing["result_a"], timing["result_b"]
    ratios = [b / a for a, b in zip(timing["a"], timing["b"], strict=True)]
    ratio = statistics.median(timing["b"]) / statistics.median(timing["a"])
    return {
        "model": name,
        "in_process_median_s": statistics.median(timing["a"]),
        "service_median_s": statistics.median(timing["b"]),
        "ratio": ratio,
        "pair_ratios": ratios,
        "pairs": len(ratios),
        "set_aside": timing["set_aside"],
        "other_cpus": timing["other_cpus"],
        "identical": bool(np.array_equal(expected, got)),
        "server_resident_bytes": resident,
        "parameter_bytes": sum(p.size * p.dtype.itemsize for p in net.params()),
        "target": TARGET,
        "met": ratio <= TARGET,
    }


def render(rows: list[dict[str, object]]) -> str:
    lines = [
        f"{'model':<10} {'in-process':>11} {'service':>9} {'ratio':>6} {'target':>12} "
        f"{'server RSS':>11} {'params':>9} {'identical':>9}"
    ]
    for row in rows:
        verdict = f"<= {TARGET} {'met' if row['met'] else 'NOT met'}"
        lines.append(
            f"{row['model']:<10} {row['in_process_median_s']:>10.3f}s {row['service_median_s']:>8.3f}s "
            f"{row['ratio']:>6.3f} {verdict:>12} {row['server_resident_bytes'] / 1e9:>9.2f}GB "
            f"{row['parameter_bytes'] / 1e9:>7.2f}GB {row['identical']!s:>9}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", default=list(MODELS), help="built-in model names")
    parser.add_argument("--repeat", type=int, default=5, help="timed pairs per model (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed pairs first (default 1)")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="JSON results path")
    args = parser.parse_args(argv)
    import layergrad_server  # noqa: F401  (the numpy 2 shim before Chainer loads)

    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as logs:
        for name in args.models:
            rows.append(measure(name, args.repeat, args.warmup, pathlib.Path(logs)))
            print(render(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(render(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"models": rows, "seconds": time.perf_counter() - started}, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
