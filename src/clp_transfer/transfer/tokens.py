"""Canonical token matching across tokenizer families.

Vocabularies spell the same piece differently:

=================  ===============  ================  =====================
family             word start       continuation      raw bytes
=================  ===============  ================  =====================
byte-level BPE     ``Ġhaus``        ``haus``          ``Ã¤`` (byte->unicode)
SentencePiece      ``▁haus``        ``haus``          ``<0xC3>``
WordPiece          ``haus``         ``##haus``        (none)
=================  ===============  ================  =====================

Each token is turned into a :class:`CanonicalToken` — the UTF-8 bytes it stands for, with a leading space
when it starts a word — and two vocabularies are matched on that key. Special tokens are matched by role
(bos/eos/pad/unk), never by their spelling. Everything here is pure Python on vocabularies; reading them
from a tokenizer lives in :func:`VocabInfo.from_tokenizer`.
"""

from __future__ import annotations

import enum
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterable

SPECIAL_ROLES = ("bos", "eos", "pad", "unk")


class TokenizerStyle(str, enum.Enum):
    BYTE_LEVEL = "byte_level_bpe"
    SENTENCEPIECE = "sentencepiece"
    WORDPIECE = "wordpiece"
    PLAIN = "plain"


class TokenKind(str, enum.Enum):
    NORMAL = "normal"
    BYTE = "byte"  # a single raw byte, e.g. SentencePiece byte fallback <0xC3>
    SPECIAL = "special"  # control tokens: matched by role, never by text


@dataclass(frozen=True)
class CanonicalToken:
    """What a vocabulary entry stands for, independent of the tokenizer family's spelling."""

    text: bytes
    """UTF-8 bytes of the piece, with a leading space when the piece starts a word."""
    kind: TokenKind = TokenKind.NORMAL


@lru_cache(maxsize=1)
def byte_level_decoder() -> dict[str, int]:
    """The reverse of the byte -> printable-unicode table of byte-level BPE (GPT-2 and descendants).

    Printable Latin-1 bytes stand for themselves; the 68 others are shifted to code points 256 and up, in
    byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table: dict[str, int] = {chr(b): b for b in printable}
    shift = 0
    for b in range(256):
        if b not in table.values():
            table[chr(256 + shift)] = b
            shift += 1
    return table


_SP_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def canonicalize(token: str, style: TokenizerStyle) -> CanonicalToken | None:
    """Canonical form of a non-special token, or ``None`` when the spelling is not valid for ``style``."""
    if style is TokenizerStyle.BYTE_LEVEL:
        table = byte_level_decoder()
        try:
            raw = bytes(table[ch] for ch in token)
        except KeyError:
            return None  # e.g. an added token in plain text
        return CanonicalToken(raw, TokenKind.BYTE if len(raw) == 1 and raw[0] >= 0x80 else TokenKind.NORMAL)
    if style is TokenizerStyle.SENTENCEPIECE:
        m = _SP_BYTE.match(token)
        if m:
            return CanonicalToken(bytes([int(m.group(1), 16)]), TokenKind.BYTE)
        return CanonicalToken(token.replace("\u2581", " ").encode("utf-8"))
    if style is TokenizerStyle.WORDPIECE:
        if token.startswith("##"):
            return CanonicalToken(token[2:].encode("utf-8"))
        # A word-initial WordPiece token is preceded by a space in running text unless it is punctuation,
        # which BERT's pre-tokenizer splits off without one.
        if token and all(not ch.isalnum() for ch in token):
            return CanonicalToken(token.encode("utf-8"))
        return CanonicalToken(b" " + token.encode("utf-8"))
    return CanonicalToken(token.encode("utf-8"))


def detect_style(tokens: Iterable[str], tokenizer_json: dict[str, Any] | None = None) -> TokenizerStyle:
    """Guess the family from the tokenizer's JSON spec when there is one, else from marker frequencies."""
    if tokenizer_json:
        blob = json.dumps({k: tokenizer_json.get(k) for k in ("pre_tokenizer", "decoder", "normalizer")},
                          ensure_ascii=False)
        model_type = (tokenizer_json.get("model") or {}).get("type")
        if '"ByteLevel"' in blob:
            return TokenizerStyle.BYTE_LEVEL
        if model_type == "WordPiece" or '"WordPiece"' in blob:
            return TokenizerStyle.WORDPIECE
        if "\u2581" in blob or '"Metaspace"' in blob:
            return TokenizerStyle.SENTENCEPIECE
    counts: Counter[str] = Counter()
    n = 0
    for t in tokens:
        n += 1
        if t.startswith("\u0120"):
            counts["byte"] += 1
        elif t.startswith("\u2581"):
            counts["sp"] += 1
        elif t.startswith("##"):
            counts["wp"] += 1
    if not n:
        return TokenizerStyle.PLAIN
    best, c = max(counts.items(), key=lambda kv: kv[1], default=("plain", 0))
    if c < 0.05 * n:
        return TokenizerStyle.PLAIN
    return {"byte": TokenizerStyle.BYTE_LEVEL, "sp": TokenizerStyle.SENTENCEPIECE, "wp": TokenizerStyle.WORDPIECE}[best]


@dataclass
class VocabInfo:
    """A vocabulary as the matcher needs it: token strings by id, family, special ids and roles."""

    tokens: list[str | None]
    """Token string of every id (``None`` for ids that no token uses)."""
    style: TokenizerStyle
    """Tokenizer family, deciding how strings are canonicalised."""
    special_ids: set[int] = field(default_factory=set)
    """Ids of control tokens (bos, eos, pad, unk, chat markers, ...)."""
    roles: dict[str, int] = field(default_factory=dict)
    """Role ('bos', 'eos', 'pad', 'unk') -> id, for the roles the tokenizer defines."""

    def __len__(self) -> int:
        return len(self.tokens)

    def canonical(self) -> list[CanonicalToken | None]:
        out: list[CanonicalToken | None] = []
        for i, tok in enumerate(self.tokens):
            if tok is None:
                out.append(None)
            elif i in self.special_ids:
                out.append(CanonicalToken(tok.encode("utf-8"), TokenKind.SPECIAL))
            else:
                out.append(canonicalize(tok, self.style))
        return out

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> "VocabInfo":
        """Read a Hugging Face tokenizer (fast or slow)."""
        vocab = tokenizer.get_vocab()
        size = max(len(tokenizer), max(vocab.values(), default=-1) + 1)
        tokens: list[str | None] = [None] * size
        for tok, i in vocab.items():
            tokens[i] = tok
        spec = None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            spec = json.loads(backend.to_str())
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        if spec:
            special |= {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
        # Byte-fallback pieces are ordinary vocabulary even where a tokenizer flags them as special.
        special = {i for i in special if i < size and not (tokens[i] and _SP_BYTE.match(tokens[i] or ""))}
        roles = {}
        for role in SPECIAL_ROLES:
            tid = getattr(tokenizer, f"{role}_token_id", None)
            if tid is not None:
                roles[role] = int(tid)
                special.add(int(tid))
        return cls(tokens, detect_style((t for t in tokens if t), spec), special, roles)


class MatchRule(str, enum.Enum):
    SPECIAL_ROLE = "special_role"  # same role (bos/eos/pad/unk)
    SPECIAL_TEXT = "special_text"  # another control token with the same spelling, e.g. <|im_start|>
    EXACT = "exact"  # same string in both vocabularies and the same meaning
    CANONICAL = "canonical"  # same bytes and word-start after canonicalisation


@dataclass
class TokenMatch:
    """Which target ids reuse which source row, and by which rule."""

    source_id: list[int]
    """For each target id: the source id whose row it copies, or -1 when the token is new."""
    rule: list[MatchRule | None]
    """For each target id: the rule that matched it (``None`` for new tokens)."""

    @property
    def shared_ids(self) -> list[int]:
        return [i for i, s in enumerate(self.source_id) if s >= 0]

    @property
    def missing_ids(self) -> list[int]:
        return [i for i, s in enumerate(self.source_id) if s < 0]

    def counts(self) -> dict[str, int]:
        c = Counter(r.value for r in self.rule if r is not None)
        out = {rule.value: c.get(rule.value, 0) for rule in MatchRule}
        out["shared"] = sum(out.values())
        out["missing"] = len(self.source_id) - out["shared"]
        return out


def _source_lookup(source: VocabInfo, canon: list[CanonicalToken | None]) -> dict[bytes, int]:
    """Canonical bytes -> source id; on collisions prefer a normal piece over a byte token, then the lower id."""
    lookup: dict[bytes, int] = {}
    for i, c in enumerate(canon):
        if c is None or c.kind is TokenKind.SPECIAL:
            continue
        j = lookup.get(c.text)
        if j is None or (canon[j].kind is TokenKind.BYTE and c.kind is not TokenKind.BYTE):  # type: ignore[union-attr]
            lookup[c.text] = i
    return lookup


def match_vocabularies(target: VocabInfo, source: VocabInfo, canonical: bool = True) -> TokenMatch:
    """Match every target token to a source token (or none).

    ``canonical=False`` reproduces the original implementation's raw string equality (for ablations);
    special tokens are matched by role either way.
    """
    src_canon = source.canonical()
    tgt_canon = target.canonical()
    by_text = _source_lookup(source, src_canon)
    src_special_text = {source.tokens[i]: i for i in source.special_ids if source.tokens[i] is not None}
    src_raw = {t: i for i, t in enumerate(source.tokens) if t is not None and i not in source.special_ids}
    # One id may hold several roles (pad = eos is common): the more important role decides its row.
    priority = ("pad", "unk", "bos", "eos")
    role_of = {target.roles[r]: r for r in priority if r in target.roles}

    source_id = [-1] * len(target)
    rule: list[MatchRule | None] = [None] * len(target)
    for i, tok in enumerate(target.tokens):
        if tok is None:
            continue
        if i in target.special_ids:
            role = role_of.get(i)
            if role and role in source.roles:
                source_id[i], rule[i] = source.roles[role], MatchRule.SPECIAL_ROLE
            elif role is None and tok in src_special_text:
                source_id[i], rule[i] = src_special_text[tok], MatchRule.SPECIAL_TEXT
            continue
        if not canonical:
            if tok in src_raw:
                source_id[i], rule[i] = src_raw[tok], MatchRule.EXACT
            continue
        c = tgt_canon[i]
        if c is None:
            continue
        j = by_text.get(c.text)
        if j is None:
            continue
        source_id[i] = j
        rule[i] = MatchRule.EXACT if source.tokens[j] == tok else MatchRule.CANONICAL
    return TokenMatch(source_id, rule)


def decompose(target: VocabInfo, source: VocabInfo) -> list[list[int]]:
    """Split every target token into source tokens covering its bytes (for FVT-style initialisation).

    Uses the segmentation with the fewest pieces (dynamic programming over canonical bytes, so the
    word-start space stays attached to the first piece). Bytes that no source token covers are skipped;
    a target token none of whose bytes are covered gets ``[]``. Special tokens get ``[]``.
    """
    src_canon = source.canonical()
    by_text = _source_lookup(source, src_canon)
    max_len = max((len(k) for k in by_text), default=1)
    out: list[list[int]] = []
    for c in target.canonical():
        if c is None or c.kind is TokenKind.SPECIAL or not c.text:
            out.append([])
            continue
        b = c.text
        n = len(b)
        # best[i] = (pieces, skipped bytes) for the prefix b[:i]; fewer skipped bytes first, then fewer pieces.
        inf = (10**9, 10**9)
        best: list[tuple[int, int]] = [inf] * (n + 1)
        back: list[tuple[int, int]] = [(-1, -1)] * (n + 1)  # (previous position, source id or -1 for a skip)
        best[0] = (0, 0)
        for i in range(n):
            if best[i] == inf:
                continue
            skipped, pieces = best[i]
            cand = (skipped + 1, pieces)
            if cand < best[i + 1]:
                best[i + 1], back[i + 1] = cand, (i, -1)
            for j in range(i + 1, min(n, i + max_len) + 1):
                sid = by_text.get(b[i:j])
                if sid is not None:
                    cand = (skipped, pieces + 1)
                    if cand < best[j]:
                        best[j], back[j] = cand, (i, sid)
        ids: list[int] = []
        pos = n
        while pos > 0:
            prev, sid = back[pos]
            if sid >= 0:
                ids.append(sid)
            pos = prev
        out.append(ids[::-1])
    return out
