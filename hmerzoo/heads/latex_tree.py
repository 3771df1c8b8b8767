"""The tree of a tokenised LaTeX caption and each token's parent, as TAMER's structure task labels them (the official
``tamer/datamodule/latex2gtd.py``: ``latex2Tree`` + ``node2list`` + ``to_struct``, itself from TDv2).

The tree: every token that is not consumed as syntax is a node. A node's children are, in order, its structural
arguments (the group after ``_`` / ``^``; ``\\frac``'s denominator then numerator; ``\\sqrt``'s ``[ ]`` index then its
``{ }`` radicand; an accent's ``{ }``...) and then the next token of its own sequence (a ``\\\\`` line break before it is
consumed). Group braces/brackets and the ``_`` / ``^`` that open a script are syntax, so they have no parent (-1).
The first token's parent is the start of the sequence (-1 as well). A caption the rules cannot read (a script or
argument without its ``{``, a command at the end) is *illegal*: every token gets -1, and a search drops it.

Quirks kept on purpose, because the official labels (and its beam search) have them: a group whose closing brace is
missing is read as everything but the last token of what follows, and nothing is consumed, so its tokens appear
twice in the tree and the later visit (in preorder) sets their parent; ``x ^ { 2 } _ { 3 }`` reads the ``_`` as an
ordinary node (a subscript is only recognised before a superscript).
"""
from __future__ import annotations

from typing import Sequence

BIG_OPERATORS = (r"\iint", r"\bigcup", r"\sum", r"\lim", r"\coprod")
ACCENTS = (r"\dot", r"\ddot", r"\hat", r"\check", r"\grave", r"\acute", r"\tilde", r"\breve", r"\bar", r"\vec",
           r"\widehat", r"\overbrace", r"\widetilde", r"\overleftarrow", r"\overrightarrow", r"\overline",
           r"\underline", r"\underbrace")
ARROWS = (r"\xrightarrow", r"\xleftarrow")
CLOSING = {"{": "}", "[": "]"}


class IllegalLatex(ValueError):
    """The caption does not follow the structure rules (an argument without its brace, a command at the end)."""


class _Node:
    __slots__ = ("index", "children")

    def __init__(self, index: int):
        self.index = index
        self.children: list[_Node | None] = []


def _first(rest: list[tuple[int, str]]) -> str:
    if not rest:
        raise IllegalLatex("a command or script needs an argument after it")
    return rest[0][1]


def _matching(rest: list[tuple[int, str]], opening: str) -> int:
    """Position in ``rest`` of the bracket closing the one at ``rest[0]``; -1 when it is never closed."""
    depth = 0
    for i, (_, token) in enumerate(rest):
        if token == opening:
            depth += 1
        elif token == CLOSING[opening]:
            depth -= 1
            if depth == 0:
                return i
    return -1


def _matrix_end(rest: list[tuple[int, str]]) -> int:
    depth = 1
    for i, (_, token) in enumerate(rest):
        if token == r"\begin{matrix}":
            depth += 1
        elif token == r"\end{matrix}":
            depth -= 1
            if depth == 0:
                return i
    return -1


def _build(seq: list[tuple[int, str]]) -> _Node | None:
    """The subtree of a token sequence (None for an empty one); raises IllegalLatex."""
    if not seq:
        return None
    node = _Node(seq[0][0])
    symbol, rest = seq[0][1], seq[1:]

    def group(opening: str, required: bool) -> bool:
        """Read the group opening at rest[0] into a child; False (nothing read) when optional and absent."""
        nonlocal rest
        if _first(rest) != opening:
            if required:
                raise IllegalLatex(f"{opening} expected")
            return False
        end = _matching(rest, opening)
        node.children.append(_build(rest[1:end]))
        rest = rest[end + 1:]  # nothing consumed when the group is never closed (end = -1)
        return True

    def scripts() -> None:
        nonlocal rest
        for mark in ("_", "^"):  # a subscript is only read before a superscript
            if rest and rest[0][1] == mark:
                rest = rest[1:]
                group("{", required=True)

    if symbol == r"\begin{matrix}":
        end = _matrix_end(rest)
        node.children.append(_build(rest[:end]))
        rest = rest[end + 1:]
    elif symbol in ACCENTS:
        group("{", required=True)
    elif symbol in ARROWS:
        group("[", required=False)
        group("{", required=False)
    elif symbol == r"\frac":
        group("{", required=True)
        numerator = node.children.pop()
        group("{", required=True)
        node.children.append(numerator)  # the official inserts the denominator before the numerator
    elif symbol == r"\sqrt":
        group("[", required=False)
        group("{", required=True)
    else:  # ordinary symbols, big operators, <bol>
        scripts()
    if rest and rest[0][1] == "\\\\":
        rest = rest[1:]
    node.children.append(_build(rest))
    return node


def parents(tokens: Sequence[str]) -> list[int]:
    """Each token's parent position in ``tokens`` (-1: syntax, or the first token). Raises IllegalLatex."""
    try:
        root = _build(list(enumerate(tokens)))
    except RecursionError:
        raise IllegalLatex("too deeply nested") from None
    parent: dict[int, int] = {}
    stack: list[tuple[_Node, int]] = [] if root is None else [(root, -1)]
    while stack:  # preorder, children in order: a token read twice takes its later parent, as the official dict
        node, up = stack.pop()
        parent[node.index] = up
        stack.extend((child, node.index) for child in reversed(node.children) if child is not None)
    return [parent.get(i, -1) for i in range(len(tokens))]


def structure_targets(tokens: Sequence[str]) -> tuple[list[int], list[int], bool]:
    """TAMER's per-position targets of one caption for its L2R and R2L rows (n tokens -> n + 1 positions: each
    token's parent position in that row's order, then n - 1 at the stop token; -1 = no target) and whether the
    caption is illegal (then every token's target is -1)."""
    n = len(tokens)
    try:
        up, illegal = parents(tokens), False
    except IllegalLatex:
        up, illegal = [-1] * n, True
    l2r = up + [n - 1]
    r2l = [n - p - 1 if p != -1 else -1 for p in reversed(up)] + [n - 1]
    return l2r, r2l, illegal
