"""The fixed-threshold clippers, with and without jit (chex variants)."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _helpers import float64_enabled, np_clip_global, np_norm

import jaxclip


def _tree(seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.normal(size=(4, 3)) * scale, jnp.float32),
        "b": jnp.asarray(rng.normal(size=(3,)) * scale, jnp.float32),
    }


class ClipByGlobalNormTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_six_eight_becomes_three_four(self):
        tx = jaxclip.clip_by_global_norm(5.0)
        updates, state = self.variant(tx.update)(jnp.array([6.0, 8.0]), tx.init(None))
        np.testing.assert_array_equal(updates, [3.0, 4.0])
        assert float(state.norm) == 10.0
        assert float(state.scale) == 0.5
        assert bool(state.clipped)

    @chex.variants(with_jit=True, without_jit=True)
    def test_below_threshold_is_unchanged_bit_for_bit(self):
        tx = jaxclip.clip_by_global_norm(100.0)
        grads = _tree(1)
        updates, state = self.variant(tx.update)(grads, tx.init(None))
        chex.assert_trees_all_equal(updates, grads)
        assert not bool(state.clipped)
        assert float(state.scale) == 1.0

    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_numpy_rule_for_each_order(self):
        grads = _tree(2, scale=3.0)
        for p in (1, 2, 3, math.inf):
            tx = jaxclip.clip_by_global_norm(1.5, ord=p)
            updates, state = self.variant(tx.update)(grads, tx.init(None))
            expected, norm, _ = np_clip_global(jax.tree.leaves(grads), 1.5, p)
            for got, want in zip(jax.tree.leaves(updates), expected):
                np.testing.assert_allclose(got, want, rtol=2e-6)
            assert float(state.norm) == pytest.approx(norm, rel=2e-6)
            assert np_norm(jax.tree.leaves(updates), p) == pytest.approx(1.5, rel=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_pytorch_formula_with_eps(self):
        tx = jaxclip.clip_by_global_norm(1.0, eps=1e-6)
        updates, _ = self.variant(tx.update)([jnp.array([3.0]), jnp.array([4.0])], tx.init(None))
        # PyTorch's published float32 results for this case
        assert np.float32(updates[0][0]) == np.float32(0.5999999046325684)
        assert np.float32(updates[1][0]) == np.float32(0.7999998331069946)
        # eps dominates for tiny norms, as in PyTorch
        tx = jaxclip.clip_by_global_norm(1e-8, eps=1e-6)
        updates, _ = self.variant(tx.update)(jnp.array([1e-7]), tx.init(None))
        assert float(updates[0]) == pytest.approx(1e-7 * 1e-8 / (1e-7 + 1e-6), rel=1e-6)
        # and a norm equal to the threshold is still scaled, by n / (n + eps)
        tx = jaxclip.clip_by_global_norm(5.0, eps=1e-6)
        updates, state = self.variant(tx.update)(jnp.array([3.0, 4.0]), tx.init(None))
        assert bool(state.clipped)
        assert float(updates[0]) < 3.0

    @chex.variants(with_jit=True, without_jit=True)
    def test_min_norm_scales_small_gradients_up_and_leaves_zero(self):
        tx = jaxclip.clip_by_global_norm(10.0, min_norm=1.0)
        updates, state = self.variant(tx.update)(jnp.array([0.03, 0.04]), tx.init(None))
        np.testing.assert_allclose(updates, [0.6, 0.8], rtol=1e-6)
        assert float(state.scale) == pytest.approx(20.0)
        updates, state = self.variant(tx.update)(jnp.zeros(2), state)
        np.testing.assert_array_equal(updates, [0.0, 0.0])
        assert float(state.scale) == 1.0
        updates, _ = self.variant(tx.update)(jnp.array([60.0, 80.0]), state)
        np.testing.assert_allclose(updates, [6.0, 8.0], rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_max_norm_zero_zeroes_without_nan(self):
        tx = jaxclip.clip_by_global_norm(0.0)
        updates, _ = self.variant(tx.update)(jnp.array([1.0, -2.0]), tx.init(None))
        np.testing.assert_array_equal(updates, [0.0, 0.0])
        updates, state = self.variant(tx.update)(jnp.zeros(2), tx.init(None))
        np.testing.assert_array_equal(updates, [0.0, 0.0])
        assert float(state.scale) == 1.0

    @chex.variants(with_jit=True, without_jit=True)
    def test_float16_gradients_are_clipped_not_zeroed(self):
        grads = {"a": jnp.array([300.0], jnp.float16), "b": jnp.array([400.0], jnp.float16)}
        tx = jaxclip.clip_by_global_norm(1000.0)
        updates, state = self.variant(tx.update)(grads, tx.init(None))
        chex.assert_trees_all_equal(updates, grads)  # Optax returns zeros here
        assert float(state.norm) == 500.0
        tx = jaxclip.clip_by_global_norm(5.0)
        updates, _ = self.variant(tx.update)(grads, tx.init(None))
        assert updates["a"].dtype == jnp.float16
        np.testing.assert_allclose(updates["a"], [3.0], rtol=1e-3)
        np.testing.assert_allclose(updates["b"], [4.0], rtol=1e-3)

    @chex.variants(with_jit=True, without_jit=True)
    def test_huge_float32_gradients_are_clipped_not_zeroed(self):
        grads = {"a": jnp.array([6e20], jnp.float32), "b": jnp.array([8e20], jnp.float32)}
        tx = jaxclip.clip_by_global_norm(5.0)
        updates, state = self.variant(tx.update)(grads, tx.init(None))
        np.testing.assert_allclose(updates["a"], [3.0], rtol=1e-6)
        np.testing.assert_allclose(updates["b"], [4.0], rtol=1e-6)
        assert bool(state.finite)
        assert float(state.norm) == pytest.approx(1e21, rel=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_mixed_dtype_tree_keeps_each_dtype(self):
        grads = {
            "h": jnp.array([30.0, 40.0], jnp.float16),
            "b": jnp.array([0.0, 50.0], jnp.bfloat16),
            "f": jnp.array([0.0], jnp.float32),
            "none": None,
        }
        for max_norm in (5.0, jnp.float32(5.0), jnp.asarray(5.0, jnp.bfloat16)):
            tx = jaxclip.clip_by_global_norm(max_norm)
            updates, state = self.variant(tx.update)(grads, tx.init(None))
            assert updates["none"] is None
            for k in ("h", "b", "f"):
                assert updates[k].dtype == grads[k].dtype
            norm = math.sqrt(30.0**2 + 40.0**2 + 50.0**2)
            assert float(state.norm) == pytest.approx(norm, rel=1e-6)
            s = 5.0 / norm
            np.testing.assert_allclose(
                np.asarray(updates["h"], np.float32), [30 * s, 40 * s], rtol=1e-3
            )
            np.testing.assert_allclose(np.asarray(updates["b"], np.float32), [0, 50 * s], rtol=1e-2)

    def test_float64_leaves(self):
        with float64_enabled():
            grads = {
                "a": jnp.array([6e200, 8e200], jnp.float64),
                "b": jnp.array([0.0], jnp.float32),
            }
            tx = jaxclip.clip_by_global_norm(5.0)
            state = tx.init(grads)
            assert state.norm.dtype == jnp.float64
            updates, state = jax.jit(tx.update)(grads, state)
            assert updates["a"].dtype == jnp.float64
            np.testing.assert_allclose(updates["a"], [3.0, 4.0], rtol=1e-12)
            assert float(state.norm) == pytest.approx(1e201, rel=1e-12)

    @chex.variants(with_jit=True, without_jit=True)
    def test_empty_tree_and_none_leaves(self):
        tx = jaxclip.clip_by_global_norm(1.0)
        updates, state = self.variant(tx.update)({}, tx.init({}))
        assert updates == {}
        assert float(state.norm) == 0.0
        updates, _ = self.variant(tx.update)({"a": None}, tx.init(None))
        assert updates == {"a": None}

    @chex.variants(with_jit=True, without_jit=True)
    def test_schedule_threshold(self):
        tx = jaxclip.clip_by_global_norm(lambda step: 1.0 + step)
        state = tx.init(None)
        update = self.variant(tx.update)
        thresholds = []
        for _ in range(3):
            _, state = update(jnp.array([30.0, 40.0]), state)
            thresholds.append(float(state.threshold))
        assert thresholds == [1.0, 2.0, 3.0]

    def test_counters_accumulate(self):
        tx = jaxclip.clip_by_global_norm(1.0)
        state = tx.init(None)
        update = jax.jit(tx.update)
        for g in ([0.1], [5.0], [jnp.nan], [0.5], [3.0]):
            _, state = update(jnp.array(g), state)
        assert int(state.step) == 5
        assert int(state.clipped_steps) == 2
        assert int(state.nonfinite_steps) == 1


class InjectHyperparamsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_as_written(self):
        tx = optax.inject_hyperparams(jaxclip.clip_by_global_norm)(max_norm=2.0)
        params = {"w": jnp.ones(3, jnp.bfloat16), "v": jnp.ones(2, jnp.float32)}
        state = tx.init(params)
        grads = {"w": jnp.full(3, 3.0, jnp.bfloat16), "v": jnp.full(2, 4.0)}
        updates, state = self.variant(tx.update)(grads, state, params)
        norm = math.sqrt(3 * 9 + 2 * 16)
        assert float(jaxclip.get_stats(state).norm) == pytest.approx(norm, rel=1e-6)
        assert updates["w"].dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(updates["v"]), [4 * 2 / norm] * 2, rtol=1e-6)
        # change the injected value between steps
        state.hyperparams["max_norm"] = jnp.asarray(100.0)
        updates, state = self.variant(tx.update)(grads, state, params)
        np.testing.assert_array_equal(updates["v"], grads["v"])

    @chex.variants(with_jit=True, without_jit=True)
    def test_schedule(self):
        schedule = optax.linear_schedule(1.0, 3.0, transition_steps=2)
        tx = optax.inject_hyperparams(jaxclip.clip_by_global_norm)(max_norm=schedule)
        state = tx.init({"w": jnp.ones(2)})
        seen = []
        for _ in range(3):
            updates, state = self.variant(tx.update)({"w": jnp.array([30.0, 40.0])}, state)
            seen.append(float(jaxclip.global_norm(updates)))
        np.testing.assert_allclose(seen, [1.0, 2.0, 3.0], rtol=1e-6)

    def test_every_option_injected(self):
        tx = optax.inject_hyperparams(jaxclip.clip_by_global_norm)(
            max_norm=2.0, eps=1e-6, min_norm=0.5, nonfinite="skip"
        )
        state = tx.init({"w": jnp.ones(2)})
        updates, state = jax.jit(tx.update)({"w": jnp.array([0.03, 0.04])}, state)
        np.testing.assert_allclose(updates["w"], [0.3, 0.4], rtol=1e-5)
        updates, state = jax.jit(tx.update)({"w": jnp.array([jnp.nan, 1.0])}, state)
        np.testing.assert_array_equal(updates["w"], [0.0, 0.0])

    def test_injected_order_needs_static_args(self):
        tx = optax.inject_hyperparams(jaxclip.clip_by_global_norm)(max_norm=1.0, ord=1)
        state = tx.init({"w": jnp.ones(2)})
        with pytest.raises(ValueError, match="static_args=\\('ord',\\)"):
            jax.jit(tx.update)({"w": jnp.ones(2)}, state)
        tx = optax.inject_hyperparams(jaxclip.clip_by_global_norm, static_args=("ord",))(
            max_norm=1.0, ord=1
        )
        state = tx.init({"w": jnp.ones(2)})
        updates, _ = jax.jit(tx.update)({"w": jnp.array([3.0, 1.0])}, state)
        np.testing.assert_allclose(updates["w"], [0.75, 0.25], rtol=1e-6)


class NonFiniteTest(chex.TestCase):
    def _grads(self, bad):
        return {"a": jnp.array([1.0, bad]), "b": jnp.array([2.0, 3.0], jnp.bfloat16)}

    @chex.variants(with_jit=True, without_jit=True)
    def test_propagate_matches_optax(self):
        for bad in (jnp.nan, jnp.inf):
            grads = self._grads(bad)
            tx = jaxclip.clip_by_global_norm(1.0, nonfinite="propagate")
            updates, state = self.variant(tx.update)(grads, tx.init(None))
            ref, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
            for got, want in zip(jax.tree.leaves(updates), jax.tree.leaves(ref)):
                np.testing.assert_array_equal(
                    np.asarray(got, np.float32), np.asarray(want, np.float32)
                )
            assert not bool(state.finite)
            assert not bool(state.clipped)
            assert int(state.nonfinite_steps) == 1

    @chex.variants(with_jit=True, without_jit=True)
    def test_skip_returns_zeros(self):
        tx = jaxclip.clip_by_global_norm(1.0, nonfinite="skip")
        for bad in (jnp.nan, jnp.inf, -jnp.inf):
            updates, state = self.variant(tx.update)(self._grads(bad), tx.init(None))
            for leaf in jax.tree.leaves(updates):
                np.testing.assert_array_equal(np.asarray(leaf, np.float32), 0.0)
            assert float(state.scale) == 0.0
            assert not bool(state.finite)
        updates, state = self.variant(tx.update)(self._grads(4.0), tx.init(None))
        assert bool(state.finite)
        assert float(jaxclip.global_norm(updates)) == pytest.approx(1.0, rel=1e-2)

    @chex.variants(with_jit=True, without_jit=True)
    def test_zero_clips_the_finite_rest(self):
        tx = jaxclip.clip_by_global_norm(1.0, nonfinite="zero")
        for bad in (jnp.nan, jnp.inf):
            grads = self._grads(bad)
            updates, state = self.variant(tx.update)(grads, tx.init(None))
            np.testing.assert_allclose(float(state.norm), math.sqrt(14.0), rtol=1e-6)
            s = 1.0 / math.sqrt(14.0)
            np.testing.assert_allclose(updates["a"], [s, 0.0], rtol=1e-6)
            np.testing.assert_allclose(
                np.asarray(updates["b"], np.float32), [2 * s, 3 * s], rtol=1e-2
            )
            assert not bool(state.finite)

    def test_error_names_the_leaf_eagerly_and_under_jit(self):
        tx = jaxclip.clip_by_global_norm(1.0, nonfinite="error")
        grads = {
            "layer": {"w": jnp.array([1.0, jnp.nan]), "b": jnp.array([jnp.inf])},
            "ok": jnp.ones(2),
        }
        with pytest.raises(
            FloatingPointError, match=r"\['layer'\]\['b'\] has inf.*\['layer'\]\['w'\] has NaN"
        ):
            tx.update(grads, tx.init(None))
        with pytest.raises(Exception, match=r"\['layer'\]\['w'\] has NaN"):
            updates, _ = jax.jit(tx.update)(grads, tx.init(None))
            jax.block_until_ready(updates)
        # a finite step passes
        updates, _ = jax.jit(tx.update)({"ok": jnp.array([3.0, 4.0])}, tx.init(None))
        np.testing.assert_allclose(updates["ok"], [0.6, 0.8], rtol=1e-6)


class ValidationTest(chex.TestCase):
    def test_bad_hyperparameters(self):
        cases = [
            (dict(max_norm=-1.0), "max_norm must be >= 0.0, got -1.0"),
            (dict(max_norm=float("nan")), "max_norm must not be NaN"),
            (dict(max_norm=1.0, min_norm=float("inf")), "min_norm must be finite"),
            (dict(max_norm=-float("inf")), "max_norm must be finite"),
            (dict(max_norm=jnp.array([1.0, 2.0])), "max_norm must be a scalar"),
            (dict(max_norm=2.0, min_norm=3.0), r"min_norm \(3.0\) must be <= max_norm \(2.0\)"),
            (dict(max_norm=2.0, min_norm=-1.0), "min_norm must be >= 0.0"),
            (dict(max_norm=1.0, eps=-1e-6), "eps must be >= 0.0"),
            (dict(max_norm=1.0, ord=0.5), "ord must be 1, 2, inf"),
            (dict(max_norm=1.0, ord="fro"), "ord must be 1, 2, inf"),
            (dict(max_norm=1.0, nonfinite="ignore"), "nonfinite must be one of"),
        ]
        for kwargs, message in cases:
            with self.assertRaisesRegex(ValueError, message):
                jaxclip.clip_by_global_norm(**kwargs)
        with self.assertRaisesRegex(ValueError, "max_norm must be >= 0.0, got -1.0"):
            jaxclip.clip_by_global_norm(jnp.float32(-1.0))
        with self.assertRaisesRegex(TypeError, "max_norm must be a real number"):
            jaxclip.clip_by_global_norm("1.0")

    def test_integer_and_bool_leaves_name_their_path(self):
        tx = jaxclip.clip_by_global_norm(1.0)
        for bad in (jnp.array([1, 2]), jnp.array([True])):
            with self.assertRaisesRegex(TypeError, r"leaf \['params'\]\['count'\] has dtype"):
                tx.update({"params": {"w": jnp.ones(2), "count": bad}}, tx.init(None))

    def test_float0_leaves_pass_through(self):
        grads = jax.grad(lambda p: p["w"].sum() * 5.0, allow_int=True)(
            {"w": jnp.ones(2), "step": jnp.array(3)}
        )
        tx = jaxclip.clip_by_global_norm(1.0)
        updates, state = jax.jit(tx.update)(grads, tx.init(None))
        assert updates["step"].dtype == jax.dtypes.float0
        assert float(state.norm) == pytest.approx(math.sqrt(50.0))


class ClipByNormTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_each_leaf_on_its_own(self):
        grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.5]), "c": jnp.array([[6.0], [8.0]])}
        tx = jaxclip.clip_by_norm(1.0)
        updates, state = self.variant(tx.update)(grads, tx.init(None))
        np.testing.assert_allclose(updates["a"], [0.6, 0.8], rtol=1e-6)
        np.testing.assert_array_equal(updates["b"], [0.5])
        np.testing.assert_allclose(updates["c"], [[0.6], [0.8]], rtol=1e-6)
        assert float(state.norm) == pytest.approx(math.sqrt(25 + 0.25 + 100))
        assert float(state.extra["max_unit_norm"]) == 10.0
        after = math.sqrt(1 + 0.25 + 1)
        assert float(state.scale) == pytest.approx(after / math.sqrt(125.25))
        assert float(state.extra["clipped_fraction"]) == pytest.approx(2 / 3)

    @chex.variants(with_jit=True, without_jit=True)
    def test_along_axes_like_tf_clip_by_norm(self):
        rng = np.random.default_rng(0)
        kernel = jnp.asarray(rng.normal(size=(5, 4)) * 2, jnp.float32)
        tx = jaxclip.clip_by_norm(1.5, axis=0)
        updates, state = self.variant(tx.update)({"k": kernel}, tx.init(None))
        k = np.asarray(kernel, np.float64)
        norms = np.sqrt((k**2).sum(axis=0, keepdims=True))
        expected = k * 1.5 / np.maximum(norms, 1.5)  # tf.clip_by_norm's formula
        np.testing.assert_allclose(updates["k"], expected, rtol=2e-6)
        assert float(state.norm) == pytest.approx(np_norm([k]), rel=1e-6)
        assert float(state.extra["max_unit_norm"]) == pytest.approx(norms.max(), rel=1e-6)
        assert float(state.scale) == pytest.approx(np_norm([expected]) / np_norm([k]), rel=1e-6)
        frac = float(np.mean(norms > 1.5))
        assert float(state.extra["clipped_fraction"]) == pytest.approx(frac)

    @chex.variants(with_jit=True, without_jit=True)
    def test_unit_edge_cases(self):
        # columns: zero, below, exactly at, above the threshold, an infinite and a NaN entry
        kernel = jnp.array(
            [[0.0, 0.3, 3.0, 6.0, jnp.inf, jnp.nan], [0.0, 0.4, 4.0, 8.0, 1.0, 1.0]], jnp.float32
        )
        k = np.asarray(kernel, np.float64)
        norms = np.sqrt((k**2).sum(axis=0))
        for threshold in (0.0, 5.0, 1e30):
            tx = jaxclip.clip_by_norm(threshold, axis=0)
            updates, _ = self.variant(tx.update)(kernel, tx.init(None))
            with np.errstate(invalid="ignore", divide="ignore"):
                # NaN > t is False, so a NaN column keeps its NaN; inf > t scales by 0
                scale = np.where(norms > threshold, threshold / norms, 1.0)
                scale = np.where(np.isnan(norms), np.nan, scale)
                want = k * scale
            np.testing.assert_allclose(updates, want, rtol=1e-6, err_msg=f"{threshold=}")

    @chex.variants(with_jit=True, without_jit=True)
    def test_conv_units_and_other_orders(self):
        rng = np.random.default_rng(1)
        conv = jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)
        for p in (1, 3, math.inf):
            tx = jaxclip.clip_by_norm(1.0, ord=p, axis=(0, 1, 2))
            updates, _ = self.variant(tx.update)(conv, tx.init(None))
            for j in range(4):
                n = np_norm([conv[..., j]], p)
                want = np.asarray(conv[..., j], np.float64) * min(1.0, 1.0 / n)
                np.testing.assert_allclose(updates[..., j], want, rtol=2e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_nonfinite_policies(self):
        grads = {"a": jnp.array([3.0, jnp.nan]), "b": jnp.array([6.0, 8.0])}
        tx = jaxclip.clip_by_norm(5.0)
        updates, state = self.variant(tx.update)(grads, tx.init(None))
        assert bool(jnp.all(jnp.isnan(updates["a"])))
        np.testing.assert_allclose(updates["b"], [3.0, 4.0])
        assert not bool(state.finite)
        tx = jaxclip.clip_by_norm(5.0, nonfinite="skip")
        updates, _ = self.variant(tx.update)(grads, tx.init(None))
        assert float(jnp.abs(updates["a"]).sum() + jnp.abs(updates["b"]).sum()) == 0.0
        tx = jaxclip.clip_by_norm(1.0, nonfinite="zero")
        updates, _ = self.variant(tx.update)(grads, tx.init(None))
        np.testing.assert_allclose(updates["a"], [1.0, 0.0])
        np.testing.assert_allclose(updates["b"], [0.6, 0.8], rtol=1e-6)

    def test_bad_arguments(self):
        with pytest.raises(ValueError, match=r"max_norm must be >= 0\.0"):
            jaxclip.clip_by_norm(-1.0)
        with pytest.raises(ValueError, match="axis must be an int"):
            jaxclip.clip_by_norm(1.0, axis="rows")
        with pytest.raises(ValueError, match="axis has repeated entries"):
            jaxclip.clip_by_norm(1.0, axis=(0, 0))
        tx = jaxclip.clip_by_norm(1.0, axis=1)
        with pytest.raises(ValueError, match=r"\['bias'\]"):
            tx.update({"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}, tx.init(None))


class ClipByValueTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_symmetric_and_asymmetric(self):
        g = jnp.array([-3.0, -0.2, 0.3, 7.0])
        tx = jaxclip.clip_by_value(0.5)
        updates, state = self.variant(tx.update)(g, tx.init(None))
        np.testing.assert_allclose(updates, [-0.5, -0.2, 0.3, 0.5])
        assert float(state.extra["clipped_fraction"]) == 0.5
        assert float(state.norm) == pytest.approx(np_norm([g]))
        assert float(state.scale) == pytest.approx(np_norm([updates]) / np_norm([g]), rel=1e-6)
        assert float(state.threshold) == 0.5
        tx = jaxclip.clip_by_value(2.0, min_value=-1.0)
        updates, state = self.variant(tx.update)(g, tx.init(None))
        np.testing.assert_allclose(updates, [-1.0, -0.2, 0.3, 2.0])
        assert bool(state.clipped)

    @chex.variants(with_jit=True, without_jit=True)
    def test_pytree_bounds(self):
        grads = {
            "w": jnp.array([[5.0, -5.0], [0.1, 2.0]]),
            "b": jnp.array([-9.0, 9.0], jnp.bfloat16),
        }
        hi = {"w": jnp.array([1.0, 3.0]), "b": 2.0}
        lo = {"w": -1.0, "b": jnp.array([-4.0, 0.0])}
        tx = jaxclip.clip_by_value(hi, min_value=lo)
        updates, _ = self.variant(tx.update)(grads, tx.init(None))
        np.testing.assert_allclose(updates["w"], [[1.0, -1.0], [0.1, 2.0]])
        np.testing.assert_allclose(np.asarray(updates["b"], np.float32), [-4.0, 2.0])
        assert updates["b"].dtype == jnp.bfloat16

    @chex.variants(with_jit=True, without_jit=True)
    def test_one_sided_and_nonfinite(self):
        tx = jaxclip.clip_by_value(jnp.inf, min_value=-1.0)
        g = jnp.array([-jnp.inf, -3.0, 1e30, jnp.nan])
        updates, state = self.variant(tx.update)(g, tx.init(None))
        np.testing.assert_array_equal(updates[:3], np.float32([-1.0, -1.0, 1e30]))
        assert bool(jnp.isnan(updates[3]))
        assert not bool(state.finite)

    @chex.variants(with_jit=True, without_jit=True)
    def test_full_statistics_match_a_numpy_rule(self):
        # 20 small leaves of one shape (stacked in the rescue alone); NaN elements
        # are never counted as clipped; a bound of 1e-30 underflows the sum of squares
        # of the clipped tree in float32, so its norm comes from the rescue. Bounds
        # are rounded to each leaf's dtype, in the statistics as in the clip.
        rng = np.random.default_rng(5)
        grads = {f"l{i:02d}": jnp.asarray(rng.normal(size=(3,)), jnp.float32) for i in range(20)}
        grads["w"] = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32).at[1, 2].set(jnp.nan)
        # 0.702 rounds up to 0.703125 in bfloat16: that element of "h" is inside its bound
        grads["h"] = jnp.asarray(rng.normal(size=(9,)) * 3, jnp.bfloat16).at[0].set(0.703125)
        for hi, lo in [(0.7, None), (0.7, -0.1), (0.702, None), (1e-30, None)]:
            tx = jaxclip.clip_by_value(hi, min_value=lo)
            updates, state = self.variant(tx.update)(grads, tx.init(None))
            size, changed, after_sq = 0, 0, 0.0
            for k, g in grads.items():
                x = np.asarray(g, np.float64)
                h = float(np.asarray(jnp.asarray(hi, g.dtype), np.float64))
                lo_ = -h if lo is None else float(np.asarray(jnp.asarray(lo, g.dtype), np.float64))
                c = np.clip(x, lo_, h)
                np.testing.assert_array_equal(np.asarray(updates[k], np.float64), c)
                size += x.size
                changed += int(((x > h) | (x < lo_)).sum())
                after_sq += float(np.nansum(c**2))
            assert float(state.extra["clipped_fraction"]) == pytest.approx(changed / size)
            assert bool(state.clipped)
            # the NaN makes the pre-clip norm NaN, so compare the post-clip norm
            # through a copy of the tree without it
            clean = dict(grads, w=grads["w"].at[1, 2].set(0.0))
            _, clean_state = self.variant(tx.update)(clean, tx.init(None))
            after = float(clean_state.scale) * float(clean_state.norm)
            assert after == pytest.approx(np.sqrt(after_sq), rel=1e-5, abs=0)
            assert np.isnan(float(state.norm))

    @chex.variants(with_jit=True, without_jit=True)
    def test_light_statistics_match_a_numpy_rule(self):
        rng = np.random.default_rng(3)
        grads = {
            "w": jnp.asarray(rng.normal(size=(5, 4)) * 2, jnp.float32),
            "b": jnp.asarray(rng.normal(size=(7,)), jnp.bfloat16),
        }
        leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(grads)]
        for hi, lo in [(1.5, None), (1.5, -0.4), (50.0, None), (50.0, -40.0)]:
            tx = jaxclip.clip_by_value(hi, min_value=lo, statistics="light")
            updates, state = self.variant(tx.update)(grads, tx.init(None))
            full_tx = jaxclip.clip_by_value(hi, min_value=lo)
            full, _ = full_tx.update(grads, full_tx.init(None))
            chex.assert_trees_all_equal(updates, full)  # the clip does not depend on the mode
            lo_ = -hi if lo is None else lo
            before = max(np.abs(x).max() for x in leaves)
            after = max(np.abs(np.clip(x, lo_, hi)).max() for x in leaves)
            outside = any(((x > hi) | (x < lo_)).any() for x in leaves)
            assert float(state.extra["max_abs"]) == pytest.approx(before, rel=1e-7)
            assert float(state.scale) == pytest.approx(after / before, rel=1e-6)
            assert bool(state.clipped) == outside
            assert int(state.clipped_steps) == int(outside)
            assert float(state.norm) == pytest.approx(np_norm(leaves), rel=1e-6)
            assert "clipped_fraction" not in state.extra

    @chex.variants(with_jit=True, without_jit=True)
    def test_light_statistics_with_pytree_and_per_element_bounds(self):
        # 20 small leaves of one shape; "v" has per-element bounds.
        rng = np.random.default_rng(4)
        grads = {f"l{i:02d}": jnp.asarray(rng.normal(size=(3,)), jnp.float32) for i in range(20)}
        grads["v"] = jnp.array([0.5, -2.0, 3.0])
        hi = {k: 0.2 * (i + 1) for i, k in enumerate(sorted(grads))}
        hi["v"] = jnp.array([0.4, 5.0, 5.0])
        tx = jaxclip.clip_by_value(hi, min_value=-1.0, statistics="light")
        updates, state = self.variant(tx.update)(grads, tx.init(None))
        befores, afters, outside = [], [], False
        for k, g in grads.items():
            x, h = np.asarray(g, np.float32), np.asarray(hi[k], np.float32)  # bounds in f32
            c = np.clip(x, np.float32(-1.0), h)
            np.testing.assert_array_equal(np.asarray(updates[k]), c)
            befores.append(np.abs(x).max())
            afters.append(np.abs(c).max())
            outside |= bool(((x > h) | (x < -1.0)).any())
        assert float(state.extra["max_abs"]) == pytest.approx(max(befores), rel=1e-7)
        assert float(state.scale) == pytest.approx(max(afters) / max(befores), rel=1e-6)
        assert bool(state.clipped) == outside

    def test_statistics_keep_their_precision_over_millions_of_elements(self):
        # Summing 8M squares in order loses ~1e-4 of the sum in float32; the
        # statistics must be as exact as a plain norm (an odd size: a tail too).
        x = np.random.default_rng(5).normal(size=8_000_003).astype(np.float32) * 0.02
        wide = x.astype(np.float64)
        norm = math.sqrt(np.sum(wide**2))
        after = math.sqrt(np.sum(np.clip(wide, -0.02, 0.02) ** 2))
        clipped = int(np.sum(np.abs(x) > np.float32(0.02)))
        for statistics in ("full", "light"):
            tx = jaxclip.clip_by_value(0.02, statistics=statistics)
            _, state = jax.jit(tx.update)(jnp.asarray(x), tx.init(None))
            assert float(state.norm) == pytest.approx(norm, rel=1e-6)
            if statistics == "full":
                post = float(state.scale) * float(state.norm)
                assert post == pytest.approx(after, rel=1e-6)
                fraction = float(state.extra["clipped_fraction"])
                assert fraction == pytest.approx(clipped / x.size, rel=1e-6)
            else:
                assert float(state.extra["max_abs"]) == float(np.abs(x).max())

    def test_light_statistics_use_the_rounded_bound(self):
        # 0.702 rounds up to 0.703125 in bfloat16: no element of this leaf is clipped
        g = jnp.array([0.703125, -0.1], jnp.bfloat16)
        tx = jaxclip.clip_by_value(0.702, statistics="light")
        updates, state = jax.jit(tx.update)(g, tx.init(None))
        np.testing.assert_array_equal(np.asarray(updates, np.float32), np.asarray(g, np.float32))
        assert not bool(state.clipped)
        assert float(state.scale) == 1.0

    def test_light_statistics_when_nothing_is_clipped_or_finite(self):
        tx = jaxclip.clip_by_value(10.0, statistics="light")
        _, state = tx.update(jnp.array([1.0, -2.0]), tx.init(None))
        assert not bool(state.clipped) and float(state.scale) == 1.0
        _, state = tx.update(jnp.zeros(3), tx.init(None))
        assert float(state.scale) == 1.0 and float(state.extra["max_abs"]) == 0.0
        updates, state = jax.jit(tx.update)(jnp.array([jnp.nan, 20.0]), tx.init(None))
        assert bool(jnp.isnan(updates[0])) and float(updates[1]) == 10.0
        assert not bool(state.finite)
        _, state = tx.update({"empty": jnp.zeros((0,)), "x": jnp.array([12.0])}, tx.init(None))
        assert bool(state.clipped) and float(state.scale) == pytest.approx(10.0 / 12.0)

    def test_bad_bounds(self):
        with pytest.raises(ValueError, match="max_value must be >= 0 when min_value is None"):
            jaxclip.clip_by_value(-0.5)
        with pytest.raises(ValueError, match="min_value must be <= max_value"):
            jaxclip.clip_by_value(1.0, min_value=2.0)
        with pytest.raises(ValueError, match="must not be NaN"):
            jaxclip.clip_by_value(float("nan"))
        with pytest.raises(ValueError, match="statistics"):
            jaxclip.clip_by_value(1.0, statistics="fast")
        with pytest.raises(ValueError, match=r"min_value must be <= max_value"):
            jaxclip.clip_by_value({"a": 1.0, "b": 0.0}, min_value={"a": 0.0, "b": 1.0})
        tx = jaxclip.clip_by_value({"a": 1.0})
        with pytest.raises(ValueError, match="does not match the gradients' structure"):
            tx.update({"a": jnp.ones(2), "b": jnp.ones(2)}, tx.init(None))
        tx = jaxclip.clip_by_value({"a": jnp.ones(3)})
        with pytest.raises(ValueError, match=r"\['a'\] has shape \(3,\)"):
            tx.update({"a": jnp.ones(2)}, tx.init(None))


# -- cases from the peers' own tests ---------------------------------------------------


def test_a_bound_that_does_not_broadcast_to_its_leaf_is_named():
    tx = jaxclip.clip_by_value({"w": jnp.ones(2)})
    with pytest.raises(ValueError, match=r"max_value at \['w'\] has shape \(2,\).*\(2, 3, 1\)"):
        tx.update({"w": jnp.ones((2, 3, 1))}, tx.init(None))


@pytest.mark.parametrize(
    "tx",
    [
        jaxclip.clip_by_global_norm(math.inf),
        jaxclip.clip_by_global_norm(float("inf"), eps=1e-6),
        jaxclip.clip_by_norm(math.inf),
        jaxclip.clip_by_norm(math.inf, axis=0),
        jaxclip.zclip(max_norm=math.inf, warmup_steps=1),
    ],
    ids=["global", "global-eps", "per-leaf", "per-column", "zclip-cap"],
)
def test_an_infinite_threshold_never_clips_and_records_the_norm(tx):
    """As in PyTorch, Optax and jax_privacy: the way to log the norm without clipping."""
    grads = {"w": jnp.array([[3e30, -4e30]]), "b": jnp.array([0.5])}
    out, state = jax.jit(tx.update)(grads, tx.init(grads))
    chex.assert_trees_all_equal(out, grads)
    stats = jaxclip.get_stats(state)
    assert float(stats.norm) == pytest.approx(np_norm(jax.tree.leaves(grads)), rel=1e-6)
    assert not bool(stats.clipped) and float(stats.scale) == 1.0


def test_per_example_clipping_refuses_an_infinite_clip_norm():
    with pytest.raises(ValueError, match="max_norm must be finite"):
        jaxclip.per_example_clip(math.inf)


def test_nonfinite_error_names_the_leaves_eagerly_and_under_jit():
    tx = jaxclip.clip_by_global_norm(1.0, nonfinite="error")
    bad = {"w": jnp.array([1.0, jnp.nan]), "b": jnp.array([2.0])}
    with pytest.raises(FloatingPointError, match=r"\['w'\] has NaN"):
        tx.update(bad, tx.init(None))
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"\['w'\] has NaN"):
        jax.block_until_ready(jax.jit(tx.update)(bad, tx.init(None)))


@pytest.mark.parametrize(
    "factory",
    [
        lambda: jaxclip.clip_by_global_norm(1.0),
        lambda: jaxclip.clip_by_norm(1.0),
        lambda: jaxclip.clip_by_value(1.0),
        lambda: jaxclip.zclip(),
        lambda: jaxclip.autoclip(history=8),
    ],
)
def test_statistics_after_init_none_keep_float64_norms(factory):
    """init(None) cannot see the gradient's dtype: with x64 enabled the record is
    float64, so a float64 norm of 6e200 is not logged as inf."""
    with float64_enabled():
        tx = factory()
        grads = jnp.array([3.6e200, -4.8e200], jnp.float64)
        _, state = tx.update(grads, tx.init(None))
        stats = jaxclip.get_stats(state)
        assert stats.norm.dtype == jnp.float64
        assert float(stats.norm) == pytest.approx(6e200, rel=1e-12)


# -- clip_tree: the functional form ---------------------------------------------------------


def _mixed_tree(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.normal(size=(4, 3)) * 3, jnp.float32),
        "b": jnp.asarray(rng.normal(size=3), jnp.bfloat16),
    }


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("max_norm", [0.5, 100.0, float("inf")])
def test_clip_tree_equals_the_transformation(jit, max_norm):
    tree = _mixed_tree()
    clip = jax.jit(jaxclip.clip_tree, static_argnums=1) if jit else jaxclip.clip_tree
    out, stats = clip(tree, max_norm)
    tx = jaxclip.clip_by_global_norm(max_norm)
    update = jax.jit(tx.update) if jit else tx.update  # XLA may round a jitted norm apart
    want, want_stats = update(tree, tx.init(None))
    chex.assert_trees_all_equal(out, want)
    for field in ("norm", "threshold", "scale", "clipped", "finite", "clipped_steps"):
        assert getattr(stats, field) == getattr(want_stats, field), field
    assert int(stats.step) == 1 and out["b"].dtype == jnp.bfloat16


def test_clip_tree_uses_the_norm_it_is_given():
    """A norm the loop already has (PyTorch's clip_grads_with_norm_): used as given."""
    tree = {"g": jnp.array([6.0, 8.0])}  # norm 10
    out, stats = jax.jit(lambda t, n: jaxclip.clip_tree(t, 5.0, norm=n))(tree, 20.0)
    np.testing.assert_allclose(out["g"], [1.5, 2.0], rtol=1e-6)  # scaled by 5 / 20
    assert float(stats.norm) == 20.0 and float(stats.scale) == 0.25 and bool(stats.clipped)
    # PyTorch's rule: min(1, max_norm / (norm + 1e-6)), in float32
    out, _ = jaxclip.clip_tree(tree, 5.0, norm=jaxclip.global_norm(tree), eps=1e-6)
    coef = np.float32(5.0) * (np.float32(1) / (np.float32(10.0) + np.float32(1e-6)))
    np.testing.assert_array_equal(out["g"], np.float32([6.0, 8.0]) * coef)
    out, stats = jaxclip.clip_tree(tree, 5.0, norm=4.0)  # below the threshold: unchanged
    np.testing.assert_array_equal(out["g"], [6.0, 8.0])
    assert not bool(stats.clipped)


def test_clip_tree_non_finite_norm_follows_the_policy():
    tree = {"g": jnp.array([6.0, 8.0])}
    out, stats = jaxclip.clip_tree(tree, 5.0, norm=float("nan"), nonfinite="skip")
    np.testing.assert_array_equal(out["g"], [0.0, 0.0])
    assert not bool(stats.finite) and int(stats.nonfinite_steps) == 1
    out, _ = jaxclip.clip_tree({"g": jnp.array([jnp.inf, 3.0, 4.0])}, 1.0, nonfinite="zero")
    np.testing.assert_allclose(out["g"], [0.0, 0.6, 0.8], rtol=1e-6)


def test_clip_tree_refuses_bad_arguments():
    tree = {"g": jnp.ones(2)}
    with pytest.raises(ValueError, match="norm must be a scalar"):
        jaxclip.clip_tree(tree, 1.0, norm=jnp.ones(2))
    with pytest.raises(ValueError, match="max_norm must be >= 0"):
        jaxclip.clip_tree(tree, -1.0)
    with pytest.raises(ValueError, match="nonfinite"):
        jaxclip.clip_tree(tree, 1.0, nonfinite="ignore")
    with pytest.raises(TypeError, match=r"\['n'\] has dtype int32"):
        jaxclip.clip_tree({"n": jnp.ones(2, jnp.int32)}, 1.0)
