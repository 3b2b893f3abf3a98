"""Canonical token matching across byte-level BPE, SentencePiece and WordPiece vocabularies."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from clp_transfer.tiny import train_tokenizer
from clp_transfer.transfer.tokens import (
    CanonicalToken,
    MatchRule,
    TokenizerStyle,
    TokenKind,
    VocabInfo,
    byte_level_decoder,
    canonicalize,
    decompose,
    detect_style,
    match_vocabularies,
)


def test_byte_level_table_is_a_bijection_over_256_bytes():
    table = byte_level_decoder()
    assert len(table) == 256
    assert sorted(table.values()) == list(range(256))
    assert table["\u0120"] == ord(" ")  # 'Ġ'


@given(st.binary(min_size=1, max_size=12))
def test_byte_level_canonical_form_recovers_the_bytes(raw):
    encode = {b: ch for ch, b in byte_level_decoder().items()}
    token = "".join(encode[b] for b in raw)
    assert canonicalize(token, TokenizerStyle.BYTE_LEVEL).text == raw


def test_family_spellings_of_the_same_piece_agree():
    bpe = canonicalize("\u0120Haus", TokenizerStyle.BYTE_LEVEL)
    sp = canonicalize("\u2581Haus", TokenizerStyle.SENTENCEPIECE)
    wp = canonicalize("Haus", TokenizerStyle.WORDPIECE)
    assert bpe == sp == wp == CanonicalToken(b" Haus")
    assert canonicalize("haus", TokenizerStyle.BYTE_LEVEL) == canonicalize("##haus", TokenizerStyle.WORDPIECE)
    # byte fallback and byte-level spell the same raw byte
    assert canonicalize("<0xC3>", TokenizerStyle.SENTENCEPIECE) == CanonicalToken(b"\xc3", TokenKind.BYTE)
    assert canonicalize("\u00c3", TokenizerStyle.BYTE_LEVEL) == CanonicalToken(b"\xc3", TokenKind.BYTE)
    # WordPiece punctuation is not preceded by a space in running text
    assert canonicalize(".", TokenizerStyle.WORDPIECE).text == b"."


def test_style_detection(german_lines):
    for kind, style in [("bpe", TokenizerStyle.BYTE_LEVEL), ("sentencepiece", TokenizerStyle.SENTENCEPIECE),
                        ("wordpiece", TokenizerStyle.WORDPIECE)]:
        assert VocabInfo.from_tokenizer(train_tokenizer(german_lines, 300, kind)).style is style
    assert detect_style(["\u2581a", "\u2581b", "c"]) is TokenizerStyle.SENTENCEPIECE
    assert detect_style(["a", "b"]) is TokenizerStyle.PLAIN


def test_canonical_matching_beats_raw_strings_across_families(german_lines, english_lines):
    source = VocabInfo.from_tokenizer(train_tokenizer(english_lines + german_lines, 500, "bpe"))
    for kind in ("sentencepiece", "wordpiece"):
        target = VocabInfo.from_tokenizer(train_tokenizer(german_lines, 500, kind))
        canon = match_vocabularies(target, source)
        raw = match_vocabularies(target, source, canonical=False)
        assert canon.counts()["shared"] > 1.5 * raw.counts()["shared"], kind
        # every canonical match is right: same bytes on both sides
        t_canon, s_canon = target.canonical(), source.canonical()
        for i, s in enumerate(canon.source_id):
            if canon.rule[i] in (MatchRule.EXACT, MatchRule.CANONICAL):
                assert t_canon[i].text == s_canon[s].text


def test_special_tokens_match_by_role_not_by_spelling(german_lines, english_lines):
    source = VocabInfo.from_tokenizer(train_tokenizer(english_lines, 300, "bpe"))  # <|endoftext|>
    target = VocabInfo.from_tokenizer(train_tokenizer(german_lines, 400, "sentencepiece"))  # <s> </s> <unk>
    m = match_vocabularies(target, source)
    for role in ("bos", "eos", "unk"):
        tid = target.roles[role]
        assert m.source_id[tid] == source.roles[role]
        assert m.rule[tid] is MatchRule.SPECIAL_ROLE
    # a source special token is never matched as text
    assert all(s not in source.special_ids or r is MatchRule.SPECIAL_ROLE for s, r in zip(m.source_id, m.rule) if s >= 0)


def test_decompose_covers_the_token_bytes(german_lines, english_lines):
    source = VocabInfo.from_tokenizer(train_tokenizer(english_lines, 300, "bpe"))
    target = VocabInfo.from_tokenizer(train_tokenizer(german_lines, 500, "bpe"))
    pieces = decompose(target, source)
    s_canon, t_canon = source.canonical(), target.canonical()
    for i, ids in enumerate(pieces):
        if i in target.special_ids:
            assert ids == []
            continue
        # a byte-level source has every byte, so the pieces spell the token exactly
        assert b"".join(s_canon[j].text for j in ids) == t_canon[i].text


@settings(max_examples=30, deadline=None)
@given(st.text(alphabet="abcdeäöü ", min_size=1, max_size=10))
def test_decompose_skips_bytes_the_source_lacks(word):
    source = VocabInfo(["a", "b", "\u0120a", "\u00c3"], TokenizerStyle.BYTE_LEVEL)
    target = VocabInfo([word.replace(" ", "\u2581")], TokenizerStyle.SENTENCEPIECE)
    (ids,) = decompose(target, source)
    text = canonicalize(target.tokens[0], TokenizerStyle.SENTENCEPIECE).text
    spelled = b"".join(canonicalize(source.tokens[j], source.style).text for j in ids)
    # the pieces spell a subsequence of the bytes, in order
    it = iter(text)
    assert all(b in it for b in spelled)
