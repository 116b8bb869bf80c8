"""clip_by_global_norm(eps=1e-6) against vectors recorded from torch.nn.utils.clip_grad_norm_.

The vectors were written by tests/data/make_torch_vectors.py with PyTorch (CPU build);
PyTorch is not needed to run this test.
"""

import json
import math
import pathlib

import jax
import numpy as np
import pytest
from _helpers import ulp_distance

import jaxclip

DATA = np.load(pathlib.Path(__file__).parent / "data" / "torch_clip_grad_norm.npz")
META = json.loads(str(DATA["meta"]))
CASES = list(enumerate(META["cases"]))


@pytest.mark.parametrize("index,case", CASES, ids=[f"{c['norm_type']}-{i}" for i, c in CASES])
def test_matches_torch_within_a_few_ulps(index, case):
    grads = [DATA[f"{index}_in_{j}"] for j in range(case["leaves"])]
    expected = [DATA[f"{index}_out_{j}"] for j in range(case["leaves"])]
    tx = jaxclip.clip_by_global_norm(case["max_norm"], ord=case["norm_type"], eps=1e-6)
    updates, state = jax.jit(tx.update)([jax.numpy.asarray(g) for g in grads], tx.init(None))
    # the order of the float32 additions (which varies with the XLA version) and, for
    # p = 3, the rounding of the cube root move the norm by a few ulps
    assert float(state.norm) == pytest.approx(case["total_norm"], rel=6e-7)
    worst = max(int(ulp_distance(u, e).max()) for u, e in zip(updates, expected))
    assert worst <= 5, f"{worst} ulps from torch"


def test_vectors_cover_every_order_and_both_sides_of_the_threshold():
    orders = {c["norm_type"] for c in META["cases"]}
    assert orders == {1.0, 2.0, 3.0, math.inf}
    clipped = [c["max_norm"] < c["total_norm"] for c in META["cases"]]
    assert any(clipped) and not all(clipped)
