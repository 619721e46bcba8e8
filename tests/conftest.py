"""Shared fixtures: one real server subprocess on random seeded weights, the real SDK,
and an in-process Chainer VGG16 loaded from the same weights file as the reference."""

from __future__ import annotations

import contextlib
import io
import pathlib
import re
import urllib.request
from collections.abc import Iterator

import layergrad_server  # noqa: F401  (applies the numpy 2 shim Chainer needs)

# isort: split
import layergrad
import numpy as np
import pytest
from chainer.links.model.vision import vgg
from layergrad_server.engine import random_weights_npz
from layergrad_server.launch import ServerProcess
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("weights") / "vgg16-random-0.npz"
    path.write_bytes(random_weights_npz(0).getvalue())
    return path


@contextlib.contextmanager
def serving(
    args: list[str], log_dir: pathlib.Path, env: dict[str, str] | None = None
) -> Iterator[ServerProcess]:
    """A server started with ``args`` (and ``env``; its log in ``log_dir``), serving in the block,
    then stopped."""
    process = ServerProcess(args, log_dir / "server.log", env=env)
    try:
        process.wait_serving()
        yield process
    finally:
        process.terminate()


@pytest.fixture(scope="session")
def server(weights_file: pathlib.Path, tmp_path_factory: pytest.TempPathFactory):
    with serving(["--weights", str(weights_file)], tmp_path_factory.mktemp("logs")) as process:
        yield process


@pytest.fixture(scope="session")
def client(server: ServerProcess):
    with layergrad.Client(server.address, timeout=300) as sdk:
        yield sdk


@pytest.fixture(scope="session")
def reference_net(weights_file: pathlib.Path) -> vgg.VGG16Layers:
    """The same weights in a plain in-process Chainer VGG16Layers."""
    return vgg.VGG16Layers(pretrained_model=str(weights_file))


def make_rgb(seed: int, height: int = 180, width: int = 240) -> np.ndarray:
    """A deterministic smooth uint8 RGB image with some structure."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    channels = [
        127 + 120 * np.sin(xx / rng.uniform(5, 30) + rng.uniform(0, 6)) * np.cos(yy / rng.uniform(5, 30))
        for _ in range(3)
    ]
    noise = rng.integers(-10, 10, size=(height, width, 3))
    return np.clip(np.stack(channels, axis=-1) + noise, 0, 255).astype(np.uint8)


def encode(array: np.ndarray, image_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=image_format)
    return buffer.getvalue()


def prepared_reference(item: object) -> np.ndarray:
    """What in-process Chainer code makes of an input of each kind the service accepts."""
    if isinstance(item, bytes):
        return vgg.prepare(Image.open(io.BytesIO(item)).convert("RGB"))
    if item.dtype == np.uint8:
        return vgg.prepare(item)
    return item


def metrics_url(process: ServerProcess) -> str:
    """The /metrics URL a server started with ``--metrics-address HOST:0`` logged."""
    match = re.search(r"metrics on (http://[\d.]+:\d+/metrics)", process.log())
    assert match, f"the server logged no metrics address:\n{process.log()}"
    return match.group(1)


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a /metrics page: (name, labels) -> value."""
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def metric_delta(before: dict, after: dict, name: str, **labels: str) -> float:
    """How much the sample ``name{labels}`` grew between two scrapes."""
    key = (name, frozenset(labels.items()))
    return after.get(key, 0.0) - before.get(key, 0.0)
