"""``max_consecutive_skips`` of the norm clippers' ``nonfinite="skip"`` policy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxclip

PARAMS = {"w": jnp.ones((3, 2)), "b": jnp.ones((2,))}

CLIPPERS = {
    "clip_by_global_norm": lambda **kw: jaxclip.clip_by_global_norm(1.0, **kw),
    "clip_by_norm": lambda **kw: jaxclip.clip_by_norm(1.0, **kw),
    "agc": lambda **kw: jaxclip.agc(0.1, **kw),
    "autoclip": lambda **kw: jaxclip.autoclip(**kw),
    "zclip": lambda **kw: jaxclip.zclip(warmup_steps=2, **kw),
    "quantile_clip": lambda **kw: jaxclip.quantile_clip(**kw),
    "adagc": lambda **kw: jaxclip.adagc(warmup_steps=2, **kw),
}


def _grads(value: float) -> dict:
    """A gradient whose elements are ``value`` scaled per leaf (NaN when value is NaN)."""
    return {"w": jnp.full((3, 2), value), "b": jnp.full((2,), 2 * value)}


def _expected_pattern(finite: list[bool], limit: int) -> tuple[list[str], int]:
    """Each step's fate under the rule: skip up to ``limit`` in a row, then take one."""
    fates, run, forced = [], 0, 0
    for ok in finite:
        if ok:
            fates.append("finite")
            run = 0
        elif run >= limit:
            fates.append("forced")
            run, forced = 0, forced + 1
        else:
            fates.append("skipped")
            run += 1
    return fates, forced


@pytest.mark.parametrize("name", sorted(CLIPPERS))
def test_limit_takes_the_step_after_that_many_skips(name):
    tx = CLIPPERS[name](nonfinite="skip", max_consecutive_skips=2)
    values = [1.0, 0.5, np.nan, np.nan, np.nan, np.nan, 2.0, np.nan, 0.7]
    fates, forced = _expected_pattern([np.isfinite(v) for v in values], 2)
    assert fates.count("forced") == 1  # the sequence exercises every fate
    update = jax.jit(tx.update)
    state = tx.init(PARAMS)
    for value, fate in zip(values, fates):
        out, state = update(_grads(value), state, PARAMS)
        leaves = np.concatenate([np.ravel(x) for x in jax.tree.leaves(out)])
        if fate == "skipped":
            np.testing.assert_array_equal(leaves, 0.0)
        elif fate == "forced":
            assert np.all(np.isnan(leaves)), "a forced step is applied as it is"
        else:
            assert np.all(np.isfinite(leaves)) and np.any(leaves != 0)
    stats = jaxclip.get_stats(state)
    assert float(stats.extra["forced_steps"]) == forced
    assert float(stats.extra["consecutive_skips"]) == 0.0
    assert int(stats.nonfinite_steps) == sum(not np.isfinite(v) for v in values)


@pytest.mark.parametrize("name", ["zclip", "adagc", "autoclip"])
def test_skipped_and_forced_steps_leave_the_rule_as_it_was(name):
    """The rule sees only the finite steps: the same outputs as without the broken ones."""
    limited = CLIPPERS[name](nonfinite="skip", max_consecutive_skips=1)
    plain = CLIPPERS[name]()
    finite_values = [1.0, 0.9, 1.1, 5.0, 1.0]
    broken = [1.0, 0.9, np.nan, np.nan, 1.1, 5.0, np.nan, 1.0]
    s_plain, s_limited = plain.init(PARAMS), limited.init(PARAMS)
    expected = []
    for v in finite_values:
        out, s_plain = plain.update(_grads(v), s_plain, PARAMS)
        expected.append(out)
    got = []
    for v in broken:
        out, s_limited = limited.update(_grads(v), s_limited, PARAMS)
        if np.isfinite(v):
            got.append(out)
    for a, b in zip(expected, got):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), a, b)
    assert float(jaxclip.get_stats(s_limited).extra["forced_steps"]) == 1.0


def test_without_a_limit_skips_go_on():
    tx = jaxclip.clip_by_global_norm(1.0, nonfinite="skip")
    state = tx.init(None)
    for _ in range(5):
        out, state = tx.update(_grads(np.nan), state)
        np.testing.assert_array_equal(out["w"], 0.0)
    assert "forced_steps" not in jaxclip.get_stats(state).extra


@pytest.mark.parametrize("name", sorted(CLIPPERS))
def test_limit_needs_the_skip_policy(name):
    with pytest.raises(ValueError, match="max_consecutive_skips applies to nonfinite='skip'"):
        CLIPPERS[name](nonfinite="propagate", max_consecutive_skips=3)
    with pytest.raises(ValueError, match="max_consecutive_skips must be >= 0, got -1"):
        CLIPPERS[name](nonfinite="skip", max_consecutive_skips=-1)
