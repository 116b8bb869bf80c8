"""Writes torch_clip_grad_norm.npz: inputs and outputs of torch.nn.utils.clip_grad_norm_.

Run with PyTorch installed (CPU build); the test suite only reads the file:

    python tests/data/make_torch_vectors.py
"""

import json
import pathlib

import numpy as np
import torch

CASES = []
rng = np.random.default_rng(20261122)
for norm_type in (1.0, 2.0, 3.0, float("inf")):
    for case in range(6):
        shapes = [
            tuple(rng.integers(1, 9, size=rng.integers(1, 4))) for _ in range(rng.integers(1, 6))
        ]
        magnitude = 10.0 ** rng.uniform(-4, 4)
        grads = [(rng.standard_normal(s) * magnitude).astype(np.float32) for s in shapes]
        total = float(
            torch.linalg.vector_norm(
                torch.stack(
                    [torch.linalg.vector_norm(torch.from_numpy(g), norm_type) for g in grads]
                ),
                norm_type,
            )
        )
        # below, at, and above the norm
        max_norm = [total * 0.1, total * 0.5, total, total * 2.0, 1e-3][case % 5]
        CASES.append((norm_type, float(np.float32(max_norm)), grads))

arrays, meta = {}, []
for i, (norm_type, max_norm, grads) in enumerate(CASES):
    params = [torch.nn.Parameter(torch.zeros(g.shape)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = torch.from_numpy(g.copy())
    total = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type, foreach=True)
    for j, (g, p) in enumerate(zip(grads, params)):
        arrays[f"{i}_in_{j}"] = g
        arrays[f"{i}_out_{j}"] = p.grad.numpy()
    meta.append(
        {
            "norm_type": norm_type,
            "max_norm": max_norm,
            "leaves": len(grads),
            "total_norm": float(total),
        }
    )

out = pathlib.Path(__file__).with_name("torch_clip_grad_norm.npz")
np.savez(out, meta=json.dumps({"torch": torch.__version__, "cases": meta}), **arrays)
print(f"wrote {len(meta)} cases to {out}")
