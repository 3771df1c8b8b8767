"""PosFormer's position forest (Guan et al., ECCV 2024): where every token of a LaTeX caption sits in the
expression's nesting, computed from the token sequence alone.

Each token gets a path, one relation per nesting level from the outside in. At every level a token is either
on that level's baseline (``TOKEN``), or inside a script/fraction/root of that level, above (``ABOVE``: a
superscript, a numerator, the index of ``\\sqrt[n]``) or below (``BELOW``: a subscript, a denominator, a
radicand); the inner level then adds its own relation. The structure tokens (``^``, ``_``, ``\\frac``,
``\\sqrt`` and their braces/brackets) sit on the level that owns them. The decoder's start/stop/padding tokens
get their own flags (``SOS``, ``EOS``, ``PAD``). Example, ``a ^ { 2 }``: a, ^, {, } -> [TOKEN]; 2 -> [ABOVE,
TOKEN].

What the official ``Pos_Former/datamodule/label_make_muti.py`` derives from the paths, and this module does:

- decoder input code of a position: its path cut or zero-padded to 5 entries (``input_codes``);
- targets at decoder position t (the token the row predicts there, i.e. input t + 1; the last position takes the
  start token's path, as the official rotation does): nesting level = len(path) - 1 (at most 4) and the relation
  to its parent level = path[-2] (path[0] when the path has one entry; path[3] when it is longer than 5)
  (``level_position_targets``).

An R2L row is read in reading order (the official reverses the row, walks it, and reverses the result). Captions
whose braces do not match (which the official walk garbles) take the unmatched structure token as a plain token.
"""
from __future__ import annotations

from typing import Sequence

PAD, SOS, EOS, TOKEN, ABOVE, BELOW = range(6)
CODE_LENGTH = 5  # entries of the decoder's input code (official: 5)
NUM_LEVELS = 5   # level classes (0..4)
NUM_RELATIONS = 6


def _match(symbols: Sequence[str], open_at: int, end: int, opening: str, closing: str) -> int | None:
    """Index of the bracket closing the one at ``open_at``, searching before ``end``; None when it is missing."""
    if open_at >= end or symbols[open_at] != opening:
        return None
    depth = 0
    for j in range(open_at, end):
        if symbols[j] == opening:
            depth += 1
        elif symbols[j] == closing:
            depth -= 1
            if depth == 0:
                return j
    return None


def _walk(symbols: Sequence[str], start: int, end: int, paths: list[list[int]], specials: dict[str, int]) -> None:
    """Append this level's relation to every token strictly between ``start`` and ``end``, then recurse into
    the groups this level opens."""
    i = start + 1
    while i < end:
        s = symbols[i]
        groups: list[tuple[int, int, int]] = []  # (open index, close index, relation of the inside)
        if s in ("^", "_"):
            close = _match(symbols, i + 1, end, "{", "}")
            if close is not None:
                groups = [(i + 1, close, ABOVE if s == "^" else BELOW)]
        elif s == "\\frac":
            close1 = _match(symbols, i + 1, end, "{", "}")
            close2 = None if close1 is None else _match(symbols, close1 + 1, end, "{", "}")
            if close2 is not None:
                groups = [(i + 1, close1, ABOVE), (close1 + 1, close2, BELOW)]
        elif s == "\\sqrt":
            if i + 1 < end and symbols[i + 1] == "[":
                close1 = _match(symbols, i + 1, end, "[", "]")
                close2 = None if close1 is None else _match(symbols, close1 + 1, end, "{", "}")
                if close2 is not None:
                    groups = [(i + 1, close1, ABOVE), (close1 + 1, close2, BELOW)]
            else:
                close = _match(symbols, i + 1, end, "{", "}")
                if close is not None:
                    groups = [(i + 1, close, BELOW)]
        if not groups:
            paths[i].append(specials.get(s, TOKEN))
            i += 1
            continue
        paths[i].append(TOKEN)
        for open_at, close, relation in groups:
            paths[open_at].append(TOKEN)
            paths[close].append(TOKEN)
            for j in range(open_at + 1, close):
                paths[j].append(relation)
        for open_at, close, _ in groups:
            _walk(symbols, open_at, close, paths, specials)
        i = groups[-1][1] + 1


def forest_paths(symbols: Sequence[str], reverse: bool = False, pad: str = "<pad>", sos: str = "<sos>",
                 eos: str = "<eos>") -> list[list[int]]:
    """The path of every position of a row of symbols (a caption, or a decoder input row with its start token
    and padding). ``reverse``: the row is in R2L order (paths are computed in reading order, returned in row
    order)."""
    row = list(symbols)[::-1] if reverse else list(symbols)
    paths: list[list[int]] = [[] for _ in row]
    _walk(row, -1, len(row), paths, {pad: PAD, sos: SOS, eos: EOS})
    return paths[::-1] if reverse else paths


def input_codes(paths: Sequence[Sequence[int]]) -> list[list[int]]:
    """Each path cut or zero-padded to ``CODE_LENGTH`` entries: the position decoder's input [L, 5]."""
    return [list(p[:CODE_LENGTH]) + [0] * (CODE_LENGTH - len(p[:CODE_LENGTH])) for p in paths]


def level_position_targets(paths: Sequence[Sequence[int]]) -> tuple[list[int], list[int]]:
    """(nesting level, relation) targets of every decoder position from the paths of its input row."""
    rotated = list(paths[1:]) + list(paths[:1])  # position t predicts input t + 1; the start token's path wraps
    levels, relations = [], []
    for p in rotated:
        if len(p) == 1:
            levels.append(0)
            relations.append(p[0])
        elif len(p) <= CODE_LENGTH:
            levels.append(len(p) - 1)
            relations.append(p[-2])
        else:
            levels.append(NUM_LEVELS - 1)
            relations.append(p[3])
    return levels, relations
