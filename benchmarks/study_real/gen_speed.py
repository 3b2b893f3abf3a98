"""Generation speed of the study's two vocabularies (issue 22): German words per second of greedy decoding.

Decoding speed depends on the architecture and the vocabulary size, not on the weights, so it is timed on the
step-0 models (the untouched source with its own 49k tokenizer, the default ``clp`` init with the 16k German
one) and converted to words with each tokenizer's tokens per word on the test split:

    words/s = (generated tokens / s) / (test tokens per German word)

Both models decode the same German prompts, batch 1, ``--new_tokens`` tokens each (forced with
``min_new_tokens``), after one warm-up generation; ``--repeats`` rounds, median reported. Writes
``<results>/gen_speed.json`` and prints the ratio.

    python benchmarks/study_real/gen_speed.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "benchmarks" / "study"))

from run_study import set_threads, write_json  # noqa: E402

PROMPTS = ["Die Katze", "Um die Datei zu speichern,", "Das Wetter ist heute", "In der Konfigurationsdatei"]


def tokens_per_second(path: Path, new_tokens: int, repeats: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def one(prompt: str, n: int) -> float:
        ids = tok(prompt, return_tensors="pt")
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(**ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad)
        return time.perf_counter() - t

    one(PROMPTS[0], 4)  # warm-up
    rates = []
    for _ in range(repeats):
        seconds = sum(one(p, new_tokens) for p in PROMPTS)
        rates.append(len(PROMPTS) * new_tokens / seconds)
    return {"tokens_per_second": statistics.median(rates), "rounds": rates, "vocab_rows": model.config.vocab_size}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quality_cache", type=Path, default=REPO / "benchmarks" / ".cache" / "quality")
    p.add_argument("--cache", type=Path, default=REPO / "benchmarks" / ".cache" / "study_real")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "study_real")
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    set_threads(a.threads)
    runs = {"source": json.loads((a.results / "runs" / "source-cpt-s0.json").read_text()),
            "clp": json.loads((a.results / "runs" / "clp-s0.json").read_text())}
    paths = {"source": a.quality_cache / "smollm2-135m", "clp": a.cache / "inits" / "clp"}
    out = {}
    for name, path in paths.items():
        r = tokens_per_second(path, a.new_tokens, a.repeats)
        tpw = runs[name]["step0"]["test"]["tokens_per_word"]
        out[name] = {**r, "test_tokens_per_word": tpw, "words_per_second": r["tokens_per_second"] / tpw,
                     "model": str(path)}
    out["ratio_words_per_second"] = out["clp"]["words_per_second"] / out["source"]["words_per_second"]
    out["settings"] = {"new_tokens": a.new_tokens, "repeats": a.repeats, "threads": a.threads, "prompts": PROMPTS}
    write_json(a.results / "gen_speed.json", out)
    for name in paths:
        print(f"{name:7s} {out[name]['tokens_per_second']:6.1f} tokens/s  {out[name]['words_per_second']:6.1f} words/s")
    print(f"ratio (clp / source) words/s: {out['ratio_words_per_second']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
