"""Bits per byte of a causal LM, with its own tokenizer, on the benchmark's held-out German splits.

    python benchmarks/quality/bpb.py --model source|helper|DIR [--name NAME] [--splits dev test]
                                     [--window W] [--stride S] [--threads N]

Every document of a split (``<cache>/splits/<split>.jsonl``) is scored on its own, in full: the model's
document-separator token (``<|endoftext|>`` when the vocabulary has it, else bos, else eos) is the context of
the first token, and longer documents are scored with a sliding window of ``W`` tokens (default: the model's
context, at most 1024) that moves by ``S`` (default W/2) tokens, so every token after the first window has at
least W-S tokens of context and each is scored once. Then

    bits per byte = sum of NLL (nats) / ln 2 / UTF-8 bytes of the documents' text

(comparable across tokenizers), next to token and word perplexity (words: whitespace-separated), in total and
per corpus. Results are merged into ``benchmarks/quality/baselines.json`` under ``--name``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

from common import REPO, cache_dir, ensure_helper, read_jsonl, set_threads, splits_dir

from clp_transfer.atomic import atomic_write_json

RESULTS = Path(__file__).resolve().parent / "baselines.json"
NAMED = {"source": "smollm2-135m", "helper": "helper-de"}


def separator_id(tokenizer) -> int:
    vocab = tokenizer.get_vocab()
    if "<|endoftext|>" in vocab:
        return vocab["<|endoftext|>"]
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return tid
    raise SystemExit("bpb.py: the tokenizer has no <|endoftext|>, bos or eos token to start documents with")


def document_nll(model, ids: list[int], window: int, stride: int) -> float:
    """Sum of NLL (nats) of ids[1:] given everything before, with a sliding window; ids[0] is the separator."""
    import torch

    total = 0.0
    pos = 1  # next target position to score
    n = len(ids)
    while pos < n:
        end = min(pos + stride, n) if pos > 1 else min(window + 1, n)  # targets pos..end-1
        start = max(0, end - 1 - window)  # inputs ids[start:end-1], at most `window` tokens
        inp = torch.tensor([ids[start:end - 1]])
        with torch.inference_mode():
            logits = model(input_ids=inp).logits[0, pos - 1 - start:].float()
        targets = torch.tensor(ids[pos:end])
        total += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
        pos = end
    return total


def score_split(model, tokenizer, docs: list[dict], window: int, stride: int) -> dict:
    sep = separator_id(tokenizer)
    acc: dict[str, dict[str, float]] = defaultdict(lambda: {"nll": 0.0, "tokens": 0, "bytes": 0, "words": 0, "documents": 0})
    for d in docs:
        ids = [sep] + tokenizer(d["text"], add_special_tokens=False, verbose=False)["input_ids"]
        nll = document_nll(model, ids, window, stride)
        for key in ("_all", d["corpus"]):
            a = acc[key]
            a["nll"] += nll
            a["tokens"] += len(ids) - 1
            a["bytes"] += len(d["text"].encode("utf-8"))
            a["words"] += len(d["text"].split())
            a["documents"] += 1

    def figures(a: dict) -> dict:
        return {"bits_per_byte": round(a["nll"] / math.log(2) / a["bytes"], 4),
                "token_perplexity": round(math.exp(a["nll"] / a["tokens"]), 3),
                "word_perplexity": round(math.exp(a["nll"] / a["words"]), 2),
                "tokens_per_word": round(a["tokens"] / a["words"], 3),
                "nll_nats": round(a["nll"], 2), "tokens": a["tokens"], "bytes": a["bytes"],
                "words": a["words"], "documents": a["documents"]}

    out = figures(acc.pop("_all"))
    out["by_corpus"] = {k: figures(v) for k, v in sorted(acc.items())}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="'source', 'helper' (the cached models) or a model directory")
    p.add_argument("--name", default=None, help="key in baselines.json (default: --model)")
    p.add_argument("--cache", default=None, help="benchmark cache directory (default: benchmarks/.cache/quality)")
    p.add_argument("--splits", nargs="+", default=["dev", "test"], choices=["dev", "test"])
    p.add_argument("--window", type=int, default=None, help="tokens of context (default: model context, <= 1024)")
    p.add_argument("--stride", type=int, default=None, help="tokens the window moves by (default: window/2)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--results", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    set_threads(a.threads)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if a.model == "helper":
        path = ensure_helper(a.cache)  # the committed helper when the cache has none
    else:
        path = cache_dir(a.cache) / NAMED[a.model] if a.model in NAMED else Path(a.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ctx = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 1024)
    window = a.window or min(ctx, 1024)
    stride = a.stride or window // 2
    shown = path.resolve().relative_to(REPO) if path.resolve().is_relative_to(REPO) else path
    entry = {"model": str(shown), "vocab_size": len(tokenizer), "window": window, "stride": stride,
             "separator": tokenizer.convert_ids_to_tokens(separator_id(tokenizer)),
             "parameters": sum(p.numel() for p in model.parameters()), "splits": {}}
    for split in a.splits:
        t0 = time.perf_counter()
        docs = read_jsonl(splits_dir(a.cache) / f"{split}.jsonl")
        res = score_split(model, tokenizer, docs, window, stride)
        res["seconds"] = round(time.perf_counter() - t0, 1)
        entry["splits"][split] = res
        print(f"{a.name or a.model} {split}: {res['bits_per_byte']:.4f} bits/byte, token ppl {res['token_perplexity']:.2f}, "
              f"word ppl {res['word_perplexity']:.1f}, {res['tokens_per_word']:.2f} tokens/word "
              f"({res['documents']} documents, {res['bytes']:,} bytes, {res['seconds']:.0f} s)", flush=True)
    results = json.loads(a.results.read_text()) if a.results.is_file() else {}
    old = results.get(a.name or a.model, {})
    entry["splits"] = {**old.get("splits", {}), **entry["splits"]}
    results[a.name or a.model] = entry
    atomic_write_json(a.results, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
