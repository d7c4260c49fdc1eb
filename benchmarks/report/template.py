"""A small Mustache-like filler: the report's prose is Markdown with placeholders, the generator gives the values.

``{{name}}`` is replaced by a value, ``{{#name}}...{{/name}}`` kept only where the value is truthy,
``{{^name}}...{{/name}}`` only where it is not, and ``{{*name}}...{{/name}}`` rendered once per item of a
list of dicts, each item's keys read first (a run of an experiment, a batch size of a run). A name is a
dotted path into the values (``seeds.table``). A placeholder without a value is an error, so that a
sentence never reads a hole.
"""

from __future__ import annotations

import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
BLOCK = re.compile(r"\{\{([#^*])([\w.-]+)\}\}(.*?)\{\{/\2\}\}", re.S)
VALUE = re.compile(r"\{\{([\w.-]+)\}\}")


def lookup(values: dict, name: str):
    """The value at a dotted path; KeyError naming the placeholder when there is none."""
    found = values
    for part in name.split("."):
        if not isinstance(found, dict) or part not in found:
            raise KeyError(f"the template's {{{{{name}}}}} has no value")
        found = found[part]
    return found


def _fill(text: str, values: dict) -> str:
    """The placeholders of a text without blocks, filled."""
    return VALUE.sub(lambda m: str(lookup(values, m.group(1))), text)


def _block(kind: str, name: str, body: str, values: dict) -> str:
    """One block rendered: repeated per item, kept, or dropped."""
    value = lookup(values, name)
    if kind == "*":
        return "".join(render(body, {**values, **item}) for item in value)
    return render(body, values) if bool(value) == (kind == "#") else ""


def render(text: str, values: dict) -> str:
    """``text`` with its blocks rendered and its placeholders filled from ``values`` (values are not read again)."""
    out = []
    while (block := BLOCK.search(text)) is not None:
        out += [_fill(text[: block.start()], values), _block(*block.groups(), values)]
        text = text[block.end():]
    return "".join(out) + _fill(text, values)


def render_file(name: str, values: dict) -> str:
    """A template file beside this module, rendered, without its final newline (partials join as the caller says)."""
    return render((HERE / name).read_text().removesuffix("\n"), values)
