"""Independent references for the tests: plain NumPy in float64."""

import contextlib
import math

import jax
import numpy as np


@contextlib.contextmanager
def float64_enabled():
    """Enables float64 arrays inside the block."""
    if hasattr(jax, "enable_x64"):
        context = jax.enable_x64(True)
    else:  # jax < 0.8
        from jax.experimental import enable_x64

        context = enable_x64()
    with context:
        yield


def np_leaves(tree):
    return [np.asarray(x, dtype=np.float64) for x in jax.tree.leaves(tree)]


def np_norm(arrays, p=2.0):
    """The p-norm of all elements of ``arrays``, in float64, rescaled by the max."""
    flat = np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in arrays] or [np.zeros(0)])
    if flat.size == 0:
        return 0.0
    a = np.abs(flat)
    m = a.max()
    if p == math.inf or m == 0 or not np.isfinite(m):
        return float(m)
    return float(m * np.sum((a / m) ** p) ** (1.0 / p))


def np_clip_global(arrays, max_norm, p=2.0, eps=0.0):
    """The textbook rule: g * max_norm / ||g|| when ||g|| (+ eps) > max_norm."""
    n = np_norm(arrays, p)
    s = max_norm / (n + eps) if n + eps > max_norm else 1.0
    return [np.asarray(a, np.float64) * s for a in arrays], n, s


def ulp_distance(a, b):
    """Distance in float32 units in the last place, elementwise."""
    a = np.asarray(a, np.float32).view(np.int32).astype(np.int64)
    b = np.asarray(b, np.float32).view(np.int32).astype(np.int64)
    a = np.where(a < 0, np.int64(-(2**31)) - a, a)
    b = np.where(b < 0, np.int64(-(2**31)) - b, b)
    return np.abs(a - b)
