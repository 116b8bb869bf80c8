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


def test_two_commands():
    assert _command("demo-command").endswith("python -m jaxclip demo")
    assert "[plot]" in _command("demo-command")  # the demo draws its picture
    test_command = _command("test-command")
    assert "pytest" in test_command and "--slow" in test_command
    ci = (ROOT / ".ci" / "run").read_text()
    assert "readme_command test-command" in ci and 'eval "$test_command"' in ci
