"""Reduced-precision output types: bfloat16 and power-of-two scaled float16.

numpy has no bfloat16; its elements are carried as ``uint16`` holding the upper 16
bits of the float32 pattern, rounded to nearest, ties to even, NaN kept NaN.

float16 output is scaled per tensor by a power of two ``2**e`` so that no finite
value overflows to infinity and small values are not flushed: ``e`` is 0 when every
finite non-zero magnitude already lies in float16's normal range [2**-14, 65504],
else ``15 - k`` where ``2**(k-1) <= max|x| < 2**k``, which puts the largest magnitude
in [2**14, 2**15). The receiver multiplies by ``2**-e``; being a power of two, the
scale adds no rounding of its own. Infinities and NaN pass through unchanged.
Without scaling (``e`` = 0) values outside [2**-25, 65520) become zero or infinity;
with it, only values below about 2**-39 of the largest still become zero. ``encode``
counts both, so that the server can refuse a tensor rather than lose values.
"""

from __future__ import annotations

import dataclasses

import numpy as np

FLOAT16_MAX = 65504.0
FLOAT16_MIN_NORMAL = 2.0**-14
# Magnitudes from which float16 rounds to infinity (halfway from 65504 to 2**16, ties to even) and
# up to which it rounds to zero (halfway to the smallest subnormal 2**-24, ties to even).
_FLOAT16_OVERFLOW = np.float32(65520.0)
_FLOAT16_ZERO_EXPONENT = -25
# The same for bfloat16: the float32 0x7F7F8000 (halfway from the largest bfloat16 to 2**128) and
# 2**-134 (halfway to the smallest bfloat16 subnormal 2**-133).
_BFLOAT16_OVERFLOW = np.array(0x7F7F8000, np.uint32).view(np.float32)[()]
_BFLOAT16_ZERO = np.float32(2.0**-134)


def bfloat16_bits(array: np.ndarray) -> np.ndarray:
    """float32 values as bfloat16 bit patterns (``uint16``), round to nearest even."""
    values = np.ascontiguousarray(array, dtype=np.float32)
    bits = values.view(np.uint32)
    rounded = bits >> np.uint32(16)  # one temporary, updated in place
    rounded &= np.uint32(1)
    rounded += np.uint32(0x7FFF)
    rounded += bits
    rounded >>= np.uint32(16)
    out = rounded.astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():  # rounding could carry a NaN's payload into infinity: keep it a quiet NaN
        out[nan] = (bits[nan] >> np.uint32(16)).astype(np.uint16) | np.uint16(0x0040)
    return out


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (``uint16``) as float32 values (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def float16_scale_exponent(array: np.ndarray) -> int:
    """The exponent ``e`` with which ``array * 2**e`` fits float16 (see the module docstring)."""
    magnitude = np.abs(np.asarray(array, dtype=np.float32))
    return _float16_exponent(magnitude, int(np.count_nonzero(magnitude == 0)))


def _float16_exponent(magnitude: np.ndarray, zeros: int) -> int:
    """``float16_scale_exponent`` of the values whose magnitudes these are, ``zeros`` of them 0."""
    if magnitude.size == 0:
        return 0
    largest = float(np.fmax.reduce(magnitude, axis=None))
    if not np.isfinite(largest):  # infinities (or all NaN): scale by the finite values only
        finite = magnitude[np.isfinite(magnitude)]
        largest = float(finite.max()) if finite.size else 0.0
    if largest == 0.0:
        return 0
    if largest <= FLOAT16_MAX and np.count_nonzero(magnitude < np.float32(FLOAT16_MIN_NORMAL)) == zeros:
        return 0
    return 15 - int(np.frexp(np.float32(largest))[1])


def to_float16(array: np.ndarray, exponent: int) -> np.ndarray:
    """``array * 2**exponent`` rounded to float16 (overflow to infinity is the caller's to count)."""
    scaled = np.ldexp(np.asarray(array, dtype=np.float32), np.int32(exponent)) if exponent else array
    with np.errstate(over="ignore"):
        return np.asarray(scaled, dtype=np.float32).astype(np.float16)


def from_float16(array: np.ndarray, exponent: int) -> np.ndarray:
    """Undoes ``to_float16``: float16 values times ``2**-exponent``, as float32 (exact)."""
    return np.ldexp(np.asarray(array, dtype=np.float16).astype(np.float32), np.int32(-exponent))


#: The output "dtype" of bfloat16 tensors on the server: their bit patterns as ``uint16``.
BFLOAT16 = np.dtype(np.uint16)
FLOAT16 = np.dtype(np.float16)


@dataclasses.dataclass(frozen=True)
class Fit:
    """How a float32 tensor goes into a reduced output type, known before converting it.

    ``exponent`` is the power-of-two scale its elements will carry (values = elements *
    2**-exponent), ``overflow`` how many finite values would become infinite and
    ``underflow`` how many non-zero values would become zero (the output type's range is
    exceeded: the caller refuses such a tensor). Infinities and NaN are never counted.
    """

    exponent: int
    overflow: int
    underflow: int


@dataclasses.dataclass(frozen=True)
class Encoded(Fit):
    """A converted tensor: its ``Fit`` and ``data``, the elements (``float16``, or bfloat16 bits
    as ``uint16``)."""

    data: np.ndarray


def fit(array: np.ndarray, dtype: np.dtype, *, scaling: bool = False) -> Fit:
    """The ``Fit`` of ``array`` (float32) in ``dtype``: FLOAT16 (scaled when ``scaling``, see the
    module docstring; else unscaled) or BFLOAT16.

    The counts compare magnitudes with the thresholds at which rounding gives infinity or
    zero (the values ``x * 2**e`` are exact in float32 down to its normal range, far below
    float16's), so that they cost comparisons, not a conversion.
    """
    if dtype not in (FLOAT16, BFLOAT16):
        raise ValueError(f"not a reduced output type: {dtype}")
    magnitude = np.abs(np.asarray(array, dtype=np.float32))
    zeros = int(np.count_nonzero(magnitude == 0))

    def overflow_at(threshold: np.float32) -> int:
        return int(np.count_nonzero(magnitude >= threshold)) - int(np.count_nonzero(magnitude == np.inf))

    if dtype == BFLOAT16:
        underflow = int(np.count_nonzero(magnitude <= _BFLOAT16_ZERO)) - zeros
        return Fit(0, overflow_at(_BFLOAT16_OVERFLOW), underflow)
    exponent = _float16_exponent(magnitude, zeros) if scaling else 0
    # Scaled, the largest finite magnitude lies below 2**15 and cannot overflow.
    overflow = overflow_at(_FLOAT16_OVERFLOW) if exponent == 0 else 0
    # x * 2**e rounds to zero when |x| <= 2**(-25 - e); no non-zero float32 is that small past e = 124.
    zero_exponent = _FLOAT16_ZERO_EXPONENT - exponent
    underflow = 0
    if zero_exponent >= -149:
        underflow = int(np.count_nonzero(magnitude <= np.float32(2.0**zero_exponent))) - zeros
    return Fit(exponent, overflow, underflow)


def convert(array: np.ndarray, dtype: np.dtype, exponent: int = 0) -> np.ndarray:
    """``array`` (float32) in ``dtype`` with the scale of its ``Fit``: float16 elements, or
    bfloat16 bits. Elementwise, so that a slice converts to the slice of the whole."""
    if dtype == BFLOAT16:
        return bfloat16_bits(array)
    if dtype == FLOAT16:
        return to_float16(array, exponent)
    raise ValueError(f"not a reduced output type: {dtype}")


def encode(array: np.ndarray, dtype: np.dtype, *, scaling: bool = False) -> Encoded:
    """``fit`` and ``convert`` at once."""
    how = fit(array, dtype, scaling=scaling)
    return Encoded(how.exponent, how.overflow, how.underflow, convert(array, dtype, how.exponent))


def decode(data: np.ndarray, exponent: int = 0) -> np.ndarray:
    """float32 values of received elements: bfloat16 bits (``uint16``) or scaled float16."""
    if data.dtype == BFLOAT16:
        return bfloat16_to_float32(data)
    return from_float16(data, exponent)
