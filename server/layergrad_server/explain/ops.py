"""Array helpers of the attribution methods: resampling, blurring, integration rules, noise.

All of them are plain numpy, deterministic and independent of how a call is split
into internal batches.
"""

from __future__ import annotations

import functools

import numpy as np

INTEGRATION_RULES = ("riemann_left", "riemann_right", "riemann_middle", "trapezoid", "gauss_legendre")


def integration_points(rule: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Points ``alpha`` in [0, 1] and weights ``w`` (summing to 1) of an integration rule.

    ``riemann_left``: alpha_k = k/m, k = 0..m-1; ``riemann_right``: k = 1..m;
    ``riemann_middle``: (k + 1/2)/m; each with weight 1/m. ``trapezoid``: k/m for
    k = 0..m (m + 1 points), weight 1/m, halved at both ends. ``gauss_legendre``:
    numpy's m-point Gauss-Legendre nodes t_k on [-1, 1] mapped to (t_k + 1)/2, weights
    halved. Computed in float64.
    """
    m = steps
    k = np.arange(m, dtype=np.float64)
    if rule == "riemann_left":
        return k / m, np.full(m, 1.0 / m)
    if rule == "riemann_right":
        return (k + 1) / m, np.full(m, 1.0 / m)
    if rule == "riemann_middle":
        return (k + 0.5) / m, np.full(m, 1.0 / m)
    if rule == "trapezoid":
        weights = np.full(m + 1, 1.0 / m)
        weights[[0, -1]] = 0.5 / m
        return np.arange(m + 1, dtype=np.float64) / m, weights
    if rule == "gauss_legendre":
        nodes, weights = np.polynomial.legendre.leggauss(m)
        return (nodes + 1.0) / 2.0, weights / 2.0
    raise ValueError(f"unknown integration rule {rule!r}")


def noise_generator(seed: int, sample: int) -> np.random.Generator:
    """The generator of noise sample ``sample`` of seed ``seed``: numpy's PCG64 seeded with
    ``SeedSequence([seed, sample])``. The same on every machine and numpy release that keeps
    PCG64's stream; independent of the input's place in the batch and of internal batching."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, sample])))


def standard_noise(seed: int, sample: int, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal float32 noise of ``shape`` (``Generator.standard_normal``)."""
    return noise_generator(seed, sample).standard_normal(shape, dtype=np.float32)


@functools.lru_cache(maxsize=64)
def _linear_matrix(out_size: int, in_size: int, align_corners: bool) -> np.ndarray:
    """(out, in) matrix of 1-D linear interpolation from ``in_size`` to ``out_size`` samples."""
    dst = np.arange(out_size, dtype=np.float64)
    if align_corners:
        src = dst * ((in_size - 1) / (out_size - 1)) if out_size > 1 else np.zeros(out_size)
    else:
        src = (dst + 0.5) * (in_size / out_size) - 0.5
    src = np.clip(src, 0.0, in_size - 1)
    low = np.floor(src).astype(np.int64)
    high = np.minimum(low + 1, in_size - 1)
    frac = src - low
    matrix = np.zeros((out_size, in_size))
    rows = np.arange(out_size)
    np.add.at(matrix, (rows, low), 1.0 - frac)
    np.add.at(matrix, (rows, high), frac)
    return matrix


@functools.lru_cache(maxsize=64)
def _nearest_matrix(out_size: int, in_size: int) -> np.ndarray:
    """(out, in) matrix picking, for each output sample, the input sample whose cell holds its centre."""
    src = np.minimum(np.floor((np.arange(out_size) + 0.5) * in_size / out_size).astype(np.int64), in_size - 1)
    matrix = np.zeros((out_size, in_size))
    matrix[np.arange(out_size), src] = 1.0
    return matrix


def resize(
    maps: np.ndarray, size: tuple[int, int], mode: str = "bilinear", align_corners: bool = False
) -> np.ndarray:
    """``maps`` (..., h, w) resampled to ``size`` (height, width), separably, in float64.

    ``bilinear`` with ``align_corners`` False treats pixels as cells (sample centres at
    (i + 1/2) * in/out - 1/2, clamped at the border: PIL's, OpenCV's and PyTorch's
    ``align_corners=False``); with True the corner samples of input and output coincide.
    ``nearest`` takes the input cell holding each output centre.
    """
    height, width = size
    h, w = maps.shape[-2:]
    if mode == "nearest":
        rows, cols = _nearest_matrix(height, h), _nearest_matrix(width, w)
    else:
        rows, cols = _linear_matrix(height, h, align_corners), _linear_matrix(width, w, align_corners)
    return rows @ maps.astype(np.float64) @ cols.T


@functools.lru_cache(maxsize=16)
def _blur_matrix(size: int, sigma: float) -> np.ndarray:
    """(size, size) matrix of a 1-D Gaussian blur (radius ceil(3 sigma)), mirrored at the edges."""
    radius = max(int(np.ceil(3.0 * sigma)), 1)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    matrix = np.zeros((size, size))
    for offset, tap in zip(range(-radius, radius + 1), taps, strict=True):
        src = np.arange(size) + offset
        # Mirror without repeating the edge sample (numpy.pad "reflect"), folded until inside.
        period = 2 * (size - 1) if size > 1 else 1
        src = np.abs(src) % period
        src = np.where(src >= size, period - src, src)
        np.add.at(matrix, (np.arange(size), src), tap)
    return matrix


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """A (C, H, W) image blurred per channel by a Gaussian of ``sigma`` pixels, as float32."""
    height, width = image.shape[-2:]
    blurred = (
        _blur_matrix(height, float(sigma)) @ image.astype(np.float64) @ _blur_matrix(width, float(sigma)).T
    )
    return blurred.astype(np.float32)
