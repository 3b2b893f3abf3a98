"""Where the word cache stops paying: prepare's Encoder with and without the piece cache on German text in
which a share of the words is replaced by random strings (never seen again), one process, one thread.

For each share: the mean share of new words per 1 MB chunk (what ``bypass_new_fraction`` is compared with),
CPU seconds of the cached path with the bypass off, of the Rust tokenizer alone, and of the default encoder
(cache with the bypass). The ids of all three are checked to be identical. Text: the first 30,000 German
documents of ``../shared/corpora`` (~5 MB, a cold cache: the first MB of natural German has ~22% new words);
tokenizer: a 32k byte-level BPE trained on all the German text.

    python benchmarks/bench_piece_cache.py      # ~2 minutes -> benchmarks/results/bench_piece_cache.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_prepare import DEFAULT_CORPORA, load_german, train_bpe  # noqa: E402


def chunks_of(docs: list[str], size: int = 1 << 20) -> list[list[str]]:
    out, cur, n = [], [], 0
    for d in docs:
        cur.append(d)
        n += len(d.encode("utf-8"))
        if n >= size:
            out.append(cur)
            cur, n = [], 0
    return out + ([cur] if cur else [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpora", type=Path, default=DEFAULT_CORPORA)
    ap.add_argument("--documents", type=int, default=30_000)
    ap.add_argument("--shares", default="0,0.1,0.2,0.3,0.4,1.0", help="shares of words replaced by random strings")
    ap.add_argument("--output", type=Path, default=HERE / "results" / "bench_piece_cache.json")
    args = ap.parse_args()
    from tokenizers import Tokenizer

    from clp_transfer.data.encode import Encoder, EncoderSpec, plan_piece_cache

    lines = load_german(args.corpora)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tj = Tokenizer.from_file(str(train_bpe(lines, 32000, Path(tmp) / "tok") / "tokenizer.json")).to_str()
    patterns, nfc, _ = plan_piece_cache(tj, True)
    spec = EncoderSpec(tj, 0, "uint16")
    default_bypass = spec.bypass_new_fraction
    for share in (float(x) for x in args.shares.split(",")):
        rng = random.Random(0)
        letters = "abcdefghijklmnopqrstuvwxyz"

        def noisy(word: str) -> str:
            return "".join(rng.choice(letters) for _ in range(rng.randint(4, 10))) if rng.random() < share else word

        docs = [" ".join(noisy(w) for w in d.split(" ")) for d in lines[: args.documents]]
        chunks = chunks_of(docs)
        row: dict = {"random_word_share": share, "chunks": len(chunks)}
        ids = {}
        for name, pat, bypass in (("cache_no_bypass", patterns, 1.0), ("rust_only", None, 1.0),
                                  ("default", patterns, default_bypass)):
            enc = Encoder(EncoderSpec(tj, 0, "uint16", True, pat, nfc, bypass_new_fraction=bypass,
                                      **({} if bypass < 1 else {"bypass_always_fraction": 1.0})))
            seen: set = set()
            fractions = []
            t = time.process_time()
            out = [enc.encode(c) for c in chunks]
            row[f"{name}_cpu_s"] = round(time.process_time() - t, 2)
            ids[name] = [a.tolist() for a in out]
            if name == "cache_no_bypass":  # the new-word share per chunk, as the encoder measures it
                for c in chunks:
                    keys = [k for d in c for k in d.split(" ")]
                    fractions.append(len(set(keys) - seen) / max(1, len(keys)))
                    seen.update(keys)
                row["mean_new_word_share_per_chunk"] = round(sum(fractions) / len(fractions), 3)
            if name == "default":
                row["default_bypassed_chunks"] = enc.stats["bypassed_chunks"]
        row["identical_ids"] = ids["cache_no_bypass"] == ids["rust_only"] == ids["default"]
        row["cache_speed_vs_rust"] = round(row["rust_only_cpu_s"] / row["cache_no_bypass_cpu_s"], 2)
        row["default_speed_vs_rust"] = round(row["rust_only_cpu_s"] / row["default_cpu_s"], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"benchmark": "bench_piece_cache", "bypass_new_fraction": default_bypass,
                                       "bypass_always_fraction": spec.bypass_always_fraction,
                                       "bypass_after_chunks": spec.bypass_after_chunks,
                                       "rayon_threads": os.environ["RAYON_NUM_THREADS"], "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
