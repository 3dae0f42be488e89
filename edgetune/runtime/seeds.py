"""The seeds and directions of zeroth-order steps (edgetune.compiler.zo), in plain Python: a
runner without PyTorch (edgetune.runtime) draws the same seeds as the Trainer, and a server
that aggregates FedKSeed's (seed, gradient) pairs needs nothing else.

lowbias32 (C. Wellons) is a 32-bit integer hash with full avalanche; every function here works
on Python ints and on integer tensors or arrays holding values in [0, 2**32).
"""
from __future__ import annotations

import zlib

import numpy as np

MASK32 = 0xFFFFFFFF


def mix32(x):
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def mix32_array(x: np.ndarray) -> np.ndarray:
    """mix32 of a uint32 array, in place: uint32 products wrap mod 2**32 by definition, so each
    step is one vectorised op (about 5x the int64 emulation's speed)."""
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def signs(seed: int, key: int, start: int, stop: int, dtype=np.float32) -> np.ndarray:
    """z[start:stop] of the direction for (seed, parameter key), as +-1 of `dtype`."""
    h = mix32_array(np.arange(start, stop, dtype=np.uint32) ^ np.uint32(direction_base(seed, key)))
    z = (h >> np.uint32(31)).astype(dtype)
    z *= 2
    z -= 1
    return z


def _mul32(x, c: int):
    """x * c mod 2**32, from 16-bit halves of c so that no int64 product overflows."""
    low, high = c & 0xFFFF, c >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & MASK32


def parameter_key(name: str) -> int:
    """A parameter's part of the hash: the same for a name on every machine."""
    return zlib.crc32(name.encode())


def direction_base(seed: int, key: int) -> int:
    """What entry j's hash is mixed with: the sign of z[j] is the top bit of mix32(j ^ base)."""
    return mix32((mix32(seed & MASK32) ^ key) & MASK32)


def seeds_for(step: int, seed: int, directions: int, pool=None) -> list[int]:
    """The seeds of step `step`'s directions (a function of the step count alone, so a resumed
    run draws the same ones); from `pool` (FedKSeed's K seeds) where one is given."""
    drawn = [mix32(mix32(seed & MASK32) ^ mix32((step * directions + d) & MASK32)) for d in range(directions)]
    return [pool[h % len(pool)] for h in drawn] if pool else drawn
