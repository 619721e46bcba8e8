"""``layergrad-server weights fetch|convert|verify``: managing VGG16 weights from the shell."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from layergrad_server.weights import WeightsError
from layergrad_server.weights.convert import check_caffemodel, check_npz, convert_caffemodel
from layergrad_server.weights.store import (
    CACHE_DIR_ENV,
    WEIGHTS_SHA256_ENV,
    WEIGHTS_URL_ENV,
    resolve_weights,
    sha256_file,
)

logger = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layergrad-server weights",
        description="Download, convert and check the pretrained VGG16 weights.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fetch = commands.add_parser(
        "fetch",
        help="download and convert the published VGG16 model into the cache (no-op if cached)",
        description="Download the VGG16 caffemodel, verify it, convert it to npz in the cache, "
        "and print the npz path and its sha256. Uses an existing cached npz when there is one.",
    )
    fetch.add_argument(
        "--cache-dir", type=Path, help=f"cache directory (default: ${CACHE_DIR_ENV} or ~/.cache/layergrad)"
    )
    fetch.add_argument(
        "--url", help=f"download URL, e.g. a mirror (default: ${WEIGHTS_URL_ENV} or the published URL)"
    )
    fetch.add_argument(
        "--sha256", help=f"expected sha256 of the caffemodel (default: ${WEIGHTS_SHA256_ENV}, if set)"
    )
    fetch.add_argument("--quiet", action="store_true", help="no progress bar")

    convert = commands.add_parser(
        "convert",
        help="convert a VGG16 .caffemodel into a Chainer VGG16Layers .npz",
        description="Convert SRC (a VGG16 .caffemodel) into DST (default: SRC with an .npz suffix).",
    )
    convert.add_argument("src", type=Path, metavar="SRC.caffemodel")
    convert.add_argument("dst", type=Path, nargs="?", metavar="DST.npz")

    verify = commands.add_parser(
        "verify",
        help="check that .npz or .caffemodel files hold complete VGG16 weights",
        description="Check each PATH (.npz or .caffemodel) for every VGG16 array with the right shape "
        "and finite values; print each problem; exit 1 if there is any.",
    )
    verify.add_argument("paths", type=Path, nargs="+", metavar="PATH")
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
        return _verify(args.paths)
    except WeightsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _fetch(args: argparse.Namespace) -> int:
    resolved = resolve_weights(
        "auto",
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
    written = convert_caffemodel(src, dst)
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


def _verify(paths: list[Path]) -> int:
    failed = False
    for path in paths:
        if not path.is_file():
            print(f"{path}: no such file")
            failed = True
            continue
        problems = check_npz(path, deep=True) if _looks_like_npz(path) else check_caffemodel(path)
        if problems:
            failed = True
            for problem in problems:
                print(f"{path}: {problem}")
        else:
            print(f"{path}: OK (sha256 {sha256_file(path)})")
    return 1 if failed else 0
