"""Extend mode: keep the source vocabulary and its ids, add the target tokens it lacks as real vocabulary.

``clp-transfer transfer --mode extend`` builds the output tokenizer from the *source* tokenizer: every source
token keeps its id (and its embedding row, bit for bit), and the target (helper) tokens the source lacks are
appended after the last source id, as part of the tokenizer model - never as Hugging Face "added tokens",
which bypass the merges and split text badly. How the models are merged, per family (``tokenizer.json``):

- **BPE** (byte-level ``Ġ`` as GPT-2/SmolLM/Llama 3, or SentencePiece-style ``▁`` as Llama 2/Mistral): the
  union of the vocabularies, and the source merges followed by the target merges that produce a new token.
  Every source merge outranks every new merge, and no source merge involves a new token, so BPE first runs
  the source's merges to completion and only then the new ones: a text gets exactly the source's ids
  wherever no new merge applies. A target merge whose parts are not both in the union (a part the source
  lacks and that was itself dropped) is dropped with the token it makes, so no dead entries remain.
- **Unigram** (SentencePiece unigram): the union of the pieces; source pieces keep their scores, a new
  piece gets its target score plus the median of (source score - target score) over the pieces both
  models share, i.e. the target's log-probabilities moved onto the source's scale. Unigram picks the
  segmentation with the highest total score over a superset of the source's pieces, so a text gets a new
  split only where one using a new piece scores higher than the source's best.
- **WordPiece**: the union of the vocabularies (greedy longest match: text changes only where a longer new
  token matches).

New tokens that the source's pre-tokenizer can never produce (e.g. a target token spanning a pre-token
boundary of the source) are left out: they would be rows that no text ever selects but that still take
probability mass from the tied softmax. The target's special/added tokens are never added; the source's
special tokens, chat template and config ids are unchanged. Tokenizers of different families (e.g. a
WordPiece helper for a byte-level BPE source) are refused with a :class:`ClpError` - use ``--mode replace``.

Keeping the source language (``--keep_text``, text in the source's language). Measured on SmolLM2-135M with a
German helper, the plain extension loses English in two ways: new merges fire inside English words (a
well-predicted run of source tokens becomes one new token with a step-0 row) and the new rows take
probability at English positions tokenized as before ("stealing"). Two levers, both on with a keep text:

- :func:`extend_keeping_text` leaves out the new tokens that fire on the keep text (``--keep_text_ratio``:
  unless they are that much more frequent in the calibration text), so that text keeps its tokenization;
- the guard (``--new_token_guard`` G, needs the calibration): every new row gets ``+ G · g`` with g the linear
  probe of :func:`guard_direction` (g·h ≈ -1 on keep-text hidden states, ≈ 0 on calibration-text ones), so
  the new logits drop by about G nats where the context reads like the source language only.

:func:`extend_vocabulary` is the pure merge on tokenizer specs (dicts); :func:`run_extend` is the I/O part
that :func:`clp_transfer.transfer.pipeline.run_transfer` calls for ``--mode extend``.
"""

from __future__ import annotations

import copy
import json
import logging
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import ClpError

log = logging.getLogger(__name__)

MODES = ("replace", "extend")
# Files of slow tokenizers that would go stale next to the merged tokenizer.json.
_SLOW_VOCAB_FILES = ("vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


def check_mode(cfg: Any) -> None:
    """Refuse an unknown ``--mode``, and extend-only options in replace mode, before any work is done."""
    if cfg.mode not in MODES:
        raise ClpError(f"unknown transfer mode {cfg.mode!r}; choose one of: {', '.join(MODES)}")
    if cfg.mode != "extend" and getattr(cfg, "new_token_logit_offset", 0.0):
        raise ClpError("--new_token_logit_offset applies to --mode extend only")
    if cfg.mode != "extend" and getattr(cfg, "keep_text", None):
        raise ClpError("--keep_text applies to --mode extend only")
    if getattr(cfg, "keep_text_ratio", 0.0) < 0 or getattr(cfg, "new_token_guard", 0.0) < 0:
        raise ClpError("--keep_text_ratio and --new_token_guard must not be negative")
    if getattr(cfg, "keep_text_bytes", 1) < 1:
        raise ClpError("--keep_text_bytes must be positive")


@dataclass
class ExtendedVocab:
    """The merged tokenizer spec and where its new tokens come from."""

    tokenizer_json: dict[str, Any]
    """The merged ``tokenizer.json`` (the source's, with the model's vocabulary, merges or pieces extended)."""
    kind: str
    """Tokenizer family: byte_level_bpe, sentencepiece_bpe, unigram or wordpiece."""
    first_new_id: int
    """Id of the first new token: one past the largest source id (model vocabulary and added tokens)."""
    new_tokens: list[str] = field(default_factory=list)
    """The new tokens in id order: token ``new_tokens[k]`` has id ``first_new_id + k``."""
    target_ids: list[int] = field(default_factory=list)
    """The id each new token has in the target (helper) tokenizer, parallel to ``new_tokens``."""
    dropped: dict[str, int] = field(default_factory=dict)
    """Target tokens / merges left out, by reason (for the report)."""

    @property
    def new_ids(self) -> list[int]:
        return list(range(self.first_new_id, self.first_new_id + len(self.new_tokens)))


# ---------------------------------------------------------------------------------------------- families


def _mentions(node: Any, type_name: str) -> bool:
    """Whether a normalizer / pre-tokenizer / decoder spec contains a component of ``type_name``."""
    return type_name in json.dumps(node) if node else False


def tokenizer_kind(spec: dict[str, Any]) -> str:
    """Family of a ``tokenizer.json`` spec: byte_level_bpe, sentencepiece_bpe, unigram, wordpiece."""
    model_type = (spec.get("model") or {}).get("type")
    parts = [spec.get(k) for k in ("normalizer", "pre_tokenizer", "decoder")]
    byte_level = any(_mentions(p, '"ByteLevel"') for p in parts)
    if model_type == "BPE":
        if byte_level:
            return "byte_level_bpe"
        if any(_mentions(p, "\\u2581") or _mentions(p, "\u2581") or _mentions(p, '"Metaspace"') for p in parts):
            return "sentencepiece_bpe"
        raise ClpError("the tokenizer is a BPE model with neither byte-level nor SentencePiece (▁) word marks; "
                       "extend mode supports byte-level BPE, SentencePiece BPE/Unigram and WordPiece")
    if model_type == "Unigram":
        return "unigram"
    if model_type == "WordPiece":
        return "wordpiece"
    raise ClpError(f"extend mode cannot merge a tokenizer model of type {model_type!r}; use --mode replace")


def _added_contents(spec: dict[str, Any]) -> set[str]:
    return {t["content"] for t in spec.get("added_tokens") or []}


def _max_id(spec: dict[str, Any]) -> int:
    vocab = spec["model"]["vocab"]
    ids = list(range(len(vocab))) if isinstance(vocab, list) else list(vocab.values())
    ids += [t["id"] for t in spec.get("added_tokens") or []]
    return max(ids, default=-1)


def _reachability(source_spec: dict[str, Any], kind: str) -> Callable[[str], bool]:
    """``ok(token) -> bool``: whether the source's pre-tokenizer can hand the token's text over in one piece.

    Byte-level tokens are decoded to text first (tokens that are not whole UTF-8 characters cannot be
    checked that way and are kept: the pre-tokenizer never splits inside a character). Other families'
    tokens are already in the pre-tokenizer's (normalised) alphabet; a WordPiece ``##`` mark is dropped.
    """
    from tokenizers import Tokenizer

    pre = Tokenizer.from_str(json.dumps(source_spec)).pre_tokenizer
    if pre is None:
        return lambda token: True
    decoder = None
    if kind == "byte_level_bpe":
        from .tokens import byte_level_decoder

        decoder = byte_level_decoder()
    prefix = source_spec["model"].get("continuing_subword_prefix") or "##" if kind == "wordpiece" else None

    def ok(token: str) -> bool:
        text = token
        if decoder is not None:
            try:
                text = bytes(decoder[ch] for ch in token).decode("utf-8")
            except (KeyError, UnicodeDecodeError):
                return True
            pieces = pre.pre_tokenize_str(text)
            return len(pieces) == 1 and pieces[0][0] == token
        if prefix and text.startswith(prefix):
            text = text[len(prefix):]
        pieces = pre.pre_tokenize_str(text)
        return len(pieces) == 1 and pieces[0][0] == text

    return ok


# ---------------------------------------------------------------------------------------------- merging


def extend_vocabulary(source_spec: dict[str, Any], target_spec: dict[str, Any],
                      exclude: frozenset[str] | set[str] = frozenset()) -> ExtendedVocab:
    """Merge ``target_spec`` into ``source_spec`` (both ``tokenizer.json`` dicts); neither is modified.

    ``exclude``: target tokens never to add (e.g. those :func:`extend_keeping_text` found firing on
    source-language text); a BPE token formed through an excluded one gets a rederived merge or is left out.

    Raises :class:`ClpError` when the two tokenizers are of different families or use different subword
    conventions (prefixes/suffixes), since their tokens would not mean the same thing.
    """
    kind_s, kind_t = tokenizer_kind(source_spec), tokenizer_kind(target_spec)
    if kind_s != kind_t:
        raise ClpError(
            f"extend mode needs a helper tokenizer of the source's family: the source is {kind_s}, the helper "
            f"{kind_t}; tokens of different families cannot be merged into one model. Use --mode replace, or "
            "a helper whose tokenizer is of the source's family"
        )
    m_s, m_t = source_spec["model"], target_spec["model"]
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if (m_s.get(key) or "") != (m_t.get(key) or ""):
            raise ClpError(f"the source and helper tokenizers use different {key} ({m_s.get(key)!r} vs "
                           f"{m_t.get(key)!r}): their tokens cannot be merged; use --mode replace")
    merged = copy.deepcopy(source_spec)
    reachable = _reachability(source_spec, kind_s)
    skip = _added_contents(target_spec) | set(exclude)  # control tokens never become vocabulary
    ext = ExtendedVocab(merged, kind_s, _max_id(source_spec) + 1)
    if kind_s in ("byte_level_bpe", "sentencepiece_bpe"):
        _merge_bpe(merged["model"], m_t, skip | _added_contents(source_spec), reachable, ext)
    elif kind_s == "unigram":
        _merge_unigram(merged["model"], m_t, skip | _added_contents(source_spec), reachable, ext)
    else:
        _merge_wordpiece(merged["model"], m_t, skip | _added_contents(source_spec), reachable, ext)
    log.info("extended the %s vocabulary by %d target tokens (left out: %s)", kind_s, len(ext.new_tokens),
             ext.dropped)
    return ext


def new_token_uses(ext: ExtendedVocab, texts: list[str]) -> dict[str, int]:
    """How often each new token of ``ext`` occurs in the extended tokenization of ``texts`` (tokens that never
    occur are absent). Uses the ``tokenizers`` model directly (batched, no special tokens)."""
    from collections import Counter

    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(json.dumps(ext.tokenizer_json))
    uses: Counter[int] = Counter()
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        uses.update(i for i in enc.ids if i >= ext.first_new_id)
    return {ext.new_tokens[i - ext.first_new_id]: n for i, n in uses.items()}


def extend_keeping_text(source_spec: dict[str, Any], target_spec: dict[str, Any], keep_texts: list[str],
                        target_texts: list[str] | None = None, ratio: float = 0.0, min_uses: int = 1,
                        max_rounds: int = 10) -> tuple[ExtendedVocab, dict[str, Any]]:
    """:func:`extend_vocabulary`, leaving out the new tokens that fire on ``keep_texts`` (source-language
    text), so that text keeps (most of) the source's tokenization.

    A new token is left out when it occurs at least ``min_uses`` times in the keep text *and* its rate there
    (uses per byte) is at least ``ratio`` times its rate in ``target_texts`` (target-language text; needed
    when ``ratio > 0``). ``ratio = 0`` leaves out every token that fires on the keep text; ``ratio = 1`` only
    those more frequent there than in the target language (a German word quoted in English text stays).

    Why: a new merge that joins pieces of a source-language word replaces a well-predicted source sequence by
    one token whose row is only a step-0 guess (on SmolLM2 + a German helper each such English token cost
    ~8 nats). Leaving a token out changes which merges later tokens get, which can make other new tokens fire,
    so this repeats until no further token qualifies (at most ``max_rounds`` merges). Returns the extension
    and a record: rounds, tokens left out, the remaining new-token uses on the keep text.
    """
    if ratio > 0 and not target_texts:
        raise ClpError("a keep-text ratio > 0 compares with target-language text: give the calibration text")
    k_bytes = max(1, sum(len(t.encode("utf-8")) for t in keep_texts))
    t_bytes = max(1, sum(len(t.encode("utf-8")) for t in target_texts or []))
    exclude: set[str] = set()
    rounds = 0
    while True:
        ext = extend_vocabulary(source_spec, target_spec, exclude=exclude)
        rounds += 1
        uses = new_token_uses(ext, keep_texts)
        target_uses = new_token_uses(ext, target_texts) if ratio > 0 and target_texts else {}
        firing = {t for t, n in uses.items()
                  if n >= min_uses and n / k_bytes >= ratio * target_uses.get(t, 0) / t_bytes}
        if not firing or rounds >= max_rounds:
            break
        exclude |= firing
        log.info("keep text: round %d left out %d more new tokens (%d in all)", rounds, len(firing), len(exclude))
    record = {"documents": len(keep_texts), "bytes": k_bytes, "ratio": ratio, "min_uses": min_uses,
              "rounds": rounds, "left_out": len(exclude), "remaining_uses": int(sum(uses.values())),
              "converged": not firing}
    ext.dropped = {**ext.dropped, "fires_on_keep_text": len(exclude)}
    return ext, record


def read_keep_text(path: str | Path, max_bytes: int) -> list[str]:
    """Documents of a keep text (.txt: one per line; .jsonl: a "text" field; .gz allowed), up to ``max_bytes``."""
    from ..data import read_documents

    if not Path(path).is_file():
        raise ClpError(f"--keep_text {str(path)!r} does not exist; give a .txt or .jsonl file of source-language text")
    docs: list[str] = []
    n = 0
    for doc in read_documents(path):
        docs.append(doc)
        n += len(doc.encode("utf-8"))
        if n >= max_bytes:
            break
    if not docs:
        raise ClpError(f"--keep_text {str(path)!r} has no documents")
    return docs


def _pairs(merges: list[Any]) -> list[tuple[str, str]]:
    """Merges as pairs, whether stored as ``[a, b]`` (tokenizers >= 0.20) or ``"a b"``."""
    out = []
    for m in merges:
        if isinstance(m, str):
            a, b = m.split(" ", 1)
            out.append((a, b))
        else:
            out.append((m[0], m[1]))
    return out


def bpe_split(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """The BPE segmentation of one pre-token: merge the adjacent pair of lowest rank (leftmost on ties) until
    no ranked pair is left, as the ``tokenizers`` BPE model does (without dropout or a subword prefix)."""
    parts = list(word)
    while len(parts) > 1:
        best, at = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get((parts[i], parts[i + 1]))
            if r is not None and (best is None or r < best):
                best, at = r, i
        if best is None:
            break
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    return parts


def _try_add(token: str, merge: tuple[str, str], vocab: dict[str, int], ranks: dict[tuple[str, str], int],
             new_merges: list[tuple[str, str]], dropped: dict[str, int], add: Callable[[str], None]) -> bool:
    """Add ``token`` with the merge that forms it under ``ranks`` when one merge can; False when it arrives
    in three or more pieces (it may become formable after later merges); parts missing drop it for good."""
    pieces = bpe_split(token, ranks)
    if len(pieces) != 2:
        return False
    x, y = pieces
    if x not in vocab or y not in vocab:
        dropped["merge_parts_missing"] += 1
        return True
    dropped["merges_rederived"] += (x, y) != merge
    add(token)
    ranks[(x, y)] = len(ranks)
    new_merges.append((x, y))
    return True


def _merge_bpe(model: dict[str, Any], target: dict[str, Any], skip: set[str], reachable: Callable[[str], bool],
               ext: ExtendedVocab) -> None:
    """Union of BPE vocabularies; the source merges, then one merge for each new token (in place).

    The new tokens are taken in the target's merge order. Each gets the merge that actually forms it under the
    merges so far - source first - which is the target's own merge unless the source merges split its text
    differently (then the two pieces the merged model ends up with; counted as ``merges_rederived``). A token
    that the merges so far leave in three or more pieces is tried again after all others (repeatedly, while
    that adds tokens: a later merge may have joined two of its pieces); one still in three or more pieces
    could only form through intermediate tokens the helper has no row for, so it is left out
    (``no_single_merge``), as is one whose pieces are not in the union
    (``merge_parts_missing``) or that the source's pre-tokenizer never hands over whole (``unreachable``).
    """
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise ClpError(f"extend mode does not support BPE models with a {key} ({model[key]!r}); "
                           "use --mode replace")
    vocab: dict[str, int] = model["vocab"]
    t_vocab: dict[str, int] = target["vocab"]
    t_merges = _pairs(target.get("merges") or [])
    merges = model.get("merges") or []
    ranks = {pair: r for r, pair in enumerate(_pairs(merges))}
    produced = {a + b for a, b in t_merges}
    dropped = {"unreachable": 0, "merge_parts_missing": 0, "no_single_merge": 0, "merges_rederived": 0}
    next_id = ext.first_new_id

    def add(token: str) -> None:
        nonlocal next_id
        vocab[token] = next_id
        ext.new_tokens.append(token)
        ext.target_ids.append(t_vocab[token])
        next_id += 1

    # The target's alphabet (tokens no merge makes, e.g. byte-level characters the source lacks).
    for token, _ in sorted(t_vocab.items(), key=lambda kv: kv[1]):
        if token in vocab or token in skip or token in produced:
            continue
        if reachable(token):
            add(token)
        else:
            dropped["unreachable"] += 1
    new_merges: list[tuple[str, str]] = []
    pending = []  # tokens left in 3+ pieces: a later merge may join two of them, so they get further passes
    for a, b in t_merges:
        token = a + b
        if token in vocab or token in skip or token not in t_vocab:
            continue  # a source token (its own merges make it), a control token, or a malformed entry
        if not reachable(token):
            dropped["unreachable"] += 1
            continue
        if not _try_add(token, (a, b), vocab, ranks, new_merges, dropped, add):
            pending.append((token, (a, b)))
    while pending:
        still = [(t, m) for t, m in pending if not _try_add(t, m, vocab, ranks, new_merges, dropped, add)]
        if len(still) == len(pending):
            break
        pending = still
    dropped["no_single_merge"] = len(pending)
    as_strings = bool(merges) and isinstance(merges[0], str)
    model["merges"] = list(merges) + [f"{x} {y}" if as_strings else [x, y] for x, y in new_merges]
    ext.dropped = dropped


def _merge_unigram(model: dict[str, Any], target: dict[str, Any], skip: set[str],
                   reachable: Callable[[str], bool], ext: ExtendedVocab) -> None:
    """Union of Unigram pieces; new pieces' scores moved onto the source's scale (median offset)."""
    pieces: list[list[Any]] = model["vocab"]
    t_pieces: list[list[Any]] = target["vocab"]
    src_score = {p: s for p, s in pieces}
    t_unk = target.get("unk_id")
    shared = [src_score[p] - s for i, (p, s) in enumerate(t_pieces) if p in src_score and i != t_unk]
    if not shared:
        raise ClpError("the source and helper Unigram models share no piece: there is no scale to put the "
                       "helper's piece scores on; use --mode replace")
    offset = statistics.median(shared)
    dropped = {"unreachable": 0}
    for tid, (piece, score) in enumerate(t_pieces):
        if piece in src_score or piece in skip or tid == t_unk:
            continue
        if not reachable(piece):
            dropped["unreachable"] += 1
            continue
        pieces.append([piece, float(score) + offset])
        ext.new_tokens.append(piece)
        ext.target_ids.append(tid)
    if ext.new_tokens and ext.first_new_id != len(pieces) - len(ext.new_tokens):
        # Unigram ids are positions in the piece list: added tokens past the list would collide.
        raise ClpError("the source Unigram tokenizer has added tokens past its piece list; extend mode "
                       "cannot append pieces after them")
    ext.dropped = {**dropped, "score_offset": offset}  # type: ignore[dict-item]


def _merge_wordpiece(model: dict[str, Any], target: dict[str, Any], skip: set[str],
                     reachable: Callable[[str], bool], ext: ExtendedVocab) -> None:
    """Union of WordPiece vocabularies, new ids after the source's."""
    vocab: dict[str, int] = model["vocab"]
    dropped = {"unreachable": 0}
    next_id = ext.first_new_id
    for token, tid in sorted(target["vocab"].items(), key=lambda kv: kv[1]):
        if token in vocab or token in skip or token == target.get("unk_token"):
            continue
        if not reachable(token):
            dropped["unreachable"] += 1
            continue
        vocab[token] = next_id
        ext.new_tokens.append(token)
        ext.target_ids.append(tid)
        next_id += 1
    ext.dropped = dropped


def build_extended_tokenizer(source_tokenizer: Any, ext: ExtendedVocab, directory: str | Path) -> Any:
    """Save the source tokenizer (config, chat template, special tokens) with the merged ``tokenizer.json``
    into ``directory`` and load it back with ``AutoTokenizer``."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    source_tokenizer.save_pretrained(directory)
    for name in _SLOW_VOCAB_FILES:  # a slow tokenizer's files would still hold the old vocabulary
        (directory / name).unlink(missing_ok=True)
    (directory / "tokenizer.json").write_text(json.dumps(ext.tokenizer_json, ensure_ascii=False), encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(directory)
    expected = ext.first_new_id + len(ext.new_tokens)
    if len(tok) != expected:
        raise ClpError(f"the extended tokenizer has {len(tok)} tokens, expected {expected}: the source "
                       "tokenizer's files disagree with its tokenizer.json")
    return tok


def tokenizer_spec(tokenizer: Any, what: str) -> dict[str, Any]:
    """The ``tokenizer.json`` spec of a fast tokenizer (extend mode edits it), or a ClpError."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ClpError(f"the {what}'s tokenizer has no tokenizer.json (a slow tokenizer): extend mode merges "
                       "tokenizer.json models; convert it to a fast tokenizer or use --mode replace")
    return json.loads(backend.to_str())


# ---------------------------------------------------------------------------------------------- rows


def _replace_view_rows(cfg: Any, params: dict[str, Any], src_tok: Any, tgt_tok: Any, e_s: Any, o_s: Any, e_h: Any,
                       target_ids: list[int]) -> tuple[Any, Any, dict[str, Any], dict[str, int]]:
    """New rows exactly as replace mode makes them for the helper's vocabulary, picked at ``target_ids``.

    The method sees the problem of ``--mode replace`` (anchors: target tokens matched to a source token,
    helper space indexed by target id, FVT pieces under the source vocabulary), so every registered method
    works unchanged; the output calibration is left to :func:`run_extend`, which runs it on the extended head.
    Returns (input rows [N, d], output rows [N, d] or None, the method's stats, the matching counts).
    """
    import torch

    from .methods import METHODS, EmbeddingProblem, compute_target_embeddings, method_params
    from .tokens import VocabInfo, decompose, match_vocabularies

    spec = METHODS.get(cfg.method)
    source_vocab, target_vocab = VocabInfo.from_tokenizer(src_tok), VocabInfo.from_tokenizer(tgt_tok)
    match = match_vocabularies(target_vocab, source_vocab, canonical=cfg.canonical_matching)
    counts = match.counts()
    if counts["shared"] - counts["special_role"] - counts["special_text"] <= 0:
        raise ClpError("the helper's tokenizer shares no ordinary token with the source's: nothing anchors the "
                       "new embeddings")
    uncalibrated = {**params, "calibrate": 0.0} if "calibrate" in spec.defaults else dict(params)
    uncalibrated.pop("calibrate_shared", None)
    full = method_params(cfg.method, uncalibrated)
    problem = EmbeddingProblem(
        source_input=e_s,
        source_id=torch.tensor(match.source_id, dtype=torch.long),
        target_rows=len(target_vocab),
        source_output=o_s,
        helper_input=e_h[: len(target_vocab)] if spec.needs_helper else None,
        pieces=decompose(target_vocab, source_vocab) if spec.wants_pieces(full) else None,
    )
    solution = compute_target_embeddings(problem, cfg.method, uncalibrated, seed=cfg.seed)
    idx = torch.tensor(target_ids, dtype=torch.long)
    out = solution.output[idx] if solution.output is not None else None
    return solution.input[idx], out, solution.stats, counts


def _assemble(source: Any, new: Any, rows: int, v_s: int) -> Any:
    """[rows, d] in the source dtype: source rows 0..V_s-1 copied as they are, new rows after them, padding
    rows (past the vocabulary) the mean of the source's own padding rows, or zeros when it had none."""
    import torch

    d = source.shape[1]
    out = torch.zeros(rows, d, dtype=source.dtype)
    out[:v_s] = source[:v_s]
    v = v_s + new.shape[0]
    out[v_s:v] = new.to(source.dtype)
    if rows > v and source.shape[0] > v_s:
        out[v:] = source[v_s:].float().mean(0).to(source.dtype)
    return out


def _calibrate_new_rows(cfg: Any, src_path: Path, ext_tok: Any, inp: Any, out: Any, new_ids: list[int],
                        strength: float) -> tuple[Any, Any, dict[str, Any]]:
    """Output calibration of the new rows only (source rows stay bit-for-bit) on the extended head, then the
    optional ``new_token_logit_offset``: every new row [d] += offset * u, u [d] the bias direction of the
    calibration hidden states (:func:`clp_transfer.transfer.methods.bias_direction`), and, with ``keep_text``, the
    guard: every new row [d] += new_token_guard * g (:func:`guard_direction`)."""
    import torch

    from .methods import bias_direction, calibrate_frequencies
    from .pipeline import calibration_statistics

    hidden, counts = calibration_statistics(src_path, inp, ext_tok, cfg.calibration_text, cfg.calibration_tokens,
                                            cfg.calibration_count_bytes, trust_remote_code=cfg.trust_remote_code)
    rows = torch.tensor(new_ids, dtype=torch.long)
    head, shift = calibrate_frequencies(out if out is not None else inp, hidden, counts, rows, strength)
    offset = float(getattr(cfg, "new_token_logit_offset", 0.0))
    if offset:
        head[rows] += offset * bias_direction(hidden)[None, :]
    guard_info: dict[str, Any] | None = None
    strength = float(getattr(cfg, "new_token_guard", 0.0))
    if getattr(cfg, "keep_text", None) and strength:
        # Keep-text hidden states [N, d]; its counts are not needed, so only a little text is tokenized.
        keep_hidden, _ = calibration_statistics(src_path, inp, ext_tok, cfg.keep_text, cfg.calibration_tokens,
                                                200_000, trust_remote_code=cfg.trust_remote_code)
        g = guard_direction(keep_hidden, hidden)
        head[rows] += strength * g[None, :]
        guard_info = _guard_stats(g, keep_hidden, hidden, strength)
        log.info("new-token guard %.1f: new logits %+.2f ± %.2f nats on keep text, %+.2f ± %.2f on calibration "
                 "text", strength, guard_info["keep_mean"], guard_info["keep_std"], guard_info["target_mean"],
                 guard_info["target_std"])
    base = out if out is not None else inp  # tied: input and output are one matrix
    head = head.to(base.dtype)
    head[: new_ids[0]] = base[: new_ids[0]]  # the source rows, untouched by the float32 round trip
    if out is not None:
        out = head
    else:
        inp = head
    info = {"applied": True, "positions": int(hidden.shape[0]), "counted_tokens": int(counts.sum()),
            "rows_shifted": len(new_ids), "mean_abs_shift": float(shift[rows].abs().mean()),
            "mean_shift_new": float(shift[rows].mean()), "logit_offset": offset}
    if guard_info is not None:
        info["guard"] = guard_info
    return inp, out, info


def guard_direction(keep_hidden: Any, target_hidden: Any, ridge: float = 1e-3) -> Any:
    """g [d]: a linear probe with g·h ≈ -1 at source-language positions and ≈ 0 at target-language ones.

    ``keep_hidden`` [N_k, d] and ``target_hidden`` [N_t, d] are final hidden states on keep text and on
    calibration text. g minimises mean_k (g·h + 1)² + mean_t (g·h)² + λ|g|² (each text weighted equally,
    λ = ``ridge`` × the mean squared hidden-state norm, for a well-posed solve in float64). Adding
    ``G · g`` to the new output rows lowers their logits by about G nats where the context reads like the keep
    text and leaves them where it reads like the target text: new rows stop taking probability from the
    source's tokens in its own language without giving up the calibrated level in the new one.
    """
    import torch

    hk, ht = keep_hidden.double(), target_hidden.double()
    gram = hk.T @ hk / hk.shape[0] + ht.T @ ht / ht.shape[0]  # [d, d]
    lam = ridge * float(torch.trace(gram)) / 2
    rhs = -hk.mean(0)  # [d]: from the target -1 at every keep position
    g = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), rhs)
    return g.float()


def _guard_stats(g: Any, keep_hidden: Any, target_hidden: Any, strength: float) -> dict[str, float]:
    """Mean and spread of the guard's logit change G·g·h on both texts (the report's check of the probe)."""
    sk, st = strength * (keep_hidden.float() @ g), strength * (target_hidden.float() @ g)
    return {"strength": strength, "positions_keep": int(sk.shape[0]), "keep_mean": float(sk.mean()),
            "keep_std": float(sk.std()), "target_mean": float(st.mean()), "target_std": float(st.std())}


def _write_config(tmp: Path, source_dir: Path, rows: int) -> None:
    """The source's config with the new vocabulary size; special-token ids and generation config unchanged."""
    import shutil

    cfg = json.loads((source_dir / "config.json").read_text())
    cfg["vocab_size"] = rows
    if isinstance(cfg.get("text_config"), dict) and "vocab_size" in cfg["text_config"]:
        cfg["text_config"] = {**cfg["text_config"], "vocab_size": rows}
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for extra in [source_dir / "generation_config.json", *source_dir.glob("*.py")]:
        if extra.is_file():
            shutil.copy2(extra, tmp / extra.name)


def extend_card(directory: Path, source_dir: str | Path | None = None, helper_dir: str | Path | None = None) -> str:
    """The hub model card (``README.md``) of an extend-mode output, from its ``transfer_report.json``.

    Built with :mod:`clp_transfer.model_card`'s helpers so it has the same metadata rules as replace mode's
    card; the languages are the source's and the helper's (the model is meant to keep the first)."""
    from .. import model_card as mc

    r = json.loads((Path(directory) / "transfer_report.json").read_text(encoding="utf-8"))
    src, hlp, x, tgt = r["source"], r["helper"], r["extension"], r["target"]
    source, helper = mc.provenance(source_dir, src["origin"]), mc.provenance(helper_dir, hlp["origin"])
    language = list(dict.fromkeys(source.language + helper.language))
    name = mc.final_name(Path(directory))
    params = ", ".join(f"`{k}={v}`" for k, v in sorted(r.get("params", {}).items())) or "defaults"
    calib = (r.get("new_rows") or {}).get("calibration") or {}
    left = ", ".join(f"{k}: {mc._fmt(v)}" for k, v in x["left_out"].items() if v and k != "score_offset")
    keep = x.get("keep_text_filter")
    keep_row = (f"`{x['keep_text']}`: {mc._fmt(keep['left_out'])} new tokens that fire on it left out "
                f"(ratio {keep['ratio']:g}); {mc._fmt(keep['remaining_uses'])} new-token uses remain on it"
                if keep else "none (new merges may fire inside source-language words)")
    guard = calib.get("guard")
    rows = [
        ("source", f"`{src['origin']}` ({src['kind']}; {mc._fmt(src['vocab_size'])} tokens, {src['tokenizer_family']})"),
        ("helper", f"`{hlp['origin']}` (tokenizer `{hlp['tokenizer']}`, {mc._fmt(hlp['vocab_size'])} tokens)"),
        ("method", f"`{r['method']}`, parameters {params}, seed {r.get('seed')}"),
        ("vocabulary", f"{mc._fmt(tgt['vocab_size'])} tokens: the **{mc._fmt(x['source_tokens'])} source tokens** "
                       f"with their ids and rows unchanged, then **{mc._fmt(x['new_tokens'])} new** helper tokens "
                       f"as real vocabulary (rows from `{r['method']}`); left out: {left or 'none'}"),
        ("keep text", keep_row),
        ("calibration text", f"`{r['calibration_text']}` (new rows only)" if r.get("calibration_text") else "none"),
        ("new-token guard", f"{guard['strength']:g} nats: new logits {guard['keep_mean']:+.2f} on keep text, "
                            f"{guard['target_mean']:+.2f} on calibration text" if guard else "none"),
        ("embeddings", f"{mc._fmt(tgt['embedding_rows'])} rows ({tgt['dtype']}); "
                       f"{'tied' if tgt['tied'] else 'untied'} output head"),
        ("tool", f"clp-transfer {r.get('clp_transfer_version', '?')}; full record in `transfer_report.json`"),
    ]
    whence = (f"the license of the source `{src['origin']}`, whose weights this model keeps" if source.license
              else f"the source `{src['origin']}` names none in its card or GGUF metadata")
    body = f"""
# {name}

A causal language model{mc._for_language(language)}, made with clp-transfer's `transfer --mode extend`: the
source model `{src['origin']}` unchanged, its tokenizer **extended** by the tokens of the helper
`{hlp['tokenizer']}` that it lacks (added to the tokenizer model as merges/pieces after the source's, so text
without them is tokenized as before). The new tokens' embeddings are built from the source embeddings of
shared tokens, weighted by similarity in the helper's embedding space. The new rows have not been trained:
continue pretraining (`clp-transfer train`) before relying on the new language.

## What was done

{mc._table(rows)}

## Measurements

Bits per byte: not measured by `transfer`. Measure them on held-out text of both languages with
`clp-transfer perplexity --model {name} --text_files heldout.txt` (comparable across tokenizers).

## License and language

{mc._license_note(source.license, whence)}
{mc._language_note(language, "neither the source's nor the helper's card names one")}
{mc._loading(name)}"""
    tags = [mc.TAG, "vocabulary-extension", "clp", f"transfer-method-{r['method']}"]
    return mc._render({"language": language, "license": source.license, "library_name": "transformers",
                       "pipeline_tag": "text-generation", "base_model": source.hub_id, "tags": tags}, body)


def _check_extend_flags(cfg: Any, params: dict[str, Any]) -> None:
    """Refuse the replace-mode options that make no sense when every source row keeps its place."""
    from .methods import method_params

    if "calibrate_shared" in params and method_params(cfg.method, {"calibrate_shared": params["calibrate_shared"]})[
            "calibrate_shared"]:
        raise ClpError("extend mode keeps the source rows bit-for-bit and calibrates only the new rows: drop "
                       "calibrate_shared=true")
    if not cfg.transfer_untied_head:
        raise ClpError("--no-transfer_untied_head is a replace-mode ablation; in extend mode every source row "
                       "keeps its position anyway")


def _merge_tokenizers(cfg: Any, src_tok: Any, tgt_tok: Any) -> tuple[ExtendedVocab, dict[str, Any] | None]:
    """The extension of the source vocabulary: every helper token it lacks, or, with ``--keep_text``, those
    that do not fire on the source-language keep text (and the record of that filter)."""
    s_spec, t_spec = tokenizer_spec(src_tok, "source model"), tokenizer_spec(tgt_tok, "helper model")
    keep_record: dict[str, Any] | None = None
    if cfg.keep_text:
        ratio = float(cfg.keep_text_ratio)
        if ratio > 0 and not cfg.calibration_text:
            raise ClpError("--keep_text_ratio > 0 compares the keep text with target text: give --calibration_text "
                           "or --keep_text_ratio 0")
        keep_docs = read_keep_text(cfg.keep_text, cfg.keep_text_bytes)
        target_docs = read_keep_text(cfg.calibration_text, cfg.keep_text_bytes) if ratio > 0 else None
        ext, keep_record = extend_keeping_text(s_spec, t_spec, keep_docs, target_docs, ratio=ratio)
    else:
        log.warning("extend mode without --keep_text: new tokens may fire inside source-language words and "
                    "take probability there (give source-language text to keep it as it was)")
        ext = extend_vocabulary(s_spec, t_spec)
    if not ext.new_tokens:
        raise ClpError("the helper's tokenizer has no token the source lacks: there is nothing to extend")
    return ext, keep_record


def _calibrate_if_asked(cfg: Any, spec: Any, full_params: dict[str, Any], src_path: Path, ext_tok: Any, inp: Any,
                        out: Any, new_ids: list[int], timings: dict[str, float]) -> tuple[Any, Any, dict | None]:
    """The output calibration of the new rows when the method wants it and text is given (the guard and the
    logit offset ride on it). Sets ``calibrate_shared`` to False in ``full_params``: source rows never move."""
    import time

    calibrating = spec.wants_calibration(full_params)
    if cfg.keep_text and cfg.new_token_guard and not (calibrating and cfg.calibration_text):
        # The guard contrasts keep-text with calibration-text hidden states; it is on by default, so without
        # the calibration it is skipped rather than refused.
        log.warning("--new_token_guard needs the output calibration (a calibrating method such as clp and "
                    "--calibration_text): guard skipped, the new rows may take probability in keep-text contexts")
    if cfg.new_token_logit_offset and not (calibrating and cfg.calibration_text):
        raise ClpError("--new_token_logit_offset needs the output calibration (a calibrating method such as clp "
                       "and --calibration_text): the offset is measured on the calibration text's hidden states")
    if not calibrating:
        return inp, out, None
    full_params["calibrate_shared"] = False
    if cfg.calibration_text is None:
        log.warning("method %r calibrates the new output rows to target-text token frequencies, but no "
                    "--calibration_text was given: calibration skipped", cfg.method)
        return inp, out, {"applied": False, "skipped": "no calibration text was given"}
    t = time.perf_counter()
    inp, out, calibration = _calibrate_new_rows(cfg, src_path, ext_tok, inp, out, new_ids,
                                                float(full_params["calibrate"]))
    timings["calibration_s"] = time.perf_counter() - t
    return inp, out, calibration


def _extend_report(cfg: Any, src: Any, hlp: Any, tgt_tok: Any, keys: Any, e_s: Any, ext: ExtendedVocab,
                   keep_record: dict[str, Any] | None, rows: int, multiple: int, full_params: dict[str, Any],
                   matching: dict[str, Any], new_stats: dict[str, Any]) -> dict[str, Any]:
    """``transfer_report.json`` of an extended model (before timings)."""
    from .. import __version__

    v_s, v_ext = ext.first_new_id, ext.first_new_id + len(ext.new_tokens)
    return {
        "clp_transfer_version": __version__,
        "mode": "extend",
        "source": {"origin": src.origin, "kind": src.kind, "vocab_size": v_s, "embedding_rows": e_s.shape[0],
                   "tokenizer_family": ext.kind, "tied": keys.tied},
        "helper": {"origin": hlp.origin, "kind": hlp.kind, "tokenizer": cfg.helper_tokenizer or hlp.origin,
                   "vocab_size": len(tgt_tok)},
        "target": {"vocab_size": v_ext, "embedding_rows": rows, "padded_to_multiple_of": multiple,
                   "dtype": str(e_s.dtype).replace("torch.", ""), "tied": keys.tied},
        "method": cfg.method,
        "params": full_params,
        "seed": cfg.seed,
        "canonical_matching": cfg.canonical_matching,
        "calibration_text": cfg.calibration_text,
        "extension": {"source_tokens": v_s, "new_tokens": len(ext.new_tokens), "left_out": ext.dropped,
                      "keep_text": cfg.keep_text, "keep_text_filter": keep_record},
        "matching": {**matching, "shared": v_s, "missing": len(ext.new_tokens),
                     "helper_tokens_matched_to_source": matching["shared"]},
        "new_rows": new_stats,
        "new_token_ids": ext.new_ids,
        "new_token_helper_ids": ext.target_ids,
    }


def run_extend(cfg: Any, src: Any, hlp: Any, src_tok: Any, tgt_tok: Any, src_ckpt: Any, keys: Any, e_s: Any,
               o_s: Any, e_h: Any, timings: dict[str, float], t0: float) -> Any:
    """``--mode extend`` of :func:`clp_transfer.transfer.pipeline.run_transfer`, from the point where the embedding
    matrices are read: merge the tokenizers, make the new rows, write the model. Returns a TransferResult."""
    import time

    import torch

    from ..atomic import atomic_directory
    from ..model_card import write_model_card
    from .methods import METHODS, EmbeddingSolution, method_params
    from .pipeline import (TransferResult, _write_checkpoint, fit_to_source_context, padded_rows,
                           parse_params, write_transfer_report)

    spec = METHODS.get(cfg.method)
    params = parse_params(cfg.params)
    _check_extend_flags(cfg, params)
    t = time.perf_counter()
    ext, keep_record = _merge_tokenizers(cfg, src_tok, tgt_tok)
    work = tempfile.TemporaryDirectory(prefix="clp-extend-")
    ext_tok = build_extended_tokenizer(src_tok, ext, work.name)
    v_s, v_ext = ext.first_new_id, ext.first_new_id + len(ext.new_tokens)
    if v_s > e_s.shape[0]:
        raise ClpError(f"the source tokenizer's ids reach {v_s - 1} but its embeddings have {e_s.shape[0]} rows")
    timings["merge_tokenizers_s"] = time.perf_counter() - t

    t = time.perf_counter()
    new_in, new_out, stats, matching = _replace_view_rows(cfg, params, src_tok, tgt_tok, e_s, o_s, e_h,
                                                          ext.target_ids)
    rows, multiple = padded_rows(v_ext, e_s.shape[0], v_s, cfg.pad_to_multiple_of)
    inp = _assemble(e_s, new_in, rows, v_s)  # [rows, d]: source rows bit-for-bit, then the new rows
    out = _assemble(o_s, new_out, rows, v_s) if o_s is not None else None
    timings["compute_s"] = time.perf_counter() - t
    full_params = method_params(cfg.method, params)
    inp, out, calibration = _calibrate_if_asked(cfg, spec, full_params, src.path, ext_tok, inp, out, ext.new_ids,
                                                timings)
    if not torch.isfinite(inp).all() or (out is not None and not torch.isfinite(out).all()):
        raise ClpError(f"method {cfg.method!r} produced non-finite embeddings")
    new_stats = {k: v for k, v in stats.items() if k not in ("params", "method", "calibration")}
    new_stats.update(shared=v_s, missing=len(ext.new_tokens), target_vocab_size=v_ext, target_rows=rows)
    if calibration is not None:
        new_stats["calibration"] = calibration
    solution = EmbeddingSolution(inp, out, new_stats)
    source_id = torch.cat([torch.arange(v_s), torch.full((v_ext - v_s,), -1)])
    report = _extend_report(cfg, src, hlp, tgt_tok, keys, e_s, ext, keep_record, rows, multiple, full_params,
                            matching, new_stats)
    t = time.perf_counter()
    out_path = Path(cfg.output)
    with atomic_directory(out_path, overwrite=cfg.overwrite) as tmp:
        _write_checkpoint(tmp, src_ckpt, keys, solution, source_id, rows)
        _write_config(tmp, src.path, rows)
        fit_to_source_context(ext_tok, src.path, cfg.trust_remote_code)
        ext_tok.save_pretrained(tmp)
        write_transfer_report(tmp, report, timings, t, t0)
        write_model_card(tmp, "extend", builder=extend_card, source_dir=src.path, helper_dir=hlp.path)  # README.md
    work.cleanup()
    log.info("Extended %s by %d tokens of %s's vocabulary (%s) with method %s: ids 0-%d keep their rows, "
             "new ids %d-%d; %d rows (%s). Took %.1f s. Wrote %s.", src.origin, len(ext.new_tokens),
             report["helper"]["tokenizer"], ext.kind, cfg.method, v_s - 1, v_s, v_ext - 1, rows,
             report["target"]["dtype"], timings["total_s"], out_path)
    return TransferResult(out_path, report)
