"""``layergrad-server weights fetch|convert|verify|show``: managing pretrained weights from the shell.

Every command takes ``--model NAME`` (``vgg16``, the default, ``vgg19``,
``googlenet``, ``resnet50``, ``resnet101`` or ``resnet152``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import zipfile
from pathlib import Path

from layergrad_server.weights import WeightsError
from layergrad_server.weights.convert import (
    DEFAULT_MODEL,
    MODELS,
    check_caffemodel,
    check_npz,
    convert_caffemodel,
)
from layergrad_server.weights.store import (
    CACHE_DIR_ENV,
    PRETRAINED,
    RESNET_WEIGHTS_PAGE,
    chainer_cache_path,
    default_cache_dir,
    install_caffemodel,
    pretrained_info,
    resolve_weights,
    sha256_file,
)

logger = logging.getLogger(__name__)


def _model_name(text: str) -> str:
    lowered = text.strip().lower()
    if lowered not in MODELS:
        raise argparse.ArgumentTypeError(f"unknown model {text!r} (choose from {', '.join(MODELS)})")
    return lowered


def _add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        type=_model_name,
        default=DEFAULT_MODEL,
        metavar="NAME",
        help=f"the built-in model: {', '.join(MODELS)} (default: {DEFAULT_MODEL})",
    )


def _add_cache_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-dir", type=Path, help=f"cache directory (default: ${CACHE_DIR_ENV} or ~/.cache/layergrad)"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layergrad-server weights",
        description="Download, convert and check the pretrained weights of the built-in models.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fetch = commands.add_parser(
        "fetch",
        help="download (or convert a local caffemodel) and cache a model's published weights",
        description="Download the model's caffemodel, verify it, convert it to npz in the cache, and print "
        "the npz path and its sha256; with --caffemodel, convert that local file instead (the only way for "
        "ResNet, whose caffemodels are not publicly downloadable). Uses an existing cached npz when there "
        "is one.",
    )
    _add_model(fetch)
    _add_cache_dir(fetch)
    fetch.add_argument(
        "--url",
        help="download URL, e.g. a mirror (default: $LAYERGRAD_<MODEL>_WEIGHTS_URL, for VGG16 also "
        "$LAYERGRAD_WEIGHTS_URL, or the published URL)",
    )
    fetch.add_argument(
        "--sha256",
        help="expected sha256 of the downloaded caffemodel (default: $LAYERGRAD_<MODEL>_WEIGHTS_SHA256, for "
        "VGG16 also $LAYERGRAD_WEIGHTS_SHA256, if set)",
    )
    fetch.add_argument(
        "--caffemodel",
        type=Path,
        metavar="PATH",
        help="convert this local copy of the published caffemodel into the cache (replacing a cached npz)",
    )
    fetch.add_argument("--quiet", action="store_true", help="no progress bar")

    convert = commands.add_parser(
        "convert",
        help="convert a .caffemodel into the .npz of the model's Chainer link",
        description="Convert SRC (the model's .caffemodel) into DST (default: SRC with an .npz suffix).",
    )
    _add_model(convert)
    convert.add_argument("src", type=Path, metavar="SRC.caffemodel")
    convert.add_argument("dst", type=Path, nargs="?", metavar="DST.npz")

    verify = commands.add_parser(
        "verify",
        help="check that .npz or .caffemodel files hold a model's complete weights",
        description="Check each PATH (.npz or .caffemodel) for every array of the model with the right shape "
        "and finite values; print each problem; exit 1 if there is any.",
    )
    _add_model(verify)
    verify.add_argument("paths", type=Path, nargs="+", metavar="PATH")

    show = commands.add_parser(
        "show",
        help="list the models' cached weights and where their published weights come from",
        description="For each built-in model (or only --model's), print the cached npz (path and sha256) or "
        "that there is none, and where `fetch` gets the weights from.",
    )
    show.add_argument("--model", type=_model_name, metavar="NAME", help="only this model")
    _add_cache_dir(show)
    return parser


def weights_main(argv: list[str]) -> int:
    """Runs ``layergrad-server weights`` with ``argv`` (the words after ``weights``); returns the status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help or a usage error
        return exc.code if isinstance(exc.code, int) else 2
    try:
        if args.command == "fetch":
            return _fetch(args)
        if args.command == "convert":
            return _convert(args)
        if args.command == "show":
            return _show(args)
        return _verify(args.paths, args.model)
    except WeightsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _fetch(args: argparse.Namespace) -> int:
    if args.caffemodel is not None:
        cache = args.cache_dir.expanduser() if args.cache_dir is not None else default_cache_dir()
        install_caffemodel(args.caffemodel, cache, args.model)
    resolved = resolve_weights(
        "auto",
        args.model,
        cache_dir=args.cache_dir,
        url=args.url,
        progress=not args.quiet,
        expected_sha256=args.sha256,
    )
    print(resolved.npz_path)
    print(f"sha256 {resolved.file_sha256}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    src: Path = args.src
    dst: Path = args.dst if args.dst is not None else src.with_suffix(".npz")
    if not src.is_file():
        raise WeightsError(f"{src} does not exist")
    written = convert_caffemodel(src, dst, args.model)
    print(written)
    print(f"sha256 {sha256_file(written)}")
    return 0


def _looks_like_npz(path: Path) -> bool:
    if path.suffix.lower() == ".npz":
        return True
    if path.suffix.lower() == ".caffemodel":
        return False
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def _verify(paths: list[Path], model: str) -> int:
    failed = False
    for path in paths:
        if not path.is_file():
            print(f"{path}: no such file")
            failed = True
            continue
        if _looks_like_npz(path):
            problems = check_npz(path, deep=True, model=model)
        else:
            problems = check_caffemodel(path, model)
        if problems:
            failed = True
            for problem in problems:
                print(f"{path}: {problem}")
            other = _npz_model(path) if _looks_like_npz(path) else None
            if other is not None and other != model:
                print(f"{path}: holds every array of {other}: pass --model {other}")
        else:
            print(f"{path}: OK (sha256 {sha256_file(path)}), {MODELS[model].display} weights")
    return 1 if failed else 0


def _npz_model(path: Path) -> str | None:
    """The built-in model whose arrays ``path`` holds, exactly, if one does."""
    try:
        with zipfile.ZipFile(path) as archive:
            keys = {name.removesuffix(".npy") for name in archive.namelist()}
    except (OSError, zipfile.BadZipFile):
        return None
    return next((name for name, spec in MODELS.items() if keys == spec.layout.keys()), None)


def _show(args: argparse.Namespace) -> int:
    cache = args.cache_dir.expanduser() if args.cache_dir is not None else default_cache_dir()
    print(f"cache {cache}")
    for name in [args.model] if args.model else list(PRETRAINED):
        info = pretrained_info(name)
        cached = [path for path in (cache / info.npz_name, chainer_cache_path(name)) if path.is_file()]
        if cached:
            problems = check_npz(cached[0], model=name)
            state = f"{cached[0]} (sha256 {sha256_file(cached[0])})"
            if problems:
                state += " UNUSABLE: " + "; ".join(problems)
        else:
            state = "not cached"
        if info.url is not None:
            origin = f"fetch downloads {info.url} (mirror: ${info.url_env})"
        else:
            origin = (
                f"not publicly downloadable: get {info.caffemodel_name} (see {RESNET_WEIGHTS_PAGE}), "
                f"then `fetch --model {name} --caffemodel PATH`"
            )
        print(f"{name}: {state}")
        print(f"  {origin}")
    return 0
