"""Measuring what the output calibration needs on target-language text (the I/O half of the calibration).

The maths - shifting output rows towards target-token frequencies - is
:func:`clp_transfer.transfer.methods.calibrate_frequencies`; :func:`clp_transfer.transfer.embeddings.solve`
runs it as one step after the method's rows, with the statistics measured here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data import read_documents
from ..errors import ClpError
from ..models import context_length, prefix_rule


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
    from transformers import AutoModelForCausalLM


    if positions < 1 or count_bytes < 1:
        raise ClpError("calibration_tokens and calibration_count_bytes must be positive")
    path = Path(text)
    if not path.is_file():
        raise ClpError(f"calibration text {text!r} does not exist; give a .txt or .jsonl file of target text")
    sep, _ = prefix_rule(tokenizer)
    v_t = len(tokenizer)
    docs: list[list[int]] = []
    n_bytes = 0
    for doc in read_documents(path):
        docs.append(([sep] if sep is not None else []) + tokenizer(doc, add_special_tokens=False)["input_ids"])
        n_bytes += len(doc.encode("utf-8"))
        if n_bytes >= count_bytes:
            break
    if not docs or sum(len(d) for d in docs) < 2:
        raise ClpError(f"calibration text {text!r} has no usable documents")
    counts = torch.zeros(v_t, dtype=torch.float64)
    for d in docs:
        counts += torch.bincount(torch.tensor(d, dtype=torch.long), minlength=v_t)[:v_t].double()
    # Forward positions from documents spread over the whole text (files are often sorted by source), at most
    # seq_len tokens of each, in a fixed pseudo-random order.
    stream: list[int] = []
    for i in torch.randperm(len(docs), generator=torch.Generator().manual_seed(0)).tolist():
        stream.extend(docs[i][:seq_len])
        if len(stream) >= positions:
            break
    model = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32,
                                                 trust_remote_code=trust_remote_code).eval()
    model.set_input_embeddings(torch.nn.Embedding.from_pretrained(input_rows.float(), freeze=True))
    ctx = context_length(model) or seq_len
    seq_len = max(1, min(seq_len, ctx))
    ids = torch.tensor(stream[:positions])
    hidden = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(ids), seq_len), desc="calibration pass", unit="seq", leave=False):
            out = model.base_model(input_ids=ids[start:start + seq_len][None]).last_hidden_state
            hidden.append(out[0].float())
    del model
    return torch.cat(hidden), counts.float()
