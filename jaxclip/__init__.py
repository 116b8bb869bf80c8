"""jaxclip: gradient clipping for JAX and Optax.

Every clipper is an ``optax.GradientTransformation`` that chains before any optimizer
(``optax.chain(jaxclip.clip_by_global_norm(1.0), optax.adamw(1e-3))``), runs under
``jax.jit``, keeps all its state in fixed-shape arrays and records what it did in a
:class:`ClipStats` (``jaxclip.get_stats(opt_state).norm`` is the pre-clip global norm).
"""

from jaxclip._clip import AdaptiveClipState
from jaxclip._rules import AutoClipState, QuantileState, ZClipState
from jaxclip._stats import ClipStats, get_stats, stats_dict
from jaxclip.adaptive import AdaGCState, adagc, autoclip, quantile_clip, zclip
from jaxclip.agc import agc
from jaxclip.diagnostics import GradReport, diagnose
from jaxclip.fixed import clip_by_global_norm, clip_by_norm, clip_by_value, clip_tree
from jaxclip.ghost import ghost_clipped_sum, per_example_norms
from jaxclip.guards import SkipOnSpikeState, skip_on_spike
from jaxclip.norms import global_norm, leaf_norms
from jaxclip.optimizer_aware import SpikeAwareState, StableUpdateState, spike_aware, stable_update
from jaxclip.per_example import (
    ClippedSum,
    PerExampleClipState,
    clip_and_sum,
    clipped_gradient_sum,
    per_example_clip,
    per_example_clip_norm,
)

__version__ = "0.1.0"

__all__ = [
    "AdaGCState",
    "AdaptiveClipState",
    "AutoClipState",
    "ClipStats",
    "ClippedSum",
    "GradReport",
    "PerExampleClipState",
    "QuantileState",
    "SkipOnSpikeState",
    "SpikeAwareState",
    "StableUpdateState",
    "ZClipState",
    "adagc",
    "agc",
    "autoclip",
    "clip_and_sum",
    "clip_by_global_norm",
    "clip_by_norm",
    "clip_by_value",
    "clip_tree",
    "clipped_gradient_sum",
    "diagnose",
    "get_stats",
    "ghost_clipped_sum",
    "global_norm",
    "leaf_norms",
    "per_example_clip",
    "per_example_clip_norm",
    "per_example_norms",
    "quantile_clip",
    "skip_on_spike",
    "spike_aware",
    "stable_update",
    "stats_dict",
    "zclip",
]
