"""The matplotlib helpers (the optional extra) and that jaxclip never imports matplotlib."""

import subprocess
import sys

import numpy as np

import jaxclip
from jaxclip import plot  # the test extra brings matplotlib


def test_importing_jaxclip_does_not_import_matplotlib():
    code = "import sys, jaxclip; assert 'matplotlib' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_norm_history_marks_threshold_and_clips():
    norm = [1.0, 8.0, float("nan"), 2.0]
    fig = plot.norm_history(norm, threshold=[2.0, 2.0, 2.0, 2.0], clipped=[0, 1, 0, 0])
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.lines]
    assert labels[:3] == ["norm", "threshold", "clipped"]
    clipped_x = ax.lines[2].get_xdata()
    np.testing.assert_array_equal(clipped_x, [1])


def test_losses_one_line_per_run():
    fig = plot.losses({"a": [3.0, 2.0], "b": [3.0, float("inf")]})
    assert [line.get_label() for line in fig.axes[0].lines] == ["a", "b"]


def test_clip_field_shows_the_clipped_vectors():
    fig = plot.clip_field(
        {"value": jaxclip.clip_by_value(1.0), "norm": jaxclip.clip_by_global_norm(1.0)},
        points=3,
    )
    value_ax, norm_ax = fig.axes
    clipped_value = value_ax.collections[1]
    u, v = clipped_value.U, clipped_value.V
    assert np.all(np.abs(u) <= 1) and np.all(np.abs(v) <= 1)
    clipped_norm = norm_ax.collections[1]
    assert np.all(np.hypot(clipped_norm.U, clipped_norm.V) <= 1 + 1e-6)
    # the norm clip keeps every direction
    grid = value_ax.collections[0]
    cross = grid.U * clipped_norm.V - grid.V * clipped_norm.U
    np.testing.assert_allclose(cross, 0, atol=1e-6)


def test_demo_runs_picture():
    from jaxclip import demo

    histories = [demo.train(m, demo.Config(steps=20)) for m in ("none", "clip_by_global_norm")]
    fig = plot.demo_runs(histories, baseline=1 / 3, notes={"none": "a note"})
    assert len(fig.axes) == 3
    loss_ax = fig.axes[0]
    baseline = [line for line in loss_ax.lines if line.get_label().startswith("baseline")]
    assert len(baseline) == 1 and np.allclose(baseline[0].get_ydata(), 1 / 3)
    # legends sit outside the data, to the right of each panel
    assert all(ax.get_legend().get_bbox_to_anchor().x0 >= ax.bbox.x1 - 1 for ax in fig.axes)
    assert fig.axes[1].get_title().endswith("\na note")
