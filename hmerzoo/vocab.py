"""Token vocabulary: special tokens first, then a dictionary file's tokens in file order.

Two dictionary formats are read: one token per line (BTTR/CoMER), or ``token<whitespace>id`` per line (the WAP
family: ABM, CAN), whose ids give the order and may already include the start/stop tokens (ABM: ``sos`` 0,
``eos`` 1, no padding token; such a vocabulary uses ``specials: []`` and ``roles`` naming those tokens).
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

from .errors import DataError, did_you_mean

DEFAULT_SPECIALS = ("<pad>", "<sos>", "<eos>")
# Roles a special token can play; the vocabulary exposes their ids as pad_id, sos_id, eos_id.
ROLE_TOKENS = {"pad": "<pad>", "sos": "<sos>", "eos": "<eos>"}


class Vocabulary:
    """Maps LaTeX tokens to ids and back.

    ``tokens`` is the complete id -> token list. The ids of the roles pad/sos/eos are looked up by token
    (``<pad>``, ``<sos>``, ``<eos>`` unless ``roles`` says otherwise); ``pad_id`` is ``None`` for vocabularies
    without padding (ABM).
    """

    def __init__(self, tokens: Sequence[str], roles: dict[str, str] | None = None):
        self.tokens = list(tokens)
        self.token_to_id: dict[str, int] = {}
        for i, tok in enumerate(self.tokens):
            if tok in self.token_to_id:
                raise DataError(f"vocabulary: token '{tok}' appears twice (ids {self.token_to_id[tok]} and {i})")
            self.token_to_id[tok] = i
        self.roles = dict(ROLE_TOKENS, **(roles or {}))
        for role in ("sos", "eos"):
            if self.roles[role] not in self.token_to_id:
                raise DataError(f"vocabulary: the {role} token '{self.roles[role]}' is missing")

    # ids of the special roles
    @property
    def pad_id(self) -> int | None:
        return self.token_to_id.get(self.roles["pad"])

    @property
    def sos_id(self) -> int:
        return self.token_to_id[self.roles["sos"]]

    @property
    def eos_id(self) -> int:
        return self.token_to_id[self.roles["eos"]]

    @property
    def special_ids(self) -> dict[str, int | None]:
        return {"pad_id": self.pad_id, "sos_id": self.sos_id, "eos_id": self.eos_id}

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: object) -> bool:
        return token in self.token_to_id

    @classmethod
    def from_dictionary(cls, path: str, specials: Iterable[str] = DEFAULT_SPECIALS,
                        roles: dict[str, str] | None = None) -> "Vocabulary":
        """``specials`` (ids 0, 1, ...) followed by the file's tokens: in file order (one token per line), or in
        id order when every line is ``token id`` (the WAP/ABM/CAN format; the ids must be 0..N-1)."""
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as e:
            raise DataError(f"dictionary {path}: cannot read it ({e.strerror}); set vocab.dictionary to a file "
                            "with one token per line") from None
        # (line number, fields) of the non-blank lines; blank ones are tolerated (a trailing newline, mostly)
        entries = [(lineno, line.split()) for lineno, line in enumerate(lines, 1) if line.strip()]
        if entries and all(len(f) == 2 and _is_int(f[1]) for _, f in entries):
            file_tokens = _tokens_by_id(path, entries)
        else:
            file_tokens = []
            for lineno, fields in entries:
                if len(fields) != 1:
                    raise DataError(f"{path}:{lineno}: expected one token per line (or 'token id' on every line), "
                                    f"got '{lines[lineno - 1]}'")
                file_tokens.append(fields[0])
        tokens = list(specials)
        for tok in file_tokens:
            if tok in tokens:
                raise DataError(f"{path}: token '{tok}' appears twice (counting vocab.specials)")
            tokens.append(tok)
        return cls(tokens, roles)

    def encode(self, tokens: Sequence[str] | str, where: str = "") -> list[int]:
        """Token list (or space-separated string) -> ids. Unknown tokens raise naming ``where``."""
        if isinstance(tokens, str):
            tokens = tokens.split()
        ids = []
        for tok in tokens:
            i = self.token_to_id.get(tok)
            if i is None:
                raise DataError(f"{where + ': ' if where else ''}token '{tok}' is not in the vocabulary"
                                f"{did_you_mean(tok, self.tokens)}")
            ids.append(i)
        return ids

    def decode(self, ids: Iterable[int], strip_specials: bool = True) -> list[str]:
        special = {self.pad_id, self.sos_id, self.eos_id} if strip_specials else set()
        return [self.tokens[i] for i in ids if i not in special]

    def to_latex(self, ids: Iterable[int]) -> str:
        return " ".join(self.decode(ids))

    # persistence: a run directory stores vocab.json so a model never depends on the data root
    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "roles": self.roles}

    @classmethod
    def from_dict(cls, d: dict) -> "Vocabulary":
        return cls(d["tokens"], d.get("roles"))

    def save(self, path: str) -> None:
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, ensure_ascii=False, indent=1)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "Vocabulary":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.tokens == other.tokens and self.roles == other.roles

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} tokens, pad={self.pad_id}, sos={self.sos_id}, eos={self.eos_id})"


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _tokens_by_id(path: str, entries: list[tuple[int, list[str]]]) -> list[str]:
    """Tokens of a ``token id`` dictionary in id order; the ids must be exactly 0..N-1."""
    by_id: dict[int, str] = {}
    for lineno, (tok, text) in entries:
        i = int(text)
        if i in by_id:
            raise DataError(f"{path}:{lineno}: id {i} of '{tok}' is already used by '{by_id[i]}'")
        by_id[i] = tok
    missing = sorted(set(range(len(by_id))) - set(by_id))
    if missing:
        raise DataError(f"{path}: the ids must run from 0 to {len(by_id) - 1} without gaps; id {missing[0]} "
                        "is missing")
    return [by_id[i] for i in range(len(by_id))]
