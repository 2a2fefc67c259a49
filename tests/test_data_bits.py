"""Bits per byte against a hand-computed value."""

import math

import pytest

from lmsurgeon.data.bits import bits_per_byte, utf8_bytes


def test_bits_per_byte_of_uniform_byte_model_is_eight():
    # A model that gives each of 256 byte values probability 1/256 spends exactly 8 bits on every byte.
    text = "héllo wörld"
    n = utf8_bytes([text])
    assert n == 13  # two 2-byte characters
    assert bits_per_byte(n * math.log(256.0), n) == pytest.approx(8.0, rel=1e-12)


def test_bits_per_byte_rejects_empty_text():
    with pytest.raises(ValueError, match="positive byte count"):
        bits_per_byte(1.0, 0)
