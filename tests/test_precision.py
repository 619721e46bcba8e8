"""Reduced-precision conversions, against a reference written element by element."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from layergrad_server import precision


def _reference_bfloat16(value: float) -> int:
    """Round-to-nearest-even of one float32 to its upper 16 bits, NaN kept NaN."""
    (bits,) = struct.unpack("<I", struct.pack("<f", value))
    if value != value:
        return (bits >> 16) | 0x0040
    upper, lower = bits >> 16, bits & 0xFFFF
    if lower > 0x8000 or (lower == 0x8000 and upper & 1):
        upper += 1
    return upper


def test_bfloat16_rounds_to_nearest_even_like_the_element_reference():
    rng = np.random.default_rng(0)
    values = np.concatenate(
        [
            rng.standard_normal(2000).astype(np.float32) * np.float32(1e-3),
            np.array(
                [0.0, -0.0, 1.0, np.inf, -np.inf, np.nan, 3.4e38, 1e-40, 1.00390625, 1.01171875],
                dtype=np.float32,
            ),
            np.array([0x7F810001, 0x7FFFFFFF, 0x3F808000, 0x3F818000], dtype=np.uint32).view(np.float32),
        ]
    )
    got = precision.bfloat16_bits(values)
    expected = np.array([_reference_bfloat16(float(v)) for v in values], dtype=np.uint16)
    np.testing.assert_array_equal(got, expected)
    back = precision.bfloat16_to_float32(got)
    assert np.isnan(back[np.isnan(values)]).all()
    assert back[values == np.inf].tolist() == [np.inf]


def test_bfloat16_of_an_empty_tensor_is_empty():
    assert precision.bfloat16_bits(np.zeros((0, 3), np.float32)).shape == (0, 3)


@pytest.mark.parametrize("scale", [1e-12, 1e-6, 1.0, 1e6, 1e30])
def test_scaled_float16_never_overflows_and_undoes_its_power_of_two_scale(scale):
    rng = np.random.default_rng(1)
    values = (rng.standard_normal(5000) * scale).astype(np.float32)
    exponent = precision.float16_scale_exponent(values)
    half = precision.to_float16(values, exponent)
    assert np.isfinite(half).all()
    expected = (values.astype(np.float64) * 2.0**exponent).astype(np.float16)  # reference rounding
    np.testing.assert_array_equal(half, expected)
    back = precision.from_float16(half, exponent)
    np.testing.assert_array_equal(back, expected.astype(np.float64) * 2.0**-exponent)
    wide = values.astype(np.float64)
    assert np.linalg.norm(back - wide) / np.linalg.norm(wide) < 1e-3


def test_float16_in_its_normal_range_is_not_scaled():
    assert precision.float16_scale_exponent(np.array([1.0, -3.5, 60000.0], np.float32)) == 0
    assert precision.float16_scale_exponent(np.zeros(4, np.float32)) == 0
    assert precision.float16_scale_exponent(np.zeros(0, np.float32)) == 0


def test_float16_scale_ignores_nan_and_inf_which_pass_through():
    values = np.array([np.nan, np.inf, -np.inf, 1e6, 1.0], np.float32)
    exponent = precision.float16_scale_exponent(values)
    assert exponent == 15 - 20  # 2**19 <= 1e6 < 2**20
    back = precision.from_float16(precision.to_float16(values, exponent), exponent)
    assert np.isnan(back[0]) and back[1] == np.inf and back[2] == -np.inf
    assert back[3] == float(np.float16(1e6 / 32)) * 32 and back[4] == 1.0
