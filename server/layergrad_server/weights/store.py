"""Finding, downloading and caching the pretrained weights of the built-in models.

:func:`resolve_weights` maps a ``--weights`` spec and a model name (``vgg16``,
``vgg19``, ``googlenet``, ``resnet50``, ``resnet101``, ``resnet152``) to a checked
npz file (or to a random-initialisation seed). The cache directory
(``$LAYERGRAD_CACHE_DIR``, default ``~/.cache/layergrad``) holds:

* the published models, downloaded (or converted from a local caffemodel by
  ``layergrad-server weights fetch --caffemodel``), under Chainer's own names:
  ``VGG_ILSVRC_16_layers.npz``, ``VGG_ILSVRC_19_layers.npz``,
  ``bvlc_googlenet.npz``, ``ResNet-50-model.npz``, ``ResNet-101-model.npz``,
  ``ResNet-152-model.npz``;
* ``MODEL-caffemodel-<sha256>.npz``: conversions of local ``.caffemodel`` files
  passed as ``--weights`` (``vgg16-caffemodel-<sha256>.npz``);
* ``<caffemodel name>.part``: a download in progress, removed once converted or
  rejected;
* ``.lock``: held (``fcntl.flock``) while downloading or converting, so several
  server processes sharing the cache never race.

Chainer's converted cache (``$CHAINER_DATASET_ROOT/pfnet/chainer/models/<npz
name>``) is used when present. VGG16, VGG19 and GoogLeNet are downloaded from
the addresses Chainer uses; ResNet's caffemodels are not publicly downloadable
(their authors hand them out through a form), so ``auto`` for ResNet uses a
cached npz, else a caffemodel placed in the cache or in Chainer's directory
under its published name (``ResNet-50-model.caffemodel``), else a mirror named
by ``$LAYERGRAD_RESNET50_WEIGHTS_URL``, and otherwise says how to get it.
HTTP uses only ``urllib``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import logging
import os
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TextIO

from layergrad_server import __version__
from layergrad_server.weights import WeightsError
from layergrad_server.weights.convert import (
    DEFAULT_MODEL,
    check_npz,
    convert_caffemodel,
    model_weights,
    read_caffemodel,
    write_npz_atomic,
)

logger = logging.getLogger(__name__)

#: Where Chainer's ``VGG16Layers(pretrained_model='auto')`` downloads the model from.
DEFAULT_WEIGHTS_URL = (
    "https://www.robots.ox.ac.uk/%7Evgg/software/very_deep/caffe/VGG_ILSVRC_16_layers.caffemodel"
)
#: Where Chainer's ``VGG19Layers`` and ``GoogLeNet`` download theirs from (VGG19 over HTTPS here).
VGG19_WEIGHTS_URL = (
    "https://www.robots.ox.ac.uk/%7Evgg/software/very_deep/caffe/VGG_ILSVRC_19_layers.caffemodel"
)
GOOGLENET_WEIGHTS_URL = "http://dl.caffe.berkeleyvision.org/bvlc_googlenet.caffemodel"
#: Where ResNet's authors publish how to obtain their caffemodels.
RESNET_WEIGHTS_PAGE = "https://github.com/KaimingHe/deep-residual-networks"

CACHE_DIR_ENV = "LAYERGRAD_CACHE_DIR"
#: VGG16's download mirror and expected sha256 (hex); other models use LAYERGRAD_<MODEL>_WEIGHTS_URL/_SHA256.
WEIGHTS_URL_ENV = "LAYERGRAD_WEIGHTS_URL"
WEIGHTS_SHA256_ENV = "LAYERGRAD_WEIGHTS_SHA256"
CHAINER_DATASET_ROOT_ENV = "CHAINER_DATASET_ROOT"

PRETRAINED_NPZ_NAME = "VGG_ILSVRC_16_layers.npz"
CAFFEMODEL_NAME = "VGG_ILSVRC_16_layers.caffemodel"
PART_SUFFIX = ".part"
LOCK_NAME = ".lock"

#: Failed download attempts tolerated before giving up.
DOWNLOAD_RETRIES = 6
#: First delay between download attempts, in seconds; doubles on each failure.
RETRY_BACKOFF_S = 1.0
RETRY_BACKOFF_MAX_S = 30.0
#: Socket timeout for each HTTP request, in seconds.
DOWNLOAD_TIMEOUT_S = 60.0
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Pretrained:
    """Where one model's published weights come from and where they are cached.

    ``url`` is None when the caffemodel cannot be downloaded without asking its
    authors (ResNet). ``url_envs`` and ``sha256_envs`` are the environment
    variables naming a mirror and the download's expected sha256, first set wins.
    """

    model: str
    display: str
    npz_name: str
    caffemodel_name: str
    url: str | None
    url_envs: tuple[str, ...]
    sha256_envs: tuple[str, ...]

    @property
    def url_env(self) -> str:
        """The variable messages suggest for a mirror."""
        return self.url_envs[-1]


def _pretrained(model: str, display: str, stem: str, url: str | None, *legacy: str) -> Pretrained:
    upper = model.upper()
    return Pretrained(
        model=model,
        display=display,
        npz_name=f"{stem}.npz",
        caffemodel_name=f"{stem}.caffemodel",
        url=url,
        url_envs=(f"LAYERGRAD_{upper}_WEIGHTS_URL", *(f"{name}_URL" for name in legacy)),
        sha256_envs=(f"LAYERGRAD_{upper}_WEIGHTS_SHA256", *(f"{name}_SHA256" for name in legacy)),
    )


#: Every built-in model's published weights, by lowercase model name.
PRETRAINED: Mapping[str, Pretrained] = {
    entry.model: entry
    for entry in (
        _pretrained("vgg16", "VGG16", "VGG_ILSVRC_16_layers", DEFAULT_WEIGHTS_URL, "LAYERGRAD_WEIGHTS"),
        _pretrained("vgg19", "VGG19", "VGG_ILSVRC_19_layers", VGG19_WEIGHTS_URL),
        _pretrained("googlenet", "GoogLeNet", "bvlc_googlenet", GOOGLENET_WEIGHTS_URL),
        _pretrained("resnet50", "ResNet50", "ResNet-50-model", None),
        _pretrained("resnet101", "ResNet101", "ResNet-101-model", None),
        _pretrained("resnet152", "ResNet152", "ResNet-152-model", None),
    )
}


def pretrained_info(model: str = DEFAULT_MODEL) -> Pretrained:
    """The published weights of the built-in ``model`` (any case); WeightsError if there is none."""
    return PRETRAINED[model_weights(model).name]


@dataclass(frozen=True)
class ResolvedWeights:
    """What the server loads: an npz file, or random weights from a seed.

    ``source`` says where the weights came from (``random:SEED``, ``npz:PATH``,
    ``cache:PATH``, ``chainer-cache:PATH``, ``download:URL`` or
    ``caffemodel:PATH``); ``file_sha256`` is the hex sha256 of ``npz_path``,
    empty for random weights; ``model`` the lowercase name of the model they
    are for.
    """

    npz_path: Path | None
    random_seed: int | None
    source: str
    pretrained: bool
    file_sha256: str
    model: str = DEFAULT_MODEL


def default_cache_dir() -> Path:
    """The cache directory: ``$LAYERGRAD_CACHE_DIR`` or ``~/.cache/layergrad``."""
    configured = os.environ.get(CACHE_DIR_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "layergrad"


def _first_env(names: tuple[str, ...]) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


def default_weights_url(model: str = DEFAULT_MODEL) -> str | None:
    """The download URL: the model's mirror variable, else the published URL (None for ResNet)."""
    info = pretrained_info(model)
    return _first_env(info.url_envs) or info.url


def chainer_dataset_dir() -> Path:
    """Where Chainer keeps its converted models (``$CHAINER_DATASET_ROOT/pfnet/chainer/models``)."""
    root = os.environ.get(CHAINER_DATASET_ROOT_ENV) or str(Path.home() / ".chainer" / "dataset")
    return Path(root).expanduser() / "pfnet" / "chainer" / "models"


def chainer_cache_path(model: str = DEFAULT_MODEL) -> Path:
    """Where Chainer keeps its own converted npz of ``model``."""
    return chainer_dataset_dir() / pretrained_info(model).npz_name


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The hex sha256 of a file's contents."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


@contextlib.contextmanager
def cache_lock(cache_dir: Path) -> Iterator[None]:
    """Holds the cache directory's exclusive lock (across processes) for the ``with`` body."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(cache_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process using the weights cache %s", cache_dir)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def resolve_weights(
    spec: str | None,
    model: str = DEFAULT_MODEL,
    *,
    cache_dir: Path | None = None,
    url: str | None = None,
    progress: bool = True,
    expected_sha256: str | None = None,
) -> ResolvedWeights:
    """Turns a weights spec into checked weights for the built-in ``model`` (default ``vgg16``).

    ``model`` is ``vgg16``, ``vgg19``, ``googlenet``, ``resnet50``, ``resnet101``
    or ``resnet152`` (any case). ``spec`` is one of:

    * ``None``: the cached pretrained npz (ours, then Chainer's) if present,
      else random weights with seed 0 and a loud warning;
    * ``"random:SEED"`` (or ``"random"``, seed 0): random weights, no file;
    * ``"auto"``: the cached pretrained npz, else download ``url`` (default
      the model's mirror variable or the published URL), verify and convert
      it. ResNet has no public URL: a caffemodel under its published name in
      the cache or Chainer's directory is converted, else a mirror is
      downloaded if one is named, else a WeightsError says how to get it;
    * a path ending ``.npz``: that file, checked to hold every array of the
      model with the right shape;
    * a path ending ``.caffemodel``: converted once into the cache, keyed by
      the file's sha256.

    ``expected_sha256`` (default the model's sha256 variable) is the hex
    sha256 a download must have. ``progress`` shows a download progress bar
    on stderr. Raises :class:`WeightsError` with the reason when the weights
    cannot be used.
    """
    info = pretrained_info(model)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if spec is None:
        found = _find_cached(cache, info)
        if found is not None:
            return _checked_npz(*found, info)
        logger.warning(
            "NO PRETRAINED %s WEIGHTS FOUND (looked in %s and %s): serving RANDOM weights (seed 0). "
            "Gradients will not reflect a trained network. Run `layergrad-server weights fetch%s`, "
            "or pass --weights auto, a .npz or a .caffemodel.",
            info.display.upper(),
            cache / info.npz_name,
            chainer_cache_path(info.model),
            "" if info.model == DEFAULT_MODEL else f" --model {info.model}",
        )
        return _random(0, info)
    text = spec.strip()
    if text == "random" or text.startswith("random:"):
        return _random(_parse_seed(text), info)
    if text == "auto":
        found = _find_cached(cache, info)
        if found is not None:
            return _checked_npz(*found, info)
        source_url = url or _first_env(info.url_envs)
        if source_url is None:
            local = _find_local_caffemodel(cache, info)
            if local is not None:
                return _checked_npz(install_caffemodel(local, cache, info.model), f"caffemodel:{local}", info)
            source_url = info.url
        if source_url is None:
            raise WeightsError(_how_to_get(cache, info))
        sha = expected_sha256 if expected_sha256 is not None else _first_env(info.sha256_envs)
        npz = download_pretrained(
            cache, source_url, expected_sha256=sha or None, progress=progress, model=info.model
        )
        return _checked_npz(npz, f"download:{source_url}", info)
    lowered = text.lower()
    if lowered.endswith(".npz"):
        path = Path(text).expanduser()
        return _checked_npz(path, f"npz:{path}", info)
    if lowered.endswith(".caffemodel"):
        path = Path(text).expanduser()
        return _checked_npz(convert_into_cache(path, cache, info.model), f"caffemodel:{path}", info)
    raise WeightsError(
        f"unrecognised weights spec {spec!r}: expected 'auto', 'random:SEED', a path ending .npz "
        "or a path ending .caffemodel"
    )


def _how_to_get(cache: Path, info: Pretrained) -> str:
    """Why ``auto`` cannot get ``info``'s weights by itself, and what to do instead."""
    return (
        f"no pretrained {info.display} weights here (looked for {cache / info.npz_name}, "
        f"{chainer_cache_path(info.model)}, {cache / info.caffemodel_name} and "
        f"{chainer_dataset_dir() / info.caffemodel_name}), and they cannot be downloaded automatically: "
        f"the authors hand out {info.caffemodel_name} on request (see {RESNET_WEIGHTS_PAGE}). "
        f"Once you have it, run `layergrad-server weights fetch --model {info.model} --caffemodel "
        f"{info.caffemodel_name}` to convert it into the cache (then --weights auto finds it), or place it "
        f"at {cache / info.caffemodel_name}, or pass --weights PATH/{info.caffemodel_name} (or a converted "
        f".npz); ${info.url_env} may name a mirror to download it from. Or serve random weights "
        "with --weights random:SEED."
    )


def _random(seed: int, info: Pretrained | None = None) -> ResolvedWeights:
    return ResolvedWeights(
        npz_path=None,
        random_seed=seed,
        source=f"random:{seed}",
        pretrained=False,
        file_sha256="",
        model=info.model if info is not None else DEFAULT_MODEL,
    )


def _parse_seed(text: str) -> int:
    _, _, value = text.partition(":")
    if not value:
        return 0
    try:
        seed = int(value)
    except ValueError:
        seed = -1
    if seed < 0:
        raise WeightsError(f"bad weights spec {text!r}: the seed must be a non-negative integer")
    return seed


def _find_cached(cache: Path, info: Pretrained) -> tuple[Path, str] | None:
    """The first existing pretrained npz: ours, then Chainer's; with its source label."""
    ours = cache / info.npz_name
    if ours.is_file():
        return ours, f"cache:{ours}"
    chainers = chainer_cache_path(info.model)
    if chainers.is_file():
        return chainers, f"chainer-cache:{chainers}"
    return None


def _find_local_caffemodel(cache: Path, info: Pretrained) -> Path | None:
    """A caffemodel under its published name in the cache or Chainer's directory (where Chainer looks)."""
    for directory in (cache, chainer_dataset_dir()):
        candidate = directory / info.caffemodel_name
        if candidate.is_file():
            return candidate
    return None


def _checked_npz(path: Path, source: str, info: Pretrained | None = None) -> ResolvedWeights:
    """Checks ``path`` holds every array of the model with the right shape; hashes it."""
    info = info or PRETRAINED[DEFAULT_MODEL]
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    problems = check_npz(path, model=info.model)
    if problems:
        raise WeightsError(
            f"weights file {path} cannot be loaded into {info.display} ({source}): "
            + "; ".join(problems)
            + ". Delete or replace it."
        )
    digest = sha256_file(path)
    logger.info("using %s weights %s (sha256 %s) from %s", info.display, path, digest, source)
    return ResolvedWeights(
        npz_path=path.resolve(),
        random_seed=None,
        source=source,
        pretrained=True,
        file_sha256=digest,
        model=info.model,
    )


def convert_into_cache(caffemodel: Path, cache_dir: Path, model: str = DEFAULT_MODEL) -> Path:
    """Converts ``caffemodel`` into ``cache_dir`` once (keyed by model and sha256); returns the npz."""
    name = model_weights(model).name
    if not caffemodel.is_file():
        raise WeightsError(f"caffemodel file {caffemodel} does not exist")
    digest = sha256_file(caffemodel)
    target = cache_dir / f"{name}-caffemodel-{digest}.npz"
    if target.is_file():
        return target
    with cache_lock(cache_dir):
        if not target.is_file():  # another process may have converted it meanwhile
            convert_caffemodel(caffemodel, target, name)
    return target


def install_caffemodel(caffemodel: Path, cache_dir: Path, model: str = DEFAULT_MODEL) -> Path:
    """Converts a local copy of ``model``'s published caffemodel into the cache as its pretrained npz.

    What ``auto`` and the default then find, as if it had been downloaded. An
    existing pretrained npz is replaced. Returns the npz path.
    """
    info = pretrained_info(model)
    if not caffemodel.is_file():
        raise WeightsError(f"caffemodel file {caffemodel} does not exist")
    target = cache_dir / info.npz_name
    with cache_lock(cache_dir):
        convert_caffemodel(caffemodel, target, info.model)
    return target


def download_pretrained(
    cache_dir: Path,
    url: str,
    *,
    expected_sha256: str | None = None,
    progress: bool = True,
    model: str = DEFAULT_MODEL,
) -> Path:
    """Downloads, verifies and converts ``model``'s caffemodel into ``cache_dir``; returns the npz.

    Runs under the cache lock. The download goes to a ``.part`` file that is
    always removed afterwards, whether it converted or was rejected; the npz is
    written atomically, so it is either complete or absent.
    """
    info = pretrained_info(model)
    target = cache_dir / info.npz_name
    part = cache_dir / (info.caffemodel_name + PART_SUFFIX)
    with cache_lock(cache_dir):
        if target.is_file():  # another process finished while this one waited
            return target
        if part.exists():
            logger.info("removing a stale partial download %s", part)
            part.unlink()
        try:
            download_file(url, part, progress=progress, mirror_env=info.url_env)
            if expected_sha256:
                digest = sha256_file(part)
                if digest != expected_sha256.strip().lower():
                    raise WeightsError(
                        f"download from {url} is corrupt or not the expected file: sha256 {digest}, "
                        f"expected {expected_sha256.strip().lower()}; it was deleted"
                    )
            try:
                arrays = read_caffemodel(part, info.model)
            except WeightsError as exc:
                raise WeightsError(
                    f"download from {url} is not a usable {info.display} caffemodel and was deleted: {exc}"
                ) from exc
            write_npz_atomic(arrays, target)
            del arrays
        finally:
            part.unlink(missing_ok=True)
    logger.info("converted %s into %s", url, target)
    return target


def _parse_content_range(value: str | None) -> tuple[int, int | None]:
    """(first byte, full length or None) from a ``Content-Range: bytes A-B/N`` header."""
    if not value or not value.startswith("bytes "):
        raise ValueError(f"bad Content-Range {value!r}")
    span, _, full = value[len("bytes ") :].partition("/")
    first, _, _ = span.partition("-")
    return int(first), (None if full in ("", "*") else int(full))


class _RetryableError(Exception):
    """An attempt failed in a way that another attempt may fix."""


def download_file(
    url: str,
    dest: Path,
    *,
    progress: bool = True,
    retries: int | None = None,
    timeout: float | None = None,
    stream: TextIO | None = None,
    mirror_env: str = WEIGHTS_URL_ENV,
) -> int:
    """Downloads ``url`` into ``dest`` (truncating it), resuming with HTTP Range after drops.

    Retries up to ``retries`` (default :data:`DOWNLOAD_RETRIES`) failed attempts
    with exponential backoff, checks the size against ``Content-Length``, and
    returns the number of bytes written. Raises :class:`WeightsError` when the
    download cannot be completed; ``dest`` may then hold a partial file.
    ``mirror_env`` is the variable a message suggests for a mirror.
    """
    max_failures = DOWNLOAD_RETRIES if retries is None else retries
    socket_timeout = DOWNLOAD_TIMEOUT_S if timeout is None else timeout
    bar = _Progress(dest.name.removesuffix(PART_SUFFIX), enabled=progress, stream=stream)
    state = _DownloadState()
    failures = 0
    with open(dest, "wb") as out:
        while True:
            try:
                _attempt(url, out, state, socket_timeout, bar, mirror_env)
                break
            except _RetryableError as exc:
                failures += 1
                if failures > max_failures:
                    raise WeightsError(
                        f"download from {url} failed after {failures} attempts "
                        f"({_size(state.have)} of {_size(state.total)} received): {exc}"
                    ) from exc
                delay = min(RETRY_BACKOFF_S * 2 ** (failures - 1), RETRY_BACKOFF_MAX_S)
                logger.warning(
                    "download from %s interrupted at %s (%s); retrying in %.1f s (%d of %d)",
                    url,
                    _size(state.have),
                    exc,
                    delay,
                    failures,
                    max_failures,
                )
                bar.interrupted()
                time.sleep(delay)
        try:
            out.flush()
            os.fsync(out.fileno())
        except OSError as exc:
            raise WeightsError(f"cannot write {dest}: {exc}") from exc
    bar.finish(state.have, state.total)
    return state.have


@dataclass
class _DownloadState:
    """Progress of one download across attempts."""

    have: int = 0  # bytes written to the file so far
    total: int | None = None  # full size, once the server said it
    validator: str | None = None  # ETag or Last-Modified of the first response, for If-Range


def _attempt(
    url: str, out: BinaryIO, state: _DownloadState, timeout: float, bar: _Progress, mirror_env: str
) -> None:
    """One HTTP request continuing from byte ``state.have``; updates ``state`` as bytes arrive."""
    have, total, validator = state.have, state.total, state.validator
    headers = {"User-Agent": f"layergrad/{__version__}", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
        if validator:
            headers["If-Range"] = validator
    try:
        request = urllib.request.Request(url, headers=headers)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            if response.status == 206 and have:
                try:
                    first, full = _parse_content_range(response.headers.get("Content-Range"))
                except ValueError as exc:
                    raise _RetryableError(str(exc)) from exc
                if first != have:
                    raise _RetryableError(f"server resumed at byte {first} instead of {have}")
                if full is not None:
                    if total is not None and full != total:
                        raise WeightsError(
                            f"{url} changed size during the download ({total} -> {full} bytes)"
                        )
                    total = state.total = full
            elif response.status == 200:
                if have:
                    logger.info("server did not resume the download; starting again from the beginning")
                    _rewind(out)
                    have = state.have = 0
                length = response.headers.get("Content-Length")
                total = state.total = int(length) if length and length.isdigit() else None
                validator = state.validator = response.headers.get("ETag") or response.headers.get(
                    "Last-Modified"
                )
            else:
                raise WeightsError(f"download from {url} failed: unexpected HTTP status {response.status}")
            while True:
                chunk = response.read(_CHUNK)
                if not chunk:
                    break
                _write(out, chunk)
                have = state.have = have + len(chunk)
                bar.update(have, total)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and total is not None and have == total:
            return
        if exc.code in (408, 425, 429) or exc.code >= 500:
            raise _RetryableError(f"HTTP {exc.code} {exc.reason}") from exc
        raise WeightsError(f"download from {url} failed: HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, socket.gaierror):
            # No retry: offline, or a host name that does not resolve, is not a dropped connection.
            host = urllib.parse.urlsplit(url).hostname
            raise WeightsError(
                f"cannot resolve {host} ({exc.reason}): no network or DNS here? Download the weights "
                f"elsewhere and pass --weights PATH, or point ${mirror_env} (fetch --url) at a mirror "
                "you can reach"
            ) from exc
        raise _RetryableError(f"{type(exc).__name__}: {exc}") from exc
    except (http.client.HTTPException, ConnectionError, TimeoutError) as exc:
        raise _RetryableError(f"{type(exc).__name__}: {exc}") from exc
    except ValueError as exc:  # urllib's answer to a malformed URL
        raise WeightsError(f"bad download URL {url!r}: {exc}") from exc
    except OSError as exc:
        if isinstance(exc, _WriteError):
            raise WeightsError(str(exc)) from exc
        raise _RetryableError(f"{type(exc).__name__}: {exc}") from exc
    if total is not None and have != total:
        raise _RetryableError(f"connection closed after {_size(have)} of {_size(total)}")


class _WriteError(OSError):
    """Writing the downloaded bytes locally failed (not retryable)."""


def _write(out: BinaryIO, chunk: bytes) -> None:
    try:
        out.write(chunk)
    except OSError as exc:
        raise _WriteError(f"cannot write {getattr(out, 'name', 'download')}: {exc}") from exc


def _rewind(out: BinaryIO) -> None:
    try:
        out.seek(0)
        out.truncate()
    except OSError as exc:
        raise _WriteError(f"cannot rewrite {getattr(out, 'name', 'download')}: {exc}") from exc


def _size(count: int | None) -> str:
    if count is None:
        return "? bytes"
    return f"{count / (1 << 20):.1f} MiB"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _Progress:
    """Download progress on stderr: a redrawn bar on a terminal, a line every few seconds otherwise."""

    def __init__(self, label: str, *, enabled: bool, stream: TextIO | None = None) -> None:
        self._label = label
        self._enabled = enabled
        self._stream = stream if stream is not None else sys.stderr
        self._tty = bool(getattr(self._stream, "isatty", lambda: False)())
        self._interval = 0.2 if self._tty else 5.0
        self._started = time.monotonic()
        self._baseline = 0
        self._last = 0.0
        self._drawn = False

    def update(self, done: int, total: int | None) -> None:
        """Reports ``done`` bytes of ``total``; draws at most every interval."""
        now = time.monotonic()
        if self._enabled and now - self._last >= self._interval:
            self._last = now
            self._draw(done, total, now)

    def interrupted(self) -> None:
        """Ends the current bar line before a retry message."""
        if self._enabled and self._tty and self._drawn:
            self._stream.write("\n")
            self._stream.flush()
            self._drawn = False

    def finish(self, done: int, total: int | None) -> None:
        """Draws the final state."""
        if self._enabled:
            self._draw(done, total, time.monotonic())
            if self._tty:
                self._stream.write("\n")
                self._stream.flush()

    def _draw(self, done: int, total: int | None, now: float) -> None:
        elapsed = max(now - self._started, 1e-6)
        rate = max(done - self._baseline, 0) / elapsed
        parts = [f"{self._label}: {_size(done)}"]
        if total:
            fraction = min(done / total, 1.0)
            parts[0] += f" / {_size(total)} ({fraction:.0%})"
            if self._tty:
                filled = int(fraction * 30)
                parts.insert(0, "[" + "#" * filled + "-" * (30 - filled) + "]")
        parts.append(f"{rate / (1 << 20):.1f} MiB/s")
        if total and rate > 0 and done < total:
            parts.append(f"ETA {_duration((total - done) / rate)}")
        line = "  ".join(parts)
        if self._tty:
            self._stream.write("\r" + line + "\x1b[K")
            self._drawn = True
        else:
            self._stream.write(line + "\n")
        self._stream.flush()
