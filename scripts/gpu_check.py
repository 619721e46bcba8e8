"""GPU check: the service on a CUDA device against in-process Chainer on the same GPU and the CPU.

Run on a machine with an NVIDIA GPU and CuPy installed (Chainer reaches the GPU
through CuPy; cuDNN is not needed)::

    python scripts/gpu_check.py                 # device @cupy:0, batches 1, 8, 32
    python scripts/gpu_check.py --device @cupy:1 --batches 1,4 --repeat 10 --out /tmp/gpu

It writes seeded random VGG16 weights to a temporary npz, starts
``python -m layergrad_server --device DEVICE`` on a free loopback port and, for
each batch size, times the input gradient of a class score
(``Client.input_gradient(x, ClassScore("fc8", ...))``) through the SDK, the same
computation in-process with Chainer on the same GPU, and compares both results
with Chainer on the CPU (max |gpu - cpu| / max |cpu|). Then it downloads all
parameter gradients (BACKWARD, 553 MB) once from the GPU server and compares
them with the CPU too. Prints a table and writes ``gpu_check.json`` to ``--out``.
Takes 1-3 minutes, most of it CuPy compiling its kernels on first use.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
for _path in (ROOT / "client", ROOT / "server"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from layergrad_server import _compat  # noqa: E402

_compat.apply()  # numpy 2 compatibility, before Chainer is imported

import chainer  # noqa: E402
import chainer.functions as F  # noqa: E402, N812
import layergrad  # noqa: E402
from chainer.links.model.vision import vgg  # noqa: E402
from layergrad_server import engine  # noqa: E402
from layergrad_server.launch import ServerProcess  # noqa: E402

CLASS = 7


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="@cupy:0", help="Chainer device specifier (default @cupy:0)")
    parser.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes (default 1,8,32)")
    parser.add_argument("--repeat", type=int, default=20, help="timed calls per batch size (default 20)")
    parser.add_argument("--out", default=".", help="folder for gpu_check.json (default: current folder)")
    return parser.parse_args(argv)


def describe_device(device: chainer.backend.Device) -> dict[str, Any]:
    """CuPy / CUDA versions and the GPU's name, or a clear reason why there is no GPU."""
    from chainer.backends import cuda

    if device.xp is np:  # a dry run of this script on the CPU
        return {"gpu": "none (CPU)", "gpu_memory_gib": 0, "cupy": "-", "cuda_runtime": "-", "cudnn": False}
    if not cuda.available:
        raise SystemExit(
            f"Chainer cannot use CUDA: {getattr(cuda, '_resolution_error', 'CuPy not importable')}"
        )
    cupy = cuda.cupy
    props = cupy.cuda.runtime.getDeviceProperties(device.device.id)
    return {
        "gpu": props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"]),
        "gpu_memory_gib": round(props["totalGlobalMem"] / 2**30, 1),
        "cupy": cupy.__version__,
        "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
        "cudnn": bool(getattr(cuda, "cudnn_enabled", False)),
    }


def class_score_input_grad(net: vgg.VGG16Layers, x: np.ndarray, device: chainer.backend.Device) -> np.ndarray:
    """``chainer.grad`` of the summed fc8 class score with respect to the input, back on the host."""
    with chainer.using_config("train", False), chainer.using_device(device):
        xv = chainer.Variable(device.send(x))
        fc8 = net.forward(xv, layers=["fc8"])["fc8"]
        classes = device.send(np.full(x.shape[0], CLASS, dtype=np.int32))
        (gx,) = chainer.grad([F.sum(F.select_item(fc8, classes))], [xv])
        return chainer.backend.CpuDevice().send(gx.array)


def parameter_grads(
    net: vgg.VGG16Layers, x: np.ndarray, device: chainer.backend.Device
) -> dict[str, np.ndarray]:
    """``loss.backward()`` of the softmax cross-entropy, every parameter's ``.grad`` on the host."""
    with chainer.using_config("train", False), chainer.using_device(device):
        net.cleargrads()
        fc8 = net.forward(chainer.Variable(device.send(x)), layers=["fc8"])["fc8"]
        labels = device.send(np.full(x.shape[0], CLASS, dtype=np.int32))
        F.softmax_cross_entropy(fc8, labels).backward()
        grads = {name.lstrip("/"): chainer.backend.CpuDevice().send(p.grad) for name, p in net.namedparams()}
        net.cleargrads()
        return grads


def max_rel(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b|."""
    return float(np.max(np.abs(a.astype(np.float64) - b)) / max(float(np.max(np.abs(b))), 1e-30))


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b||: not dominated by the few elements where a max-pool picked another winner."""
    b64 = b.astype(np.float64)
    return float(np.linalg.norm(a.astype(np.float64) - b64) / max(float(np.linalg.norm(b64)), 1e-30))


def float64_net(weights: pathlib.Path) -> vgg.VGG16Layers:
    """The same weights in float64 on the CPU: the reference both float32 results are measured against."""
    with chainer.using_config("dtype", np.float64):
        return vgg.VGG16Layers(pretrained_model=str(weights))


def timed(fn: Any, repeat: int, sync: Any) -> list[float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in args.batches.split(",")]
    device = chainer.get_device(args.device)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "device": args.device,
        **describe_device(device),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "chainer": chainer.__version__,
        "cupy_tf32": os.environ.get("CUPY_TF32", "unset"),
        "nvidia_tf32_override": os.environ.get("NVIDIA_TF32_OVERRIDE", "unset"),
        "batches": [],
    }
    if device.xp is np:
        sync = lambda: None  # noqa: E731
    else:
        from chainer.backends import cuda

        sync = cuda.cupy.cuda.Device(device.device.id).synchronize
    rng = np.random.default_rng(0)

    with tempfile.TemporaryDirectory(prefix="layergrad-gpu-") as tmp_name:
        tmp = pathlib.Path(tmp_name)
        weights = tmp / "weights.npz"
        weights.write_bytes(engine.random_weights_npz(0).getvalue())
        cpu_net = vgg.VGG16Layers(pretrained_model=str(weights))
        cpu64_net = float64_net(weights)
        gpu_net = vgg.VGG16Layers(pretrained_model=str(weights))
        gpu_net.to_device(device)
        server_args = [
            "--weights",
            str(weights),
            "--device",
            args.device,
            "--max-batch-size",
            str(max(batches)),
        ]
        with ServerProcess(server_args, tmp / "server.log") as server:
            server.wait_serving(timeout=600)
            report["server_ready_s"] = round(time.perf_counter() - started, 1)
            with layergrad.Client(server.address, timeout=600) as client:
                for batch in batches:
                    x = (rng.standard_normal((batch, 3, 224, 224)) * 60).astype(np.float32)
                    loss = layergrad.ClassScore("fc8", [CLASS] * batch)
                    service = client.input_gradient(x, loss)  # warm-up (kernel compilation)
                    in_process = class_score_input_grad(gpu_net, x, device)
                    cpu = class_score_input_grad(cpu_net, x, chainer.get_device("@numpy"))
                    cpu64 = class_score_input_grad(
                        cpu64_net, x.astype(np.float64), chainer.get_device("@numpy")
                    )
                    service_t = timed(
                        lambda x=x, loss=loss: client.input_gradient(x, loss), args.repeat, sync
                    )
                    local_t = timed(lambda x=x: class_score_input_grad(gpu_net, x, device), args.repeat, sync)
                    row = {
                        "batch": batch,
                        "service_ms": 1e3 * statistics.median(service_t),
                        "in_process_gpu_ms": 1e3 * statistics.median(local_t),
                        "service_max_rel_err_vs_cpu": max_rel(service, cpu),
                        "in_process_gpu_max_rel_err_vs_cpu": max_rel(in_process, cpu),
                        "service_vs_in_process_gpu_max_rel": max_rel(service, in_process),
                        "service_rel_l2_vs_cpu": rel_l2(service, cpu),
                        "service_max_rel_err_vs_cpu64": max_rel(service, cpu64),
                        "cpu_max_rel_err_vs_cpu64": max_rel(cpu, cpu64),
                        "service_rel_l2_vs_cpu64": rel_l2(service, cpu64),
                        "cpu_rel_l2_vs_cpu64": rel_l2(cpu, cpu64),
                    }
                    row["service_ms_per_image"] = row["service_ms"] / batch
                    row["ratio"] = row["service_ms"] / row["in_process_gpu_ms"]
                    report["batches"].append(row)
                    print(f"batch {batch}: {json.dumps(row)}", flush=True)

                x = (rng.standard_normal((1, 3, 224, 224)) * 60).astype(np.float32)
                loss = layergrad.SoftmaxCrossEntropy([CLASS])
                client.parameter_gradients(x, loss)  # warm-up
                start = time.perf_counter()
                grads = client.parameter_gradients(x, loss)
                elapsed = time.perf_counter() - start
                cpu_grads = parameter_grads(cpu_net, x, chainer.get_device("@numpy"))
                nbytes = sum(g.nbytes for g in grads.values())
                report["parameter_gradients"] = {
                    "bytes": nbytes,
                    "service_s": elapsed,
                    "gb_per_s_end_to_end": nbytes / elapsed / 1e9,
                    "max_rel_err_vs_cpu": max(max_rel(grads[k], cpu_grads[k]) for k in cpu_grads),
                    "max_rel_l2_vs_cpu": max(rel_l2(grads[k], cpu_grads[k]) for k in cpu_grads),
                }
        report["server_log_tail"] = (tmp / "server.log").read_text(errors="replace")[-3000:]

    report["total_s"] = round(time.perf_counter() - started, 1)
    print_table(report)
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2))
    return 0


def print_table(report: dict[str, Any]) -> None:
    print()
    print(
        f"layergrad GPU check: {report['gpu']} ({report['gpu_memory_gib']} GiB), device {report['device']}, "
        f"CuPy {report['cupy']}, CUDA runtime {report['cuda_runtime']}, cuDNN {report['cudnn']}, "
        f"numpy {report['numpy']}, chainer {report['chainer']}, python {report['python']}"
    )
    print("input gradient of an fc8 class score, median of timed calls (service: SDK call to numpy in hand;")
    print("in-process: Chainer on the same GPU, result copied to the host). Errors: max = max|a-b|/max|ref|,")
    print("L2 = ||a-b||/||ref||; ref = Chainer on the CPU in float32 (cpu32) or float64 (cpu64)")
    header = f"{'batch':>5} {'service ms':>11} {'ms/image':>9} {'in-proc GPU ms':>15} {'ratio':>6}"
    errors = ["GPU vs cpu32 max", "GPU vs cpu32 L2", "GPU vs cpu64 max", "cpu32 vs cpu64 max"]
    print(header + "".join(f" {e:>18}" for e in errors))
    for row in report["batches"]:
        values = [
            row["service_max_rel_err_vs_cpu"],
            row["service_rel_l2_vs_cpu"],
            row["service_max_rel_err_vs_cpu64"],
            row["cpu_max_rel_err_vs_cpu64"],
        ]
        print(
            f"{row['batch']:>5} {row['service_ms']:>11.2f} {row['service_ms_per_image']:>9.2f}"
            f" {row['in_process_gpu_ms']:>15.2f} {row['ratio']:>6.2f}"
            + "".join(f" {v:>18.2e}" for v in values)
        )
    print(
        "(service and in-process GPU results are bit-identical: max rel "
        f"{max(r['service_vs_in_process_gpu_max_rel'] for r in report['batches']):.1e})"
    )
    p = report["parameter_gradients"]
    print(
        f"all parameter gradients (BACKWARD, batch 1): {p['bytes'] / 1e6:.1f} MB in {p['service_s']:.3f} s "
        f"({p['gb_per_s_end_to_end']:.2f} GB/s end to end), max rel vs cpu32 {p['max_rel_err_vs_cpu']:.2e}"
        f" (L2 {p['max_rel_l2_vs_cpu']:.2e}, worst tensor)"
    )
    print(f"server ready after {report['server_ready_s']} s; total {report['total_s']} s")


if __name__ == "__main__":
    sys.exit(main())
