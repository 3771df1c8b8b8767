"""LaTeX <-> caption tokens, in the conventions of the shipped CROHME captions (``data/crohme/*/caption.txt``).

:func:`tokenize` turns raw LaTeX (an InkML ``truth``, a MathWriting ``normalizedLabel``, a user's caption) into the
space-separated tokens CROHME-trained models read; :func:`to_latex` turns tokens back into LaTeX that compiles.

The conventions, learnt from the captions (``tools/measure_latex_tokenizer.py`` measures them against the CROHME
2016 and 2019 test InkML; docs/data.md has the figure):

- one token per character, or per control word (``\\frac``, ``\\alpha``), or per control symbol (``\\{``);
- a sub- or superscript whose argument is a single token gets braces (``n_a`` -> ``n _ { a }``), but nothing else
  does: ``\\frac h2`` stays ``\\frac h 2``, ``\\sqrt2`` stays ``\\sqrt 2``;
- ``'`` is ``\\prime``; ``\\left(`` / ``\\right)`` keep only the delimiter (``\\left.`` keeps nothing);
- ``\\limits`` is kept; spacing (``\\,`` ``\\;`` ``\\quad`` ``~`` ...), sizing (``\\big``, ``\\displaystyle``)
  and font wrappers (``\\mathrm{..}``, ``\\mbox{..}``, ``\\text{..}``: the wrapper and its braces) are dropped;
- synonyms become the captions' spelling (``\\le`` -> ``\\leq``, ``\\to`` -> ``\\rightarrow``, ``\\lt`` -> ``<``).

``tokenize(latex, style="wap")`` normalises further, as WAP's ``train``/``2014`` captions do (:func:`wap_style`).
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence

# a control word, a control symbol, or any other single non-space character
_LEXEME = re.compile(r"\\[A-Za-z]+|\\[^A-Za-z]|\S", re.DOTALL)

# dropped outright (they change spacing or size, never the expression)
SPACING = frozenset({"\\,", "\\;", "\\:", "\\!", "\\ ", "\\>", "~", "\\quad", "\\qquad", "\\enspace", "\\thinspace",
                     "\\medspace", "\\thickspace", "\\negthinspace", "\\hfill"})
SIZING = frozenset({"\\displaystyle", "\\textstyle", "\\scriptstyle", "\\scriptscriptstyle", "\\big", "\\Big",
                    "\\bigg", "\\Bigg", "\\bigl", "\\bigr", "\\Bigl", "\\Bigr", "\\biggl", "\\biggr", "\\Biggl",
                    "\\Biggr", "\\bigm", "\\Bigm", "\\nolimits"})
# wrappers whose braces go with them: their content stays, tokenised like the rest
WRAPPERS = frozenset({"\\mathrm", "\\mbox", "\\text", "\\textrm", "\\mathit", "\\mathbf", "\\mathsf", "\\mathtt",
                      "\\textit", "\\textbf", "\\hbox", "\\rm", "\\it", "\\bf", "\\mathnormal"})
# \operatorname{sin} and \mathrm{sin} name a function the captions spell as one token
FUNCTIONS = frozenset({"\\sin", "\\cos", "\\tan", "\\log", "\\lim", "\\ln", "\\exp", "\\sec", "\\csc", "\\cot",
                       "\\max", "\\min", "\\det", "\\arcsin", "\\arccos", "\\arctan", "\\sinh", "\\cosh", "\\tanh",
                       "\\sup", "\\inf", "\\gcd", "\\deg", "\\dim", "\\ker", "\\arg", "\\lg"})
SYNONYMS = {
    "'": "\\prime", "\\lt": "<", "\\gt": ">", "\\le": "\\leq", "\\ge": "\\geq", "\\leqslant": "\\leq",
    "\\geqslant": "\\geq", "\\ne": "\\neq", "\\to": "\\rightarrow", "\\dots": "\\ldots", "\\dotsc": "\\ldots",
    "\\dotsb": "\\cdots", "\\cdotp": "\\cdot", "\\lbrace": "\\{", "\\rbrace": "\\}", "\\lbrack": "[",
    "\\rbrack": "]", "\\vert": "|", "\\mid": "|", "\\lvert": "|", "\\rvert": "|", "\\dfrac": "\\frac",
    "\\tfrac": "\\frac", "\\lparen": "(", "\\rparen": ")", "\\vartheta": "\\theta", "\\varphi": "\\phi",
    # characters a label may carry instead of their command
    "\u00d7": "\\times", "\u00f7": "\\div", "\u2212": "-", "\u2264": "\\leq", "\u2265": "\\geq", "\u2260": "\\neq",
    "\u00b1": "\\pm", "\u221e": "\\infty", "\u2192": "\\rightarrow", "\u03c0": "\\pi", "\u03b1": "\\alpha",
    "\u03b2": "\\beta", "\u03b8": "\\theta", "\u2026": "\\ldots", "\u22c5": "\\cdot", "\u00b7": "\\cdot",
    "\u2032": "\\prime",
}
# more than one caption token
EXPANSIONS = {"\\parallel": ("|", "|"), "\\Vert": ("|", "|"), "\\|": ("|", "|")}
SCRIPTS = ("^", "_")


def lex(latex: str) -> list[str]:
    """The raw lexemes of a LaTeX string: math delimiters, stray ``$`` and a dangling ``\\`` dropped."""
    text = latex.strip()
    for opening, closing in (("\\[", "\\]"), ("\\(", "\\)")):
        if text.startswith(opening) and text.endswith(closing):
            text = text[len(opening): len(text) - len(closing)]
    return [t for t in _LEXEME.findall(text) if t not in ("$", "\\")]


def _group_end(lexemes: Sequence[str], start: int) -> int:
    """Index of the ``}`` closing the ``{`` at ``start`` (the last index when it is never closed)."""
    depth = 0
    for j in range(start, len(lexemes)):
        depth += lexemes[j] == "{"
        depth -= lexemes[j] == "}"
        if depth == 0:
            return j
    return len(lexemes) - 1


def _unwrap(lexemes: list[str]) -> list[str]:
    """Removes wrappers with their braces; ``\\operatorname{sin}`` / ``\\mathrm{sin}`` become ``\\sin``."""
    out: list[str] = []
    i = 0
    while i < len(lexemes):
        lexeme = lexemes[i]
        if lexeme in WRAPPERS or lexeme == "\\operatorname":
            if i + 1 < len(lexemes) and lexemes[i + 1] == "{":
                end = _group_end(lexemes, i + 1)
                inner = lexemes[i + 2: end]
                word = "\\" + "".join(inner)
                if inner and all(t.isalpha() and len(t) == 1 for t in inner) and word in FUNCTIONS:
                    out.append(word)
                else:
                    out.extend(_unwrap(inner))
                i = end + 1
                continue
            i += 1  # a wrapper without braces (\rm x): only the command goes
            continue
        out.append(lexeme)
        i += 1
    return out


def _normalise(lexemes: Iterable[str]) -> list[str]:
    """Drops spacing, sizing and ``\\left``/``\\right`` (with an invisible ``.`` delimiter); maps synonyms."""
    out: list[str] = []
    pending_delimiter = False
    for lexeme in lexemes:
        if pending_delimiter:
            pending_delimiter = False
            if lexeme == ".":
                continue
        if lexeme in ("\\left", "\\right"):
            pending_delimiter = True
            continue
        if lexeme in SPACING or lexeme in SIZING:
            continue
        if lexeme in EXPANSIONS:
            out.extend(EXPANSIONS[lexeme])
            continue
        out.append(SYNONYMS.get(lexeme, lexeme))
    return out


def _atom_end(tokens: Sequence[str], j: int) -> int:
    """The index after the atom starting at ``j``: a braced group, a command with its arguments, or one token."""
    if j >= len(tokens):
        return j
    if tokens[j] == "{":
        return _group_end(tokens, j) + 1
    end = j + 1
    if tokens[j] == "\\sqrt" and end < len(tokens) and tokens[end] == "[":
        depth = 0
        for k in range(end, len(tokens)):
            depth += (tokens[k] == "[") - (tokens[k] == "]")
            if depth == 0:
                end = k + 1
                break
    for _ in range(ARITY.get(tokens[j], 0)):
        end = _atom_end(tokens, end)
    return end


def _brace_scripts(tokens: list[str]) -> list[str]:
    """``^ x`` -> ``^ { x }``: an unbraced script argument gets braces, all of it (``^ \\frac 1 2`` ->
    ``^ { \\frac 1 2 }``); a braced one is left as it is."""
    out: list[str] = []
    i = 0
    while i < len(tokens):
        out.append(tokens[i])
        if tokens[i] in SCRIPTS and i + 1 < len(tokens) and tokens[i + 1] not in ("{", "}", "^", "_"):
            end = _atom_end(tokens, i + 1)
            out.extend(("{", *_brace_scripts(tokens[i + 1: end]), "}"))
            i = end
            continue
        i += 1
    return out


STYLES = ("crohme", "wap")


def tokenize(latex: str, style: str = "crohme") -> list[str]:
    """Raw LaTeX -> caption tokens (see the module docstring for the conventions).

    ``style="wap"`` normalises further, as WAP's captions (the shipped ``train`` and ``2014``) do: every
    ``\\frac``/``\\sqrt`` argument braced, braces that group nothing removed, ``_`` before ``^``, no ``\\limits``.
    """
    if style not in STYLES:
        raise ValueError(f"unknown LaTeX token style '{style}' (known: {', '.join(STYLES)})")
    tokens = _brace_scripts(_normalise(_unwrap(lex(latex))))
    return wap_style(tokens) if style == "wap" else tokens


def wap_style(tokens: Sequence[str]) -> list[str]:
    """Tokens in WAP's normal form: ``\\frac h 2`` -> ``\\frac { h } { 2 }``, ``{ v _ { 1 } } ^ { 2 }`` ->
    ``v _ { 1 } ^ { 2 }``, ``x ^ { 2 } _ { 3 }`` -> ``x _ { 3 } ^ { 2 }``, ``\\sum \\limits`` -> ``\\sum``."""
    tokens = [t for t in tokens if t != "\\limits"]
    out: list[str] = []
    i = 0
    while i < len(tokens):
        part, i = _wap_items(tokens, i)
        out.extend(part)
        i += 1  # a stray "}" (or "]") at the top level is dropped
    return out


def _wap_items(tokens: Sequence[str], i: int, stop: str = "}") -> tuple[list[str], int]:
    out: list[str] = []
    while i < len(tokens) and tokens[i] not in ("}", stop):
        if tokens[i] in SCRIPTS:
            base: list[str] = []  # a script with no base
        else:
            base, i = _wap_atom(tokens, i, as_base=True)
        scripts: dict[str, list[str]] = {}
        while i < len(tokens) and tokens[i] in SCRIPTS and tokens[i] not in scripts:
            scripts[tokens[i]], i = _wap_atom(tokens, i + 1, as_base=False)
        out.extend(base)
        for script in ("_", "^"):
            if script in scripts:
                out.extend((script, "{", *scripts[script], "}"))
    return out, i


def _wap_atom(tokens: Sequence[str], i: int, as_base: bool) -> tuple[list[str], int]:
    """An atom's tokens; a group is returned without its braces (an argument's caller adds them back)."""
    if i >= len(tokens) or tokens[i] in ("}",) + SCRIPTS:
        return [], i
    token = tokens[i]
    if token == "{":
        inner, j = _wap_items(tokens, i + 1)
        j += j < len(tokens)
        return (inner or ["{", "}"]) if as_base else inner, j
    out, i = [token], i + 1
    if token == "\\sqrt" and i < len(tokens) and tokens[i] == "[":
        inner, i = _wap_items(tokens, i + 1, stop="]")
        out.extend(("[", *inner, "]"))
        i += i < len(tokens)
    for _ in range(ARITY.get(token, 0)):
        argument, i = _wap_atom(tokens, i, as_base=False)
        out.extend(("{", *argument, "}"))
    return out, i


def is_tokenized(caption: str) -> bool:
    """Whether a caption already reads as space-separated tokens: every word is one lexeme.

    ``x ^ { 2 }`` and ``x ^ 2`` are tokens (kept as written); ``x^2``, ``\\frac{a}{b}``, ``12`` are not.
    """
    tokens = caption.split()
    return bool(tokens) and all(len(_LEXEME.findall(t)) == 1 for t in tokens)


def tokens_of(caption: str) -> list[str]:
    """A caption's tokens: its space-separated words when it is tokenised already, else :func:`tokenize`."""
    return caption.split() if is_tokenized(caption) else tokenize(caption)


# --- tokens -> LaTeX ------------------------------------------------------------------------------------------
# operators \limits may follow; after anything else it is a LaTeX error
LIMITS_OPERATORS = frozenset({"\\sum", "\\int", "\\lim", "\\prod", "\\oint", "\\iint", "\\iiint", "\\bigcup",
                              "\\bigcap", "\\coprod", "\\max", "\\min", "\\sup", "\\inf", "\\limsup", "\\liminf",
                              "\\det", "\\gcd"})
# commands and the number of (mandatory) arguments they take
ARITY = {"\\frac": 2, "\\sqrt": 1, "\\binom": 2, "\\overline": 1, "\\underline": 1, "\\hat": 1, "\\bar": 1,
         "\\vec": 1, "\\dot": 1, "\\ddot": 1, "\\tilde": 1, "\\widehat": 1, "\\widetilde": 1, "\\mathbb": 1,
         "\\mathcal": 1}
# characters with a meaning of their own in LaTeX source; \left and \right need a partner the tokens never carry
_ESCAPES = {"#": "\\#", "%": "\\%", "&": "\\&", "$": "\\$"}
_DROPPED = frozenset({"\\left", "\\right"})
_EMPTY = ["{", "}"]


def to_latex(tokens: Sequence[str] | str) -> str:
    """Caption tokens (a list or a space-separated string) -> a math-mode LaTeX string that compiles.

    For a well-formed caption this is the tokens joined by spaces (``to_latex(t).split() == t``). What a
    recognizer can get wrong is repaired so the string still compiles: an unclosed ``{`` is closed and a stray
    ``}`` dropped, a command or script without its argument gets ``{ }``, a second script of one kind on one base
    gets an empty base (``x ^ { 2 } ^ { 3 }`` -> ``x ^ { 2 } { } ^ { 3 }``), ``\\limits`` after anything but an
    operator is dropped, and ``# % & $`` are escaped.
    """
    source = [t for t in (tokens.split() if isinstance(tokens, str) else tokens) if t not in _DROPPED]
    out: list[str] = []
    i = 0
    while i < len(source):
        part, i = _expression(source, i, stop=())
        out.extend(part)
        if i < len(source):  # a stray closing token at the top level
            i += 1
    return " ".join(out)


def _expression(source: Sequence[str], i: int, stop: tuple[str, ...]) -> tuple[list[str], int]:
    """Items up to a ``}`` (or a token in ``stop``) or the end; returns them and the index of what stopped it."""
    out: list[str] = []
    while i < len(source) and source[i] != "}" and source[i] not in stop:
        if source[i] in SCRIPTS:  # a script with no base: LaTeX accepts it
            atom: list[str] = []
        else:
            atom, i = _atom(source, i)
        out.extend(atom)
        if len(atom) == 1 and atom[0] in LIMITS_OPERATORS and i < len(source) and source[i] == "\\limits":
            out.append("\\limits")
            while i < len(source) and source[i] == "\\limits":
                i += 1
        seen: set[str] = set()
        while i < len(source) and source[i] in SCRIPTS:
            if source[i] in seen:
                out.extend(_EMPTY)
                seen = set()
            seen.add(source[i])
            out.append(source[i])
            argument, i = _atom(source, i + 1)
            out.extend(argument)
    return out, i


def _atom(source: Sequence[str], i: int) -> tuple[list[str], int]:
    """One atom at ``i`` (a braced group, a command with its arguments, a token); ``{ }`` when there is none."""
    while i < len(source) and source[i] == "\\limits":
        i += 1  # \limits with no operator before it
    if i >= len(source) or source[i] in ("}",) + SCRIPTS:
        return list(_EMPTY), i
    token = source[i]
    if token == "{":
        inner, j = _expression(source, i + 1, stop=())
        return ["{", *inner, "}"], (j + 1 if j < len(source) else j)
    out = [_ESCAPES.get(token, token)]
    i += 1
    if token == "\\sqrt" and i < len(source) and source[i] == "[":
        inner, i = _expression(source, i + 1, stop=("]",))
        out.extend(["[", *inner, "]"])
        i += i < len(source) and source[i] == "]"
    for _ in range(ARITY.get(token, 0)):
        argument, i = _atom(source, i)
        out.extend(argument)
    return out, i
