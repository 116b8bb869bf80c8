"""The main job, ``python -m jaxclip demo``, end to end and in parts."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxclip import demo


def _run(*args, cwd):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "jaxclip", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
    )


def test_demo_runs_and_writes_its_results(tmp_path):
    out = tmp_path / "results"
    proc = _run("demo", "--steps", "40", "--seed", "3", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for method in demo.DEFAULT_METHODS:
        assert method in proc.stdout
    assert "final loss" in proc.stdout and str(out / "summary.json") in proc.stdout
    rows = json.loads((out / "summary.json").read_text())
    assert [r["method"] for r in rows] == list(demo.DEFAULT_METHODS)
    lines = (out / "history.csv").read_text().splitlines()
    assert len(lines) == 1 + 40 * len(demo.DEFAULT_METHODS)
    assert "40/40" in proc.stderr  # the progress bar
    # a verdict per method against the baseline, and the notes on the methods' designs
    for row in rows:
        learned = row["final loss"] < demo.LEARNED_BELOW * demo.BASELINE_LOSS["memory"]
        assert row["verdict"] == ("learned" if learned else "did not learn")
    assert "verdict" in proc.stdout and "Notes:" in proc.stdout
    assert f"zclip: {demo.NOTES['zclip']}" in proc.stdout
    png = (out / "demo.png").read_bytes()
    assert png.startswith(b"\x89PNG") and str(out / "demo.png") in proc.stdout


def _main(*args, monkeypatch, capsys):
    """``python -m jaxclip ARGS`` in this process: (exit status, stdout, stderr). The
    command line is parsed before jax is needed; test_demo_runs_and_writes_its_results
    runs the module as a program."""
    from jaxclip import __main__ as cli

    monkeypatch.setenv("COLUMNS", "80")  # argparse wraps as in a pipe
    monkeypatch.setattr(sys, "argv", ["/x/jaxclip/__main__.py", *args])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    out = capsys.readouterr()
    return exited.value.code, out.out, out.err


@pytest.mark.parametrize(
    "args,message",
    [
        (["demo", "--steps", "0"], "--steps: must be at least 1"),
        (["demo", "--steps", "many"], "expected a whole number"),
        (["demo", "--methods", "clip_by_global_norm,bogus"], "unknown method(s) bogus"),
        (["train"], "invalid choice"),
    ],
)
def test_bad_flags_get_a_clear_message(args, message, monkeypatch, capsys):
    status, _, err = _main(*args, monkeypatch=monkeypatch, capsys=capsys)
    assert status == 2
    assert message in err and err.startswith("usage: python -m jaxclip ")


def test_help_describes_the_demo_and_its_defaults(monkeypatch, capsys):
    status, out, _ = _main("demo", "--help", monkeypatch=monkeypatch, capsys=capsys)
    assert status == 0
    text = " ".join(out.split())
    assert "memory task" in text and "adding" not in text
    assert "(default: 800)" in text and "(default: jaxclip-demo)" in text
    assert "(default: " + ",".join(demo.DEFAULT_METHODS) in text.replace(", ", ",")


def test_console_script_names_itself(monkeypatch, capsys):
    from jaxclip import __main__ as cli

    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/jaxclip", "--help"])
    with pytest.raises(SystemExit):
        cli.main()
    assert capsys.readouterr().out.startswith("usage: jaxclip ")
    monkeypatch.setattr(sys, "argv", ["/x/jaxclip/__main__.py", "--help"])
    with pytest.raises(SystemExit):
        cli.main()
    assert capsys.readouterr().out.startswith("usage: python -m jaxclip ")


def test_history_records_what_the_clipper_did():
    config = demo.Config(steps=30, seed=1)
    clipped = demo.train("clip_by_global_norm", config)
    assert np.all(clipped.threshold == 1.0)
    np.testing.assert_array_equal(clipped.clipped, clipped.norm > 1.0)
    assert clipped.summary["clipped steps"] == int(np.sum(clipped.norm > 1.0))
    assert clipped.summary["largest norm"] == pytest.approx(clipped.norm.max())
    plain = demo.train("none", config)
    assert np.all(np.isnan(plain.threshold)) and not plain.clipped.any()
    # same seed, same first batch and parameters: the first losses agree
    assert plain.loss[0] == pytest.approx(clipped.loss[0])


def test_task_targets():
    import jax

    config = demo.Config(batch=5, seq_len=10)
    x, y = demo.adding_batch(jax.random.PRNGKey(0), config)
    x, y = np.asarray(x), np.asarray(y)
    assert x.shape == (5, 10, 2)
    np.testing.assert_array_equal(x[..., 1].sum(axis=1), 2.0)
    np.testing.assert_allclose(y, (x[..., 0] * x[..., 1]).sum(axis=1), rtol=1e-6)
    x, y = demo.memory_batch(jax.random.PRNGKey(1), config)
    x, y = np.asarray(x), np.asarray(y)
    np.testing.assert_array_equal(y, x[:, 0, 0])
    np.testing.assert_array_equal(x[..., 1], np.eye(10)[0][None].repeat(5, 0))
    assert np.all(np.abs(x[..., 0]) <= 1)


def test_format_table():
    table = demo.format_table(
        [{"method": "a", "loss": 0.5}, {"method": "bb", "loss": float("nan")}]
    )
    lines = table.splitlines()
    assert lines[0].split() == ["method", "loss"]
    assert lines[3].split() == ["bb", "nan"]
