"""The documentation site: its code runs, its tables match the code, its reference is complete.

Every ```python block of docs/**/*.md runs, the blocks of a page in order and in one
namespace, as a reader would run them. A block that needs hardware or several processes
may be marked ``<!-- no-run: why -->`` on the line before it; it must still compile.
(Docstring examples run as doctests in tests/test_docs.py, and the migration guide's
translations are checked against the other libraries' rules in tests/test_migration.py.)
"""

import ast
import importlib
import inspect
import os
import pathlib
import re
import subprocess
import sys

import jax.numpy as jnp
import optax
import pytest

import jaxclip

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
NO_RUN = re.compile(r"<!-- no-run: (.+?) -->")
# what may keep a block from running in the test suite
NEEDS_HARDWARE = re.compile(r"\b(devices?|process(es)?|hosts?|GPUs?|TPUs?)\b", re.I)


def rel(page: pathlib.Path) -> str:
    return page.relative_to(DOCS).as_posix()


def python_blocks(page: pathlib.Path) -> list[tuple[int, str, str | None]]:
    """(line number, code, no-run reason or None) for each ```python block of ``page``."""
    lines = page.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            assert lines[i] == "```python", f"{rel(page)}:{i + 1}: indented code block"
            start = i + 1
            end = lines.index("```", start)
            marker = NO_RUN.fullmatch(lines[i - 1].strip()) if i else None
            blocks.append((start, "\n".join(lines[start:end]) + "\n", marker and marker[1]))
            i = end
        i += 1
    return blocks


RUNNABLE = [p for p in PAGES if python_blocks(p)]


@pytest.fixture
def quiet_matplotlib():
    """A non-interactive matplotlib backend, and every figure closed afterwards."""
    try:
        import matplotlib
    except ImportError:
        yield
        return
    matplotlib.use("Agg")
    yield
    from matplotlib import pyplot

    pyplot.close("all")


@pytest.mark.parametrize("page", RUNNABLE, ids=[rel(p) for p in RUNNABLE])
def test_page_code_runs(page, tmp_path, monkeypatch, quiet_matplotlib):
    monkeypatch.chdir(tmp_path)  # anything a block writes lands here
    namespace = {"__name__": "__docs__"}
    for line, code, no_run in python_blocks(page):
        compiled = compile(code, f"docs/{rel(page)}, block at line {line}", "exec")
        if no_run:
            continue
        exec(compiled, namespace)  # the test extra installs every library the pages use


def test_only_hardware_blocks_skip_running():
    skipped = [(rel(p), line, why) for p in PAGES for line, _, why in python_blocks(p) if why]
    for page, line, why in skipped:
        assert NEEDS_HARDWARE.search(why), f"docs/{page}:{line}: no-run for {why!r}"
    for page in PAGES:  # a marker not directly before a python block would be ignored
        text = page.read_text()
        for match in NO_RUN.finditer(text):
            assert text[match.end() :].startswith("\n```python\n"), f"docs/{rel(page)}: {match[0]}"


# -- the API reference --------------------------------------------------------------------


def _resolve(path: str):
    """The object a mkdocstrings identifier names, as Python imports it."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(path)


def _api_targets() -> list[str]:
    return [
        m[1]
        for page in sorted((DOCS / "api").glob("*.md"))
        for m in re.finditer(r"^::: ([\w.]+)", page.read_text(), re.M)
    ]


def test_every_public_name_is_in_the_api_reference():
    documented = {id(_resolve(target)) for target in _api_targets()}
    missing = [name for name in jaxclip.__all__ if id(getattr(jaxclip, name)) not in documented]
    assert not missing, f"not in docs/api/*.md: {missing}"


def test_every_plot_function_is_in_the_api_reference():
    from jaxclip import plot

    public = {
        name
        for name, obj in vars(plot).items()
        if inspect.isfunction(obj) and obj.__module__ == plot.__name__ and not name.startswith("_")
    }
    documented = {t.rsplit(".", 1)[1] for t in _api_targets() if t.startswith("jaxclip.plot.")}
    assert public == documented


def test_api_reference_documents_nothing_else():
    exported = {id(getattr(jaxclip, name)) for name in jaxclip.__all__}
    for target in _api_targets():
        if target.startswith("jaxclip.plot."):
            continue
        assert id(_resolve(target)) in exported, f"{target} is not in jaxclip.__all__"


def test_names_the_pages_mention_exist():
    """Every ``jaxclip.name`` written in the pages is a real attribute or module."""
    plot_source = (ROOT / "jaxclip" / "plot.py").read_text()  # read, not imported
    for page in PAGES:
        for match in re.finditer(r"\bjaxclip\.(\w+)(?:\.(\w+))?", page.read_text()):
            where = f"docs/{rel(page)}: {match[0]}"
            if match[1] == "plot":
                assert not match[2] or f"\ndef {match[2]}(" in plot_source, where
                continue
            if hasattr(jaxclip, match[1]):
                continue
            module = importlib.import_module(f"jaxclip.{match[1]}")
            assert not match[2] or hasattr(module, match[2]), where


# -- tables that restate the code ---------------------------------------------------------


def tables(page: pathlib.Path) -> list[list[list[str]]]:
    """The Markdown tables of ``page``: rows of cells, the header row first."""
    out, current = [], []
    for line in [*page.read_text().splitlines(), ""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= {"-", ":"} for c in cells):
                current.append(cells)
        elif current:
            out.append(current)
            current = []
    return out


def table_with(page: pathlib.Path, header: str) -> list[list[str]]:
    found = [t for t in tables(page) if header in t[0]]
    assert len(found) == 1, f"one table with a {header!r} column in docs/{rel(page)}"
    return found[0]


def test_defaults_in_the_choosing_guide_match_the_signatures():
    table = table_with(DOCS / "guides" / "choosing.md", "Defaults")
    column = table[0].index("Defaults")
    for row in table[1:]:
        text = re.fullmatch(r"`(.+)`", row[column])[1]
        call = ast.parse(text, mode="eval").body
        name = call.func.id
        params = inspect.signature(getattr(jaxclip, name)).parameters
        order = list(params)
        listed = []
        for arg in call.args:  # required arguments, written by name
            assert params[arg.id].default is inspect.Parameter.empty, f"{name}({arg.id})"
            listed.append(arg.id)
        for kw in call.keywords:
            default = params[kw.arg].default
            assert default == ast.literal_eval(kw.value), f"{name}({kw.arg}={default!r})"
            assert type(default) is type(ast.literal_eval(kw.value)), f"{name}({kw.arg})"
            listed.append(kw.arg)
        assert listed == sorted(listed, key=order.index), f"{name}: not in signature order"
        shared = {"nonfinite", "max_consecutive_skips", "axis_name", "replicated"}
        left_out = set(order) - set(listed) - shared
        assert not left_out, f"{name}: {sorted(left_out)} missing from the table"


def _extra_keys() -> dict[str, set[str]]:
    """The ``ClipStats.extra`` keys of each clipper, from the code."""
    params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
    clippers = {
        "clip_by_global_norm": jaxclip.clip_by_global_norm(1.0),
        "clip_by_norm": jaxclip.clip_by_norm(1.0),
        "clip_by_value": jaxclip.clip_by_value(1.0),
        "autoclip": jaxclip.autoclip(),
        "zclip": jaxclip.zclip(),
        "quantile_clip": jaxclip.quantile_clip(),
        "adagc": jaxclip.adagc(),
        "agc": jaxclip.agc(),
        "skip_on_spike": jaxclip.skip_on_spike(optax.sgd(0.1)),
        "spike_aware": jaxclip.spike_aware(optax.adamw(0.1)),
        "stable_update": jaxclip.stable_update(optax.adamw(0.1)),
        "per_example_clip": jaxclip.per_example_clip(1.0),
    }
    return {name: set(jaxclip.get_stats(tx.init(params)).extra) for name, tx in clippers.items()}


def test_statistics_guide_lists_each_clippers_extra_keys():
    table = table_with(DOCS / "guides" / "statistics.md", "`extra`")
    column = table[0].index("`extra`")
    keys = _extra_keys()
    listed = {}
    for row in table[1:]:
        name = re.fullmatch(r"`(\w+)`", row[0])[1]
        cell = re.sub(r"\([^)]*\)", "", row[column])  # drop the explanations in brackets
        listed[name] = set(re.findall(r"`(\w+)`", cell))
    assert listed == keys


# -- the site as a whole ------------------------------------------------------------------


def test_snippets_exist():
    for page in PAGES:
        for path in re.findall(r'^--8<-- "([^"]+)"', page.read_text(), re.M):
            assert (ROOT / path).is_file(), f"docs/{rel(page)} includes {path}, which is missing"


def test_every_page_is_in_the_nav():
    config = (ROOT / "mkdocs.yml").read_text()
    nav = set(re.findall(r"^\s+- (?:[^:\n]+: )?([\w/.-]+\.md)$", config, re.M))
    assert nav == {rel(p) for p in PAGES}


def test_site_builds_strictly(tmp_path):
    for module in ("mkdocs", "material", "mkdocstrings_handlers.python"):
        importlib.import_module(module)  # the test extra installs the docs extra
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert (tmp_path / "api" / "fixed" / "index.html").is_file()
