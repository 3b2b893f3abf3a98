"""Measuring on target-language text what the output calibration and the automatic choice need (the I/O half).

The maths - shifting output rows towards target-token frequencies - is
:func:`clp_transfer.transfer.methods.calibrate_frequencies`; :func:`clp_transfer.transfer.embeddings.solve`
runs it as one step after the method's rows, with the statistics measured here. :class:`TargetText` reads and
tokenizes the text once, keeps the source model loaded between measurements, and - for ``--method auto``
(:mod:`clp_transfer.transfer.auto`) - holds out whole *check* documents on which candidate initialisations
are scored in bits per byte by the evaluation's exact scorer; the statistics then come from the other (*fit*)
documents only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data import read_documents
from ..errors import ClpError
from ..models import context_length, prefix_rule

log = logging.getLogger(__name__)


def calibration_statistics(
    source_dir: Path,
    input_rows: torch.Tensor,
    tokenizer: Any,
    text: str,
    positions: int = 4096,
    count_bytes: int = 16_000_000,
    seq_len: int = 512,
    trust_remote_code: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the output calibration needs, from target-language text (the file ``text``).

    Returns ``hidden`` [N, d]: the final (normalised) hidden states of the source body fed with the target
    input rows ``input_rows`` [R, d], at N = ``positions`` positions of the text (documents joined by the
    tokenizer's document separator; up to ``seq_len`` tokens from each of documents taken in a fixed
    pseudo-random order, so sorted files are sampled evenly; cut into sequences of ``seq_len``), and
    ``counts`` [V_t]: how often each target token occurs in the first ``count_bytes`` bytes of the text
    (plus one separator per document).
    """
    probe = TargetText(source_dir, tokenizer, text, positions, count_bytes, seq_len, trust_remote_code=trust_remote_code)
    try:
        return probe.statistics(input_rows)
    finally:
        probe.release()


def _read_token_documents(path: Path, tokenizer: Any, sep: int | None, count_bytes: int) -> tuple[list[str], list[list[int]]]:
    """The documents of the first ``count_bytes`` bytes of ``path`` and their target ids (separator first)."""
    texts: list[str] = []
    n_bytes = 0
    for doc in read_documents(path):
        texts.append(doc)
        n_bytes += len(doc.encode("utf-8"))
        if n_bytes >= count_bytes:
            break
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    return texts, [([sep] if sep is not None else []) + d for d in ids]


def split_check_documents(lengths: list[int], check_tokens: int, seed: int = 0) -> list[int]:
    """Indices of whole documents held out for checking: documents in a seeded pseudo-random order are taken
    while they fit into ``check_tokens`` tokens (``lengths`` [n] in tokens), until the budget is reached; at
    least one document is left for fitting. Sorted; empty when ``check_tokens`` is 0."""
    if check_tokens <= 0 or len(lengths) < 2:
        return []
    picked, total = [], 0
    for i in torch.randperm(len(lengths), generator=torch.Generator().manual_seed(1000 + seed)).tolist():
        if len(picked) == len(lengths) - 1 or total >= check_tokens:
            break
        if total + lengths[i] <= check_tokens or not picked:
            picked.append(i)
            total += lengths[i]
    return sorted(picked)


def _token_counts(documents: list[list[int]], vocab: int) -> torch.Tensor:
    """[vocab] float32: how often each id occurs in ``documents``."""
    counts = torch.zeros(vocab, dtype=torch.float64)
    for d in documents:
        counts += torch.bincount(torch.tensor(d, dtype=torch.long), minlength=vocab)[:vocab].double()
    return counts.float()


class TargetText:
    """Target-language text, tokenized once, and the source model that is run on it (loaded on first use).

    ``statistics(input_rows)`` gives the calibration's hidden states and token counts (the callable form,
    ``probe(input_rows)``, is the same); ``bits_per_byte(input_rows, output_rows)`` scores a candidate on the
    held-out check documents (``check_tokens`` > 0). Check documents never enter the counts or the hidden
    states, except through ``statistics(..., all_documents=True)``: once a choice is made, the chosen rows
    are calibrated on all of the text, exactly as their standalone method would be. ``release()`` frees
    the model.
    """

    def __init__(self, source_dir: Path, tokenizer: Any, text: str, positions: int = 4096,
                 count_bytes: int = 16_000_000, seq_len: int = 512, check_tokens: int = 0, seed: int = 0,
                 trust_remote_code: bool = False) -> None:
        if positions < 1 or count_bytes < 1:
            raise ClpError("calibration_tokens and calibration_count_bytes must be positive")
        path = Path(text)
        if not path.is_file():
            raise ClpError(f"calibration text {text!r} does not exist; give a .txt or .jsonl file of target text")
        self.source_dir, self.tokenizer, self.positions, self.seq_len = Path(source_dir), tokenizer, positions, seq_len
        self.trust_remote_code = trust_remote_code
        sep, _ = prefix_rule(tokenizer)
        texts, docs = _read_token_documents(path, tokenizer, sep, count_bytes)
        if not docs or sum(len(d) for d in docs) < 2:
            raise ClpError(f"calibration text {text!r} has no usable documents")
        held = set(split_check_documents([len(d) for d in docs], check_tokens, seed))
        self.check_documents = [texts[i] for i in sorted(held)]
        self.check_tokens = sum(len(docs[i]) for i in held)
        self.fit_documents = [d for i, d in enumerate(docs) if i not in held]
        self.all_documents = docs
        self.counts = _token_counts(self.fit_documents, len(tokenizer))
        self.all_counts = self.counts if not held else _token_counts(docs, len(tokenizer))
        self._model = None

    def __call__(self, input_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.statistics(input_rows)

    def model(self) -> Any:
        """The source model in float32 (loaded once, kept until :meth:`release`)."""
        if self._model is None:
            from transformers import AutoModelForCausalLM

            self._model = AutoModelForCausalLM.from_pretrained(
                self.source_dir, dtype=torch.float32, trust_remote_code=self.trust_remote_code).eval()
        return self._model

    def release(self) -> None:
        self._model = None

    def _stream(self, positions: int, documents: list[list[int]]) -> torch.Tensor:
        """Forward positions from ``documents`` spread over the whole text (files are often sorted by source),
        at most seq_len tokens of each, in a fixed pseudo-random order."""
        stream: list[int] = []
        for i in torch.randperm(len(documents), generator=torch.Generator().manual_seed(0)).tolist():
            stream.extend(documents[i][: self.seq_len])
            if len(stream) >= positions:
                break
        return torch.tensor(stream[:positions])

    def statistics(self, input_rows: torch.Tensor, positions: int | None = None,
                   all_documents: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hidden [N, d], counts [V_t])`` for the calibration, N = ``positions`` (default: as constructed),
        from the fit documents, or with ``all_documents`` from the whole text (the check documents too)."""
        model = self.model()
        model.set_input_embeddings(torch.nn.Embedding.from_pretrained(input_rows.float(), freeze=True))
        seq_len = max(1, min(self.seq_len, context_length(model) or self.seq_len))
        ids = self._stream(positions or self.positions, self.all_documents if all_documents else self.fit_documents)
        hidden = []
        with torch.inference_mode():
            for start in tqdm(range(0, len(ids), seq_len), desc="calibration pass", unit="seq", leave=False):
                out = model.base_model(input_ids=ids[start:start + seq_len][None]).last_hidden_state
                hidden.append(out[0].float())
        return torch.cat(hidden), self.all_counts if all_documents else self.counts

    def bits_per_byte(self, input_rows: torch.Tensor, output_rows: torch.Tensor | None = None,
                      max_tokens: int | None = None) -> float:
        """Bits per byte of the target model with these rows (``output_rows`` None: tied to the input rows) on the
        check documents - the first ``max_tokens`` predicted tokens of them, if given - by the evaluation's exact
        scorer (:func:`clp_transfer.evaluate.score_documents`)."""
        from ..evaluate import score_documents

        if not self.check_documents:
            raise ClpError("no check documents were held out (check_tokens = 0, or the text has one document)")
        model = self.model()
        rows = input_rows.float()
        model.set_input_embeddings(torch.nn.Embedding.from_pretrained(rows, freeze=True))
        head = torch.nn.Linear(rows.shape[1], rows.shape[0], bias=False)
        head.weight = torch.nn.Parameter((output_rows if output_rows is not None else rows).float(), requires_grad=False)
        model.set_output_embeddings(head)
        block = max(1, min(self.seq_len, context_length(model) or self.seq_len))
        result = score_documents(model, self.tokenizer, self.check_documents, block_size=block, max_tokens=max_tokens,
                                 progress=False)
        return float(result.bits_per_byte)
