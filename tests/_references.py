"""Plain NumPy versions of the published adaptive rules, written from the papers' rules.

Each takes the stream of pre-clip global norms n_t (float64) and returns, per step,
the factor the gradient is multiplied by and the rule's own quantities.
"""

import math

import numpy as np

TORCH_EPS = 1e-6


def torch_scale(norm, max_norm):
    """torch.nn.utils.clip_grad_norm_: min(1, max_norm / (norm + 1e-6))."""
    return min(1.0, max_norm / (norm + TORCH_EPS))


def autoclip(norms, percentile):
    """Threshold: the percentile of every norm so far, the current one included."""
    seen, out = [], []
    for n in norms:
        seen.append(n)
        c = float(np.percentile(seen, percentile))
        out.append({"threshold": c, "scale": torch_scale(n, c)})
    return out


def zclip(
    norms,
    alpha=0.97,
    z_thresh=2.5,
    warmup_steps=25,
    mode="zscore",
    clip_option="adaptive_scaling",
    clip_factor=1.0,
    max_norm=None,
    skip_update_on_spike=False,
    eps=1e-6,
):
    buffer, mean, var, out = [], None, None, []
    for n in norms:
        if mean is None:  # warmup: collect; only the cap applies
            buffer.append(n)
            if len(buffer) == warmup_steps:
                mean = float(np.mean(buffer))
                var = float(np.var(buffer))
            scale = torch_scale(n, max_norm) if max_norm is not None else 1.0
            out.append({"scale": scale, "spike": False, "mean": mean, "var": var})
            continue
        std = math.sqrt(var)
        spike, c = False, None
        if mode == "zscore":
            z = (n - mean) / (std + eps)
            if z > z_thresh:
                spike = True
                if clip_option == "adaptive_scaling":
                    c = (mean + z_thresh * std / (z / z_thresh)) * clip_factor
                else:
                    c = mean
        else:
            threshold = mean + z_thresh * std
            if n > threshold:
                spike, c = True, threshold
        effective = c if spike else n
        if max_norm is not None:
            effective = min(effective, max_norm)
        scale = effective / (n + 1e-6) if n > effective else 1.0
        if not (spike and skip_update_on_spike):
            x = c if spike else n
            mean = alpha * mean + (1 - alpha) * x
            var = alpha * var + (1 - alpha) * (x - mean) ** 2
        out.append({"scale": scale, "spike": spike, "mean": mean, "var": var})
    return out


def quantile(norms, target_quantile=0.5, learning_rate=0.2, initial=1.0, update="geometric"):
    c, out = initial, []
    for n in norms:
        scale = c / n if n > c else 1.0
        out.append({"threshold": c, "scale": scale})
        b = 1.0 if n <= c else 0.0
        if update == "geometric":
            c = c * math.exp(-learning_rate * (b - target_quantile))
        else:
            c = max(c - learning_rate * (b - target_quantile), 0.0)
    return out


def adagc(unit_norms, lambda_rel=1.04, beta=0.99, warmup_steps=100, warmup_max_norm=1.0, eps=1e-6):
    """``unit_norms``: per step, the list of the units' pre-clip norms.

    Returns per step the factor for each unit and the gammas after the step.
    """
    gamma, out = None, []
    for t, norms in enumerate(unit_norms, start=1):
        norms = np.asarray(norms, np.float64)
        if t <= warmup_steps:
            total = math.sqrt(float(np.sum(norms**2)))
            coef = warmup_max_norm / (total + eps)
            coef = coef if coef < 1 else 1.0
            after = norms * coef
            gamma = after.copy() if gamma is None else np.minimum(gamma, after)
            out.append({"scales": np.full(norms.shape, coef), "gamma": gamma.copy()})
            continue
        limit = lambda_rel * gamma
        over = norms > limit
        scales = np.where(over, limit / (norms + eps), 1.0)
        clipped = np.where(over, limit, norms)
        gamma = beta * gamma + (1 - beta) * clipped
        out.append({"scales": scales, "gamma": gamma.copy()})
    return out


def skip_on_spike(norms, losses=None, window=128, factor=6.0, max_consecutive_skips=None):
    """Per step: whether the step is skipped."""
    norm_window, loss_window, out = [], [], []
    in_a_row = 0
    for i, n in enumerate(norms):
        loss = None if losses is None else losses[i]
        skip = not math.isfinite(n)
        recent = norm_window[-window:]
        if len(recent) >= window // 2 and n - np.mean(recent) > factor * np.std(recent, ddof=1):
            skip = True
        if loss is not None:
            recent = loss_window[-window:]
            spike = len(recent) >= window // 2 and (
                loss - np.mean(recent) > factor * np.std(recent, ddof=1)
            )
            skip = skip or not math.isfinite(loss) or spike
            if math.isfinite(loss):
                loss_window.append(loss)
        if math.isfinite(n):
            norm_window.append(n)
        if skip and max_consecutive_skips is not None and in_a_row >= max_consecutive_skips:
            skip = False  # as optax.apply_if_finite: past the limit the step is taken
        in_a_row = in_a_row + 1 if skip else 0
        out.append(skip)
    return out


def agc(grad, weight, clipping, eps=1e-3, axis=None):
    """NFNets' unit-wise rule on one array, in float64."""
    g = np.asarray(grad, np.float64)
    w = np.asarray(weight, np.float64)
    if axis is None:
        axis = None if g.ndim <= 1 else (0,) if g.ndim == 2 else (0, 1, 2)
    keep = axis is not None
    g_norm = np.sqrt(np.sum(g**2, axis=axis, keepdims=keep))
    w_norm = np.maximum(np.sqrt(np.sum(w**2, axis=axis, keepdims=keep)), eps)
    limit = clipping * w_norm
    return np.where(g_norm > limit, g * limit / np.maximum(g_norm, 1e-6), g)


def spiky_norms(steps, seed=0, spike_every=17, spike_size=30.0):
    """A stream of norms around 1 with regular large spikes."""
    rng = np.random.default_rng(seed)
    norms = np.exp(rng.normal(0.0, 0.2, steps))
    norms[spike_every::spike_every] *= spike_size
    return norms


def agc_unit_axes(shape):
    """The axes one AGC unit spans, transcribed from ``jaxclip.agc``'s documentation.

    A leaf that squeezes to a vector or a scalar is one unit (None); rank 2 and
    rank 3 reduce axis 0; rank 4 and up reduce every axis but the last.
    """
    if sum(n != 1 for n in shape) <= 1:
        return None
    if len(shape) in (2, 3):
        return (0,)
    return tuple(range(len(shape) - 1))


def unit_norms(array, axis):
    """The L2 norm of each unit of ``array`` (kept dims), or of the whole array (a scalar)."""
    a = np.asarray(array, np.float64)
    if axis is None:
        return np.sqrt(np.sum(a * a))
    return np.sqrt(np.sum(a * a, axis=axis, keepdims=True))


def clip_by_norm(arrays, max_norm, axis=None):
    """Keras ``clipnorm`` per leaf, or per slice along ``axis``: (outputs, unit norms)."""
    outs, norms = [], []
    for a in arrays:
        a = np.asarray(a, np.float64)
        n = unit_norms(a, axis)
        scale = np.where(n > max_norm, max_norm / np.where(n > 0, n, 1.0), 1.0)
        outs.append(a * scale)
        norms.append(np.asarray(n))
    return outs, norms


def per_example_clip(arrays, clip_norm):
    """DP-SGD's clip: leaves with a leading batch axis; each example's global L2 norm
    clipped to ``clip_norm``. Returns (the clipped sums per leaf, the per-example
    norms, the per-example scales)."""
    arrays = [np.asarray(a, np.float64) for a in arrays]
    batch = arrays[0].shape[0]
    norms = np.sqrt(sum(np.sum(a.reshape(batch, -1) ** 2, axis=1) for a in arrays))
    scales = np.where(norms > clip_norm, clip_norm / np.where(norms > 0, norms, 1.0), 1.0)
    sums = [np.tensordot(scales, a, axes=(0, 0)) for a in arrays]
    return sums, norms, scales
