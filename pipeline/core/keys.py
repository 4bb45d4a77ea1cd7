"""The keys of a config section, read from its dataclass: dotted name, type, default and a one-line
doc (the field's ``metadata["doc"]``, else the comment beside it, else the comment block above it).
`mlcd <stage> --help` prints them and an unknown ``--flag`` is matched against them
(pipeline/core/entry.py), so the dataclass stays the one place a setting is described.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
from typing import Any, NamedTuple


class Key(NamedTuple):
    name: str      # dotted: train.optim.lr
    type: str      # as annotated
    default: Any
    doc: str


def _comments(source: str) -> tuple[dict[int, str], set[int]]:
    """line -> its comment text, and the lines holding nothing but a comment."""
    comments: dict[int, str] = {}
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                              tokenize.ENDMARKER):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    return comments, set(comments) - code_lines


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> one-line doc from the class source (empty where it says nothing)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments, alone = _comments(source)
    body = ast.parse(source).body[0]
    docs = {}
    for node in getattr(body, "body", []):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        doc = comments.get(node.end_lineno or node.lineno, "")
        if not doc:  # the comment block right above the field
            above, line = [], node.lineno - 1
            while line in alone:
                above.insert(0, comments[line])
                line -= 1
            doc = " ".join(above)
        docs[node.target.id] = doc
    return docs


def keys(cls: type, prefix: str, value: Any = None) -> list[Key]:
    """Every leaf key of the dataclass ``cls`` under ``prefix``, nested dataclasses flattened."""
    value = cls() if value is None else value
    docs = field_docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        v = getattr(value, f.name)
        name = f"{prefix}.{f.name}"
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            out += keys(type(v), name, v)
        else:
            doc = f.metadata.get("doc") or docs.get(f.name, "")
            out.append(Key(name, str(f.type), v, doc))
    return out


def describe(cls: type, prefix: str, width: int = 100) -> str:
    """The keys as aligned lines ``name  type = default  doc`` (docs cut to one line)."""
    rows = [(k.name, f"{k.type} = {k.default!r}", k.doc) for k in keys(cls, prefix)]
    a = max((len(r[0]) for r in rows), default=0)
    b = min(max((len(r[1]) for r in rows), default=0), 40)
    lines = []
    for name, typed, doc in rows:
        line = f"  {name:<{a}}  {typed:<{b}}  {doc}".rstrip()
        lines.append(line if len(line) <= width + a else line[:width + a - 3] + "...")
    return "\n".join(lines)


def suggest(flag: str, value: str | None, classes: dict[str, type]) -> list[str]:
    """``--steps`` -> ["train.steps=10"]: the keys whose last part the flag names."""
    leaf = flag.lstrip("-").split("=", 1)[0].replace("-", "_")
    hits = [k.name for prefix, cls in classes.items() for k in keys(cls, prefix)
            if k.name.rsplit(".", 1)[-1] == leaf]
    return [f"{h}={value}" if value is not None else f"{h}=..." for h in hits]
