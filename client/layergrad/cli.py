"""The ``layergrad`` command: inspect the served model, predict, and save gradients.

::

    layergrad models
    layergrad info [--json]
    layergrad predict IMAGE... [--layers prob] [--top 5] [--out outputs.npz] [--dtype T]
    layergrad grad IMAGE... --out grads.npz [--loss SPEC] [--pattern grad] [--input]
                   [--layers a,b|all] [--params a,b|all] [--activations a,b]
                   [--dtype float32|float16|bfloat16] [--float16]
    layergrad explain IMAGE --out map.png [--method gradcam[,saliency,...]] [--target top1|C]

``--dtype`` picks the element type on the wire: float16 and bfloat16 halve the bytes;
the saved arrays are float32 holding the values received (float16 scaled into range
per tensor by the server and unscaled here; a tensor that would still lose values is
refused with an error that counts them).

The server address comes from ``--target``, else ``$LAYERGRAD_TARGET``, else
127.0.0.1:50051; a host without a port means port 50051. ``--model`` (else
``$LAYERGRAD_MODEL``) names the served model to use; none means the server's default. ``--target`` also takes
replicas (``ipv4:10.0.0.5:50051,10.0.0.6:50051`` or ``dns:///name:50051``), balanced
over those that are serving. ``--wait`` waits (within ``--timeout``) for a server that
is still starting or loading its model instead of failing. A bearer token is
read from ``$LAYERGRAD_TOKEN`` (never from the command line, where other users
could see it); ``--tls-ca`` (and ``--tls-cert``, ``--tls-key`` for mutual TLS)
connect over TLS. Exit status: 0 on success, 1 when the server returns an error,
2 for bad usage (including unreadable images or a malformed loss).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import numpy as np

from layergrad._explain import METHODS, method_name
from layergrad.client import Client, GradientResult, InputSpec, ModelInfo, Pattern
from layergrad.errors import LayergradError
from layergrad.losses import ClassScore, Loss, SoftmaxCrossEntropy, SquaredError, SumOfSquares
from layergrad.render import SIGNS, grid, labelled, load_rgb

DEFAULT_TARGET = "127.0.0.1:50051"
EXIT_SERVER_ERROR = 1
EXIT_USAGE = 2
LOSS_HELP = (
    "the objective: sum-of-squares[:LAYER] (default sum-of-squares:prob), class-score:LAYER:C1[,C2...], "
    "cross-entropy:L1[,L2...], squared-error:LAYER:C1[,C2...] (one-hot target). Give one class per "
    "image, or a single class used for every image"
)


class UsageError(Exception):
    """A command-line mistake found after parsing (exit status 2)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``layergrad`` command and returns its exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or argparse's own usage error
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        with Client(
            args.target,
            timeout=args.timeout or None,
            wait_for_ready=args.wait,
            model=args.model or "",
            **_security(args),
        ) as client:
            return args.handler(client, args, sys.stdout)
    except LayergradError as exc:
        _print_server_error(exc)
        return EXIT_SERVER_ERROR
    except (UsageError, argparse.ArgumentTypeError, ValueError, TypeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _security(args: argparse.Namespace) -> dict[str, object]:
    """Client keyword arguments for TLS and the token of ``$LAYERGRAD_TOKEN``."""

    def read(path: str | None) -> bytes | None:
        if path is None:
            return None
        with open(path, "rb") as handle:
            return handle.read()

    security: dict[str, object] = {"token": os.environ.get("LAYERGRAD_TOKEN") or None}
    if args.tls_ca or args.tls_cert or args.tls_key:
        security.update(
            root_certificates=read(args.tls_ca),
            certificate_chain=read(args.tls_cert),
            private_key=read(args.tls_key),
        )
    return security


def _print_server_error(exc: LayergradError) -> None:
    code = exc.code.name if exc.code is not None else type(exc).__name__
    print(f"error: {code}: {exc.message}", file=sys.stderr)
    for field, description in exc.field_violations:
        note = f"in {field}" if description == exc.message else f"{field}: {description}"
        print(f"  {note}", file=sys.stderr)
    if exc.request_id:
        print(
            f"  request id {exc.request_id} (the server's access log names the call by it)", file=sys.stderr
        )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="layergrad", description="Client of a layergrad gradient server.")
    parser.add_argument(
        "--target",
        default=os.environ.get("LAYERGRAD_TARGET") or DEFAULT_TARGET,
        help="server address host[:port] (port 50051 if none), ipv4:A:P,B:P or dns:///NAME:PORT for "
        "replicas (default: $LAYERGRAD_TARGET or %(default)s)",
    )
    parser.add_argument(
        "--model",
        default=os.environ.get("LAYERGRAD_MODEL") or "",
        help="the served model to use (`layergrad models` lists them; default: $LAYERGRAD_MODEL, else "
        "the server's default model)",
    )
    parser.add_argument(
        "--progress",
        action="store_true",
        help="show progress on stderr while a batch larger than the server takes is sent in parts",
    )
    parser.add_argument(
        "--wait",
        action="store_true",
        help="wait for a server still starting or loading its model (within --timeout) instead of failing",
    )
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="deadline per call in seconds, 0 for none (default: 60)"
    )
    parser.add_argument("--tls-ca", help="PEM CA certificates to verify the server with: connect over TLS")
    parser.add_argument("--tls-cert", help="PEM client certificate chain, for mutual TLS")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    models = commands.add_parser("models", help="list the served models")
    models.set_defaults(handler=_run_models)
    _add_info(commands)
    _add_predict(commands)
    _add_grad(commands)
    _add_explain(commands)
    return parser


def _add_info(commands: argparse._SubParsersAction) -> None:
    info = commands.add_parser("info", help="describe the served model")
    info.add_argument("--json", action="store_true", help="print the description as JSON")
    info.set_defaults(handler=_run_info)


DTYPES = ("float32", "float16", "bfloat16")
DTYPE_HELP = "element type on the wire (default: float32); saved as float32 either way"


def _add_predict(commands: argparse._SubParsersAction) -> None:
    predict = commands.add_parser("predict", help="run the forward pass on images")
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="JPEG or PNG files")
    predict.add_argument(
        "--layers",
        type=_csv,
        default=[],
        help="comma-separated layers (default: the model's probability layer, VGG16's prob)",
    )
    predict.add_argument(
        "--top", type=int, default=5, metavar="K", help="classes to show per image (default: 5)"
    )
    predict.add_argument("--out", help="save the layer outputs to this .npz file")
    predict.add_argument("--dtype", choices=DTYPES, default="float32", help=DTYPE_HELP)
    predict.set_defaults(handler=_run_predict)


def _add_grad(commands: argparse._SubParsersAction) -> None:
    grad = commands.add_parser("grad", help="compute gradients and save them to .npz")
    grad.add_argument("images", nargs="+", metavar="IMAGE", help="JPEG or PNG files")
    grad.add_argument("--out", required=True, help="the .npz file to write")
    grad.add_argument(
        "--loss", type=_loss_spec, default="sum-of-squares:prob", metavar="SPEC", help=LOSS_HELP
    )
    grad.add_argument(
        "--pattern", choices=[p.value for p in Pattern], default=Pattern.GRAD.value, help="backward idiom"
    )
    grad.add_argument("--input", action="store_true", help="the input gradient (the default if nothing else)")
    grad.add_argument("--layers", type=_names_or_all, help="layer gradients: a,b or all")
    grad.add_argument("--params", type=_names_or_all, help="parameter gradients: a,b or all")
    grad.add_argument("--activations", type=_csv, default=[], help="also save these layers' outputs: a,b")
    dtype = grad.add_mutually_exclusive_group()
    dtype.add_argument("--dtype", choices=DTYPES, default="float32", help=DTYPE_HELP)
    dtype.add_argument(
        "--float16",
        action="store_const",
        const="float16",
        dest="dtype",
        default="float32",
        help="same as --dtype float16",
    )
    grad.set_defaults(handler=_run_grad)


def _add_explain(commands: argparse._SubParsersAction) -> None:
    explain = commands.add_parser(
        "explain", help="attribution maps as a PNG (several methods: a grid, one panel each)"
    )
    explain.add_argument("image", metavar="IMAGE", help="a JPEG or PNG file")
    explain.add_argument(
        "--method",
        type=_csv,
        default=["gradcam"],
        help=f"comma-separated methods (default gradcam): {', '.join(METHODS)}",
    )
    explain.add_argument(
        "--target",
        dest="explain_target",
        default="top1",
        help="a class index, or topK for the K best classes (default top1); the server is the --target "
        "given before the command",
    )
    explain.add_argument("--out", required=True, help="the PNG file to write")
    explain.add_argument("--layer", default="", help="Grad-CAM layer (default: the model's last conv layer)")
    explain.add_argument("--samples", type=int, help="SmoothGrad / VarGrad noise samples (default 32)")
    explain.add_argument("--noise-level", type=float, help="SmoothGrad noise, fraction of the range (0.15)")
    explain.add_argument("--steps", type=int, help="Integrated Gradients steps (default 64)")
    explain.add_argument("--baseline", help="Integrated Gradients baseline: mean, black, noise, blur")
    explain.add_argument("--seed", type=int, help="seed of the noise (default 0)")
    explain.add_argument(
        "--sign",
        choices=SIGNS,
        help="what to show: absolute, positive, negative or all (default: per method)",
    )
    explain.add_argument("--percentile", type=float, default=99.0, help="clip at this percentile (99)")
    explain.add_argument("--alpha", type=float, default=0.55, help="heat map opacity (0.55)")
    explain.add_argument("--panel", type=int, default=256, help="longest side of each panel in pixels (256)")
    explain.set_defaults(handler=_run_explain)


def _csv(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated names")
    return names


def _names_or_all(text: str) -> str | list[str]:
    return "all" if text.strip() == "all" else _csv(text)


def _loss_spec(text: str) -> str:
    _parse_loss(text, batch=1)  # rejects malformed specs while parsing arguments
    return text


def _parse_loss(spec: str, batch: int) -> Loss:
    """The loss a ``--loss`` SPEC names, with class lists broadcast to ``batch`` images."""
    kind, _, rest = spec.partition(":")
    builders: dict[str, Callable[[str, int], Loss]] = {
        "sum-of-squares": lambda r, _b: SumOfSquares(r or "prob"),
        "class-score": lambda r, b: ClassScore(_layer(r, spec), classes=_classes(r, spec, b)),
        "cross-entropy": lambda r, b: SoftmaxCrossEntropy(_class_list(r, spec, b)),
        "squared-error": lambda r, b: SquaredError(_layer(r, spec), target_classes=_classes(r, spec, b)),
    }
    if kind not in builders:
        raise argparse.ArgumentTypeError(
            f"unknown loss {kind!r} in {spec!r}; choose one of {', '.join(builders)}"
        )
    return builders[kind](rest, batch)


def _layer(rest: str, spec: str) -> str:
    layer, sep, _ = rest.partition(":")
    if not layer or not sep:
        raise argparse.ArgumentTypeError(f"loss {spec!r} needs LAYER:CLASSES")
    return layer


def _classes(rest: str, spec: str, batch: int) -> list[int]:
    return _class_list(rest.partition(":")[2], spec, batch)


def _class_list(text: str, spec: str, batch: int) -> list[int]:
    try:
        classes = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"classes in loss {spec!r} must be integers") from None
    if not classes:
        raise argparse.ArgumentTypeError(f"loss {spec!r} needs at least one class")
    return classes * batch if len(classes) == 1 else classes


def _run_info(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    info = client.model_info()
    if args.json:
        json.dump(dataclasses.asdict(info), out, indent=2)
        out.write("\n")
    else:
        _print_info(info, out)
    return 0


def _print_info(info: ModelInfo, out: TextIO) -> None:
    spec, weights = info.input_spec, info.weights
    rows = [
        ("model", f"{info.model or '-'} (version {info.model_version or '-'}), {info.model_name}"),
        ("weights", f"{'pretrained' if weights.pretrained else 'random'}, {weights.source}"),
        ("file sha256", weights.file_sha256 or "-"),
        ("params sha256", weights.parameters_sha256 or "-"),
        ("device", info.device),
        ("input", _input_line(spec)),
        ("image formats", ", ".join(spec.image_formats)),
        (
            "parameters",
            f"{len(info.parameters)} arrays, {info.num_parameters:,} values, "
            f"{_megabytes(info.parameter_nbytes)}",
        ),
        (
            "limits",
            f"batch {info.max_batch_size}, unary response {_megabytes(info.max_unary_response_bytes)}, "
            f"stream chunk {_megabytes(info.stream_chunk_bytes)}",
        ),
        ("versions", ", ".join(f"{name} {version}" for name, version in info.versions.items())),
    ]
    for label, value in rows:
        out.write(f"{label:<14} {value}\n")
    if info.labels:
        rows_out = f"{len(info.labels)} classes ({info.labels[0]}, ...)"
        out.write(f"{'labels':<14} {rows_out}\n")
    out.write("\n")
    _print_table(
        ["layer", "output shape"], [[layer.name, _shape(layer.output_shape)] for layer in info.layers], out
    )


def _input_line(spec: InputSpec) -> str:
    mean = ", ".join(f"{m:g}" for m in spec.mean)
    return f"{_shape(spec.shape)} {spec.dtype} {spec.layout} {spec.channel_order}, mean ({mean})"


def _run_models(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    rows = [
        [
            m.name + (" (default)" if m.default else ""),
            m.version,
            m.state,
            m.architecture,
            m.message or m.weights_source or "-",
        ]
        for m in client.list_models()
    ]
    _print_table(["model", "version", "state", "architecture", "weights / error"], rows, out)
    return 0


def _run_predict(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    if args.top < 1:
        raise UsageError("--top must be at least 1")
    for path in args.images:  # an unreadable image is a usage error before any call
        with open(path, "rb"):
            pass
    info = client.model_info()
    layers = args.layers or [info.probability_layer or info.layer_names[-1]]
    outputs = client.predict(
        args.images, layers, dtype=args.dtype, progress=_progress_bar(args), model=info.model or None
    )
    if info.probability_layer in outputs:
        _print_top(args.images, outputs[info.probability_layer], args.top, out, info)
    _print_summary(outputs, out)
    if args.out:
        np.savez(args.out, **outputs)
        out.write(f"saved {len(outputs)} arrays to {args.out}\n")
    return 0


def _run_explain(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    from PIL import Image

    try:
        methods = [method_name(m) for m in args.method]
        wanted = args.explain_target.strip()
        target: int | str = int(wanted) if wanted.isdigit() else wanted
        picture = load_rgb(args.image)
    except (ValueError, OSError) as exc:
        raise UsageError(str(exc)) from None
    if args.panel < 16:
        raise UsageError("--panel must be at least 16")
    scale = args.panel / max(picture.shape[:2])
    size = (max(round(picture.shape[1] * scale), 1), max(round(picture.shape[0] * scale), 1))
    shown = Image.fromarray(picture).resize(size, Image.Resampling.BILINEAR)
    values = {"samples": args.samples, "noise_level": args.noise_level, "steps": args.steps}
    values.update(baseline=args.baseline, seed=args.seed, layer=args.layer or None)
    rows: list[list[Any]] = []
    for method in methods:
        options = {k: v for k, v in values.items() if v is not None and k in _explain_options(method)}
        explanation = client.explain(args.image, method=method, target=target, **options)
        for row, found in enumerate(explanation.targets):
            panel = explanation.render(
                row, shown, sign=args.sign, percentile=args.percentile, alpha=args.alpha, label=True
            )
            if len(rows) <= row:
                rows.append(
                    [labelled(shown, f"input: {found.class_name.split(',')[0] or found.class_index}")]
                )
            rows[row].append(panel)
            delta = "" if found.delta is None else f"  delta={found.delta:+.4g}"
            out.write(
                f"{method}: class {found.class_index} {found.class_name!r} score={found.score:.4g}{delta}\n"
            )
    sheet = (
        rows[0][-1]
        if len(rows) == 1 and len(methods) == 1
        else grid([p for r in rows for p in r], columns=len(methods) + 1)
    )
    sheet.save(args.out, format="PNG")
    out.write(f"saved {args.out} ({sheet.width}x{sheet.height})\n")
    return 0


def _explain_options(method: str) -> set[str]:
    if method in ("smoothgrad", "smoothgrad_sq", "vargrad"):
        return {"samples", "noise_level", "seed"}
    if method == "integrated_gradients":
        return {"steps", "baseline", "seed"}
    if method in ("gradcam", "gradcam_pp", "guided_gradcam"):
        return {"layer"}
    return set()


def _print_top(images: Sequence[str], prob: np.ndarray, top: int, out: TextIO, info: ModelInfo) -> None:
    for image, row in zip(images, prob, strict=False):
        best = np.argsort(row)[::-1][:top]
        out.write(f"{image}\n")
        for rank, cls in enumerate(best, start=1):
            name = info.class_name(int(cls))
            label = f"  {name}" if name else ""
            out.write(f"  {rank}. class {int(cls):>4}  p={float(row[cls]):.4f}{label}\n")


def _run_grad(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    loss = _parse_loss(args.loss, len(args.images))
    want_input = args.input or not (args.layers or args.params)
    result = client.gradients(
        args.images,
        loss,
        pattern=args.pattern,
        parameters=args.params,
        layers=args.layers,
        input=want_input,
        activations=args.activations,
        dtype=args.dtype,
        progress=_progress_bar(args),
    )
    _save_result(result, args.out)
    _print_summary(result.as_dict(), out)
    out.write(f"loss {result.loss:.6g}\n" if result.loss is not None else "loss -\n")
    out.write(f"saved {len(result.as_dict())} arrays to {args.out}\n")
    return 0


def _progress_bar(args: argparse.Namespace) -> Callable[[int, int], None] | None:
    """With ``--progress``: a one-line bar on stderr, redrawn after each part of the batch."""
    if not args.progress:
        return None

    def draw(done: int, total: int, width: int = 30) -> None:
        filled = width * done // total
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} inputs")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return draw


def _save_result(result: GradientResult, path: str) -> None:
    np.savez(path, **result.as_dict())


def _print_summary(arrays: dict[str, np.ndarray], out: TextIO) -> None:
    rows = [
        [name, _shape(a.shape), str(a.dtype), f"{_min(a):.4g}", f"{_max(a):.4g}", f"{_l2_norm(a):.4g}"]
        for name, a in arrays.items()
    ]
    _print_table(["name", "shape", "dtype", "min", "max", "l2 norm"], rows, out)


def _print_table(header: list[str], rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    for row in [header, *rows]:
        out.write("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
        out.write("\n")


def _min(array: np.ndarray) -> float:
    return float(array.min()) if array.size else float("nan")


def _max(array: np.ndarray) -> float:
    return float(array.max()) if array.size else float("nan")


def _l2_norm(array: np.ndarray, block: int = 1 << 22) -> float:
    """The L2 norm accumulated in float64, a block at a time (no full-size float64 copy)."""
    flat = array.reshape(-1)
    total = 0.0
    for start in range(0, flat.size, block):
        part = flat[start : start + block].astype(np.float64)
        total += float(np.dot(part, part))
    return float(np.sqrt(total))


def _shape(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape) if shape else "scalar"


def _megabytes(nbytes: int) -> str:
    return f"{nbytes / 1e6:,.1f} MB"


if __name__ == "__main__":
    sys.exit(main())
