"""Token vocabulary: special tokens first, then a dictionary file's tokens in file order."""
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
        """``specials`` (ids 0, 1, ...) followed by the file's tokens, one per line, in file order."""
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as e:
            raise DataError(f"dictionary {path}: cannot read it ({e.strerror}); set vocab.dictionary to a file "
                            "with one token per line") from None
        tokens = list(specials)
        for lineno, line in enumerate(lines, 1):
            tok = line.strip()
            if not tok:
                continue  # tolerate blank lines (a trailing newline, mostly)
            if len(tok.split()) != 1:
                raise DataError(f"{path}:{lineno}: expected one token per line, got '{line}'")
            if tok in tokens:
                raise DataError(f"{path}:{lineno}: token '{tok}' appears twice")
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
