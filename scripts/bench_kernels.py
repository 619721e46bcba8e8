"""Stock Chainer CPU kernels against ``layergrad_server.kernels``, and PyTorch, on VGG16.

Run with ``.venv/bin/python scripts/bench_kernels.py [--repeat N] [--batch B]``. In one process,
on seeded random weights (``engine.random_weights_npz``) and one seeded input batch, the script

* checks that the fast kernels give bit-identical results to stock Chainer: the input gradient,
  every parameter gradient of ``backward()``, the layer gradients of ``backward(retain_grad=True)``,
  both with the BLAS default thread count and with one BLAS thread;
* times, interleaved round by round (warm-up first, medians over ``--repeat`` rounds), the input
  gradient (``chainer.grad`` of ``fc8[:, 7].sum()``, ``train=False``) with stock and fast kernels
  and the same network in PyTorch on the CPU, and the all-parameters ``backward()`` with stock and
  fast kernels; PyTorch runs in a child process (its thread pool set to passive waiting), driven
  one gradient per round through a pipe so that it takes its turn in the same rounds;
* prints the medians and the ratios fast/stock and fast/torch.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
for _path in (ROOT / "server", ROOT / "client", ROOT / "scripts"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import layergrad_server  # noqa: E402,F401  (the numpy 2 shim Chainer needs)

# isort: split
import chainer  # noqa: E402
import chainer.functions as F  # noqa: E402,N812
from chainer.links.model.vision import vgg  # noqa: E402
from layergrad_server import engine, kernels  # noqa: E402

SEED = 0
CLASS = 7


def make_input(batch: int) -> np.ndarray:
    """A seeded batch in VGG16's prepared range (pixels minus the mean, roughly -128..128)."""
    return (np.random.default_rng(1).standard_normal((batch, *engine.INPUT_SHAPE)) * 50).astype(np.float32)


def loss_of(fc8: chainer.Variable) -> chainer.Variable:
    return F.sum(F.select_item(fc8, np.full(fc8.shape[0], CLASS, dtype=np.int32)))


def input_gradient(net: vgg.VGG16Layers, x: np.ndarray) -> np.ndarray:
    """d fc8[:, CLASS].sum() / d x with ``chainer.grad``."""
    with chainer.using_config("train", False):
        variable = chainer.Variable(x)
        loss = loss_of(net.forward(variable, layers=["fc8"])["fc8"])
        (gx,) = chainer.grad([loss], [variable])
    return gx.array


def all_gradients(net: vgg.VGG16Layers, x: np.ndarray, layers: list[str]) -> dict[str, np.ndarray]:
    """``backward(retain_grad=True)``: every parameter gradient, the input's and ``layers``'."""
    with chainer.using_config("train", False):
        variable = chainer.Variable(x)
        acts = net.forward(variable, layers=[*layers, "fc8"])
        net.cleargrads()
        loss_of(acts["fc8"]).backward(retain_grad=True)
    out = {name: param.grad.copy() for name, param in net.namedparams()}
    out["input"] = variable.grad.copy()
    out.update({f"layer:{name}": acts[name].grad.copy() for name in layers})
    return out


def backward_all_parameters(net: vgg.VGG16Layers, x: np.ndarray) -> None:
    """``net.cleargrads(); loss.backward()``: all parameter gradients."""
    with chainer.using_config("train", False):
        loss = loss_of(net.forward(chainer.Variable(x), layers=["fc8"])["fc8"])
        net.cleargrads()
        loss.backward()


def bit_identical(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> list[str]:
    """Names whose arrays differ in any bit."""
    return [
        name
        for name in a
        if a[name].shape != b[name].shape
        or not np.array_equal(a[name].view(np.uint32), b[name].view(np.uint32))
    ]


def check_identical(net: vgg.VGG16Layers, x: np.ndarray) -> dict[str, list[str]]:
    """Differences fast vs stock, with the default BLAS threads and with one."""
    from threadpoolctl import threadpool_limits

    layers = ["conv1_1", "conv2_2", "pool3", "conv4_3", "pool5", "fc7"]
    report = {}
    for label, limit in (("BLAS threads as run", None), ("1 BLAS thread", 1)):
        with threadpool_limits(limits=limit, user_api="blas"):
            results = {}
            for mode in ("stock", "fast"):
                with kernels.installed(mode == "fast"):
                    grads = all_gradients(net, x, layers)
                    grads["grad:input"] = input_gradient(net, x)
                results[mode] = grads
        report[label] = bit_identical(results["stock"], results["fast"])
    return report


# ---- PyTorch in a child process -------------------------------------------------------------


def torch_child(weights_path: str, input_path: str) -> int:
    """One input gradient per line read on stdin; answers its seconds (JSON) on stdout."""
    try:
        import torch
    except ImportError:
        print(json.dumps({"error": "torch is not installed"}), flush=True)
        return 0
    from bench import build_torch_vgg16

    with np.load(weights_path) as npz:
        model = build_torch_vgg16(torch, {k: npz[k] for k in npz.files})
    x_np = np.load(input_path)

    def gradient() -> np.ndarray:
        x = torch.from_numpy(x_np).requires_grad_(True)
        logits = model(x)
        (gx,) = torch.autograd.grad(logits[:, CLASS].sum(), [x])
        return gx.numpy()

    result = gradient()
    np.save(input_path + ".torch.npy", result)
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads()}), flush=True)
    for _ in sys.stdin:
        start = time.perf_counter()
        gradient()
        print(json.dumps({"s": time.perf_counter() - start}), flush=True)
    return 0


class TorchRunner:
    """The PyTorch child process: started once, one timed gradient per ``run()``."""

    def __init__(self, weights_path: pathlib.Path, input_path: pathlib.Path) -> None:
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(pathlib.Path(__file__).resolve()),
                "--_torch",
                str(weights_path),
                str(input_path),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.info = self._read()
        self.gradient = None if "error" in self.info else np.load(str(input_path) + ".torch.npy")

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else {"error": "the torch child exited"}

    def run(self) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return float(self._read()["s"])

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


# ---- timing --------------------------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7, help="timed rounds (default %(default)s)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default %(default)s)")
    parser.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
    parser.add_argument(
        "--blas-threads",
        type=int,
        default=0,
        help="BLAS (and PyTorch) threads (default 0: the libraries' own)",
    )
    parser.add_argument("--_torch", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._torch:
        return torch_child(*args._torch)
    if args.blas_threads:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=args.blas_threads, user_api="blas")
        os.environ["OMP_NUM_THREADS"] = str(args.blas_threads)  # the PyTorch child's

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="layergrad-kernels-"))
    weights_path = tmp / "vgg16-random.npz"
    weights_path.write_bytes(engine.random_weights_npz(SEED).getvalue())
    x = make_input(args.batch)
    np.save(tmp / "input.npy", x)
    net = vgg.VGG16Layers(pretrained_model=str(weights_path))

    print(
        f"VGG16, batch {args.batch}, numpy {np.__version__}, chainer {chainer.__version__}, "
        f"{len(os.sched_getaffinity(0))} CPUs, BLAS threads {args.blas_threads or 'default'}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    for label, differing in check_identical(net, x).items():
        verdict = "bit-identical" if not differing else f"DIFFERENT: {', '.join(differing)}"
        print(f"fast vs stock, {label}: {verdict}")

    torch_runner = None if args.no_torch else TorchRunner(weights_path, tmp / "input.npy")
    if torch_runner is not None and torch_runner.gradient is None:
        print(f"torch: {torch_runner.info['error']}")
        torch_runner = None
    elif torch_runner is not None:
        reference = input_gradient(net, x)
        rel = np.abs(torch_runner.gradient - reference).max() / np.abs(reference).max()
        print(
            f"torch {torch_runner.info['torch']} ({torch_runner.info['threads']} threads): "
            f"max |torch - chainer| / max |chainer| = {rel:.2e}"
        )

    cases: dict[str, Callable[[], Any]] = {}
    for mode in ("stock", "fast"):

        def grad_case(mode: str = mode) -> Any:
            with kernels.installed(mode == "fast"):
                return input_gradient(net, x)

        def backward_case(mode: str = mode) -> Any:
            with kernels.installed(mode == "fast"):
                return backward_all_parameters(net, x)

        cases[f"grad {mode}"] = grad_case
        cases[f"backward {mode}"] = backward_case
    if torch_runner is not None:
        cases["grad torch"] = torch_runner.run

    for fn in cases.values():  # warm-up
        fn()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeat):
        for name, fn in cases.items():
            samples[name].append(fn() if name == "grad torch" else timed(fn))
    if torch_runner is not None:
        torch_runner.close()

    med = {name: statistics.median(values) for name, values in samples.items()}
    print(
        f"\nmedians of {args.repeat} interleaved rounds (seconds; min..max), "
        f"load average {os.getloadavg()[0]:.2f} at the end:"
    )
    for name, values in samples.items():
        print(f"  {name:<16} {med[name]:7.3f}   ({min(values):.3f}..{max(values):.3f})")
    print("\nratios:")
    print(f"  input gradient   fast/stock {med['grad fast'] / med['grad stock']:.3f}")
    print(f"  backward()       fast/stock {med['backward fast'] / med['backward stock']:.3f}")
    if "grad torch" in med:
        print(f"  input gradient   stock/torch {med['grad stock'] / med['grad torch']:.2f}")
        print(f"  input gradient   fast/torch {med['grad fast'] / med['grad torch']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
