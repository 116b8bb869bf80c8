"""A Griffe extension for the documentation site: reads jaxclip's docstrings as Markdown.

The docstrings are written for ``help()`` and doctest (Google style with a few
reStructuredText habits). Before mkdocstrings parses them, this extension

- renames the ``Example:`` section to ``Examples:``, the title Griffe reads as
  runnable examples (rendered as code) rather than as a note;
- puts a blank line before a section title that directly follows text, so the
  section is recognised;
- turns roles such as ``:func:`~jaxclip.clip_by_global_norm``` into links to
  the API reference, or into plain code when the target has no page;
- gives each NamedTuple field without a docstring the comment that follows it
  on its line (``norm: Array  # float32[]: pre-clip global norm``).

Only the text Griffe parses changes; the docstrings in the package stay as they are.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

import jaxclip

_SECTIONS = ("Args", "Returns", "Raises", "Yields", "Example", "Examples", "References")
_SECTION = re.compile(rf"^\s*({'|'.join(_SECTIONS)}):\s*$")
_ROLE = re.compile(r":(?:func|class|meth|attr|mod|data|obj):`(~?)([\w.]+)`")
_PLOT = ("norm_history", "losses", "clip_field", "demo_runs")
# public names whose API entry has another identifier (the function agc shares its
# name with the module jaxclip.agc, so its entry is jaxclip.agc.agc)
_ANCHORS = {"agc": "jaxclip.agc.agc"}


def _target(name: str, owner: griffe.Object) -> str | None:
    """The identifier of ``name`` on the site, or None when it has no entry."""
    if name.startswith("jaxclip."):
        short = name.split(".", 1)[1]
        if short in jaxclip.__all__:
            return _ANCHORS.get(short, name)
        return name if short.startswith("plot.") else None
    if name in jaxclip.__all__:
        return _ANCHORS.get(name, f"jaxclip.{name}")
    if name in _PLOT:
        return f"jaxclip.plot.{name}"
    cls = owner if owner.is_class else owner.parent
    if cls is not None and cls.is_class and cls.name in jaxclip.__all__:
        return f"jaxclip.{cls.name}.{name}"
    return None


def markdown_docstring(text: str, owner: griffe.Object) -> str:
    """The docstring ``text`` of ``owner``, adjusted as the module docstring says."""
    lines = text.splitlines()
    out: list[str] = []
    for line in lines:
        if _SECTION.match(line):
            if out and out[-1].strip():
                out.append("")
            line = line.replace("Example:", "Examples:")
        out.append(line)

    def link(match: re.Match) -> str:
        short, name = match.group(1), match.group(2)
        shown = name.rsplit(".", 1)[-1] if short else name
        target = _target(name, owner)
        return f"[`{shown}`][{target}]" if target else f"`{shown}`"

    return _ROLE.sub(link, "\n".join(out))


def field_comment(obj: griffe.Object) -> str | None:
    """The comment after a class attribute's definition, on the same line."""
    if not obj.is_attribute or obj.parent is None or not obj.parent.is_class:
        return None
    try:
        line = obj.lines[0]
    except (IndexError, OSError, TypeError):
        return None
    match = re.search(r"#\s*(.+)$", line)
    return match[1].strip() if match else None


class MarkdownDocstrings(griffe.Extension):
    """Applies :func:`markdown_docstring` to every loaded object, and documents fields."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown_docstring(obj.docstring.value, obj)
        elif (comment := field_comment(obj)) is not None:
            obj.docstring = griffe.Docstring(comment, parent=obj)
