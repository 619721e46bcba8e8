"""Benchmark of Explain: server-side attribution against the same maps built from SDK calls.

Run with ``make bench-explain`` (``make bench`` runs it after ``scripts/bench.py``). Starts its own
server on seeded random VGG16 weights (``random:0``) and times, with the median of ``--repeat``
repetitions after one warm-up:

* SmoothGrad with 32 samples through one ``Explain`` call, against 32 separate SDK
  ``input_gradient`` calls on the same noisy inputs (built client-side), and their ratio;
* Integrated Gradients with 64 Gauss-Legendre steps: time, the relative completeness error
  |delta| / |f(x) - f(x')|, and the server's peak resident memory (VmHWM) before and after;
* Grad-CAM (conv5_3) against one input-gradient call.

The first input-gradient call warms the server up whatever ``--no-warmup`` says.

Writes JSON to ``--out`` (default ``bench-results/bench-explain.json``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
for _path in (ROOT / "client", ROOT / "server"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import layergrad  # noqa: E402
from layergrad_server.launch import ServerProcess  # noqa: E402

CLASS = 7


def vm_hwm(pid: int) -> int:
    """Peak resident set size of a process in bytes (Linux /proc)."""
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


WARMUP = True


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    if WARMUP:
        fn()
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 224, 224)) * 40).astype(np.float32)
    samples, steps, level, seed = args.samples, args.steps, 0.15, 0
    report: dict[str, Any] = {"samples": samples, "steps": steps, "repeat": args.repeat}
    with tempfile.TemporaryDirectory() as folder:
        server = ServerProcess(["--weights", "random:0"], pathlib.Path(folder) / "server.log")
        try:
            server.wait_serving()
            pid = server.process.pid
            with layergrad.Client(server.address, timeout=3600) as client:
                loss = layergrad.ClassScore("fc8", [CLASS])
                client.input_gradient(x[None], loss)  # the server's first call
                one_grad, _ = timed(lambda: client.input_gradient(x[None], loss), args.repeat)
                smooth, _ = timed(
                    lambda: client.explain(
                        x, "smoothgrad", CLASS, samples=samples, noise_level=level, seed=seed
                    ),
                    args.repeat,
                )
                sigma = np.float32(level) * (x.max() - x.min())

                def sdk_smoothgrad() -> np.ndarray:
                    total = np.zeros(x.shape)
                    for s in range(samples):
                        gen = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, s])))
                        noisy = x + sigma * gen.standard_normal(x.shape, dtype=np.float32)
                        total += client.input_gradient(noisy[None], loss)[0]
                    return total / samples

                separate, _ = timed(sdk_smoothgrad, args.repeat)
                hwm_before = vm_hwm(pid)
                ig_time, ig = timed(
                    lambda: client.explain(
                        x, "integrated_gradients", CLASS, steps=steps, rule="gauss_legendre"
                    ),
                    args.repeat,
                )
                hwm_after = vm_hwm(pid)
                target = ig.targets[0]
                gradcam, _ = timed(lambda: client.explain(x, "gradcam", CLASS, layer="conv5_3"), args.repeat)
        finally:
            server.terminate()
    report.update(
        input_gradient_s=one_grad,
        smoothgrad_explain_s=smooth,
        smoothgrad_sdk_calls_s=separate,
        smoothgrad_ratio=separate / smooth,
        ig_s=ig_time,
        ig_relative_completeness_error=abs(target.delta) / abs(target.score - target.baseline_score),
        ig_delta=target.delta,
        server_peak_rss_before_ig=hwm_before,
        server_peak_rss_after_ig=hwm_after,
        gradcam_s=gradcam,
        gradcam_over_input_gradient=gradcam / one_grad,
    )
    return report


def render(report: dict[str, Any]) -> str:
    mib = 1 << 20
    return "\n".join(
        [
            f"input gradient (1 call)                      {report['input_gradient_s']:.3f} s",
            f"SmoothGrad {report['samples']} samples, one Explain call      "
            f"{report['smoothgrad_explain_s']:.3f} s",
            f"SmoothGrad {report['samples']} samples, {report['samples']} SDK calls          "
            f"{report['smoothgrad_sdk_calls_s']:.3f} s  (x{report['smoothgrad_ratio']:.2f} slower)",
            f"Integrated Gradients {report['steps']} steps (Gauss-Legendre) {report['ig_s']:.3f} s, "
            f"completeness error {report['ig_relative_completeness_error']:.2e}",
            f"server peak RSS before / after IG            {report['server_peak_rss_before_ig'] / mib:.0f} / "
            f"{report['server_peak_rss_after_ig'] / mib:.0f} MiB",
            f"Grad-CAM conv5_3                             {report['gradcam_s']:.3f} s "
            f"(x{report['gradcam_over_input_gradient']:.2f} one input gradient)",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "bench-results" / "bench-explain.json")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="1 repetition, 8 samples, 16 steps")
    parser.add_argument("--no-warmup", action="store_true", help="no untimed first run of each case")
    args = parser.parse_args(argv)
    global WARMUP
    WARMUP = not args.no_warmup
    if args.quick:
        args.repeat, args.samples, args.steps = 1, 8, 16
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(render(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
