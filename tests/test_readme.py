"""The README's quickstart runs, and its two commands are the ones CI and users run."""

import pathlib
import re

import jaxclip

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _command(marker):
    match = re.search(rf"<!-- {marker} -->\n```bash\n(.+)\n```", README)
    assert match, f"README has no {marker}"
    return match.group(1)


def test_quickstart_runs():
    code = re.search(r"## Quickstart\n\n```python\n(.*?)```", README, re.S).group(1)
    namespace = {}
    exec(compile(code, "README quickstart", "exec"), namespace)
    stats = namespace["stats"]
    assert isinstance(stats, jaxclip.ClipStats)
    assert int(stats.clipped_steps) == 3 and float(stats.threshold) == 1.0
    assert float(stats.norm) > 1.0


def _section_code(title):
    section = README.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    namespace = {}
    for block in re.findall(r"```python\n(.*?)```", section, re.S):
        exec(compile(block, f"README: {title}", "exec"), namespace)
    return namespace


def test_adaptive_example_clips_the_spike():
    ns = _section_code("Adaptive thresholds")
    stats = ns["stats"]
    assert float(stats.norm) == 40.0 and bool(stats.clipped)
    assert 3.0 < float(stats.threshold) < 5.0  # ZClip: mean 4 + 2.5 * std 0 of the warm-up
    assert {"mean", "std", "z"} <= set(stats.extra)


def test_per_example_example_clips_every_example():
    ns = _section_code("Per-example clipping (DP-SGD)")
    assert float(jaxclip.get_stats(ns["opt_state"]).extra["clipped_fraction"]) == 1.0
    assert ns["updates"]["w"].shape == (3,)  # the batch axis is gone


def test_devices_example_finds_the_global_norm():
    ns = _section_code("Across devices and hosts")
    assert abs(float(ns["norm"]) - float(ns["jnp"].linalg.norm(ns["grads"]))) < 1e-4
    assert float(ns["jnp"].linalg.norm(ns["clipped"])) <= 1.0 + 1e-5


def test_diagnostics_example_names_the_bad_leaves():
    report = _section_code("Diagnostics")["report"]
    assert report.nonfinite() == ["head"] and report.vanishing() == ["bias"]


def test_every_python_block_is_tested():
    titles = re.findall(r"^## (.+)$", README, re.M)
    with_code = [
        t for t in titles if "```python" in README.split(f"## {t}\n", 1)[1].split("\n## ", 1)[0]
    ]
    assert with_code == [
        "Quickstart",
        "Adaptive thresholds",
        "Per-example clipping (DP-SGD)",
        "Across devices and hosts",
        "Diagnostics",
    ]


def test_two_commands():
    assert _command("demo-command").endswith("python -m jaxclip demo")
    assert "[plot]" in _command("demo-command")  # the demo draws its picture
    test_command = _command("test-command")
    # the fast default, with the slowest tests printed; CI adds the slow ones
    assert "pytest" in test_command and "--durations" in test_command
    assert "--slow" not in test_command
    ci = (ROOT / ".ci" / "run").read_text()
    assert "readme_command test-command" in ci and 'eval "$test_command"' in ci
    assert "pytest -n auto --slow -m slow" in ci


def test_install_comes_before_the_first_import():
    install = README.index("## Install\n")
    first_import = re.search(r"^import .*jaxclip", README, re.M).start()
    assert install < first_import and install < README.index("## Quickstart")
    assert "python -m pip install ." in README[install:].split("\n## ", 1)[0]
