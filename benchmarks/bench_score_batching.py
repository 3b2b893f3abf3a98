"""The exact scorer's padded batches: fixed batches of 8 windows against batches of similar length
(``evaluate.perplexity.length_batches``), side by side in one process, on the documents ``--method auto``
checks its candidates on.

SmolLM2-135M (``benchmarks/quality/make_source.py``) fed rows for the 16k German helper vocabulary
(``benchmarks/assets/helper-de-600``; random rows - only the time is measured, and the bits per byte of both
sides are checked to agree); the check documents ``TargetText`` holds out of ``helper_train`` (2048 tokens, 9
documents of mixed length). Each side is timed ``--repeats`` times, alternating, one thread.

    python benchmarks/bench_score_batching.py     # ~2 minutes -> benchmarks/results/bench_score_batching.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[1]


def fixed_batches(lengths, batch_size, min_fill=0.0):
    """The previous rule: consecutive batches of ``batch_size`` windows whatever their lengths."""
    return [list(range(i, min(i + batch_size, len(lengths)))) for i in range(0, len(lengths), batch_size)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=REPO / "benchmarks" / ".cache" / "quality")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "bench_score_batching.json")
    a = p.parse_args()
    import torch
    from transformers import AutoTokenizer

    from clp_transfer.evaluate import perplexity
    from clp_transfer.transfer.calibration import TargetText

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(REPO / "benchmarks" / "assets" / "helper-de-600")
    probe = TargetText(a.cache / "smollm2-135m", tok, str(a.cache / "splits" / "helper_train.jsonl"),
                       check_tokens=2048)
    rows = torch.randn(len(tok), 576, generator=torch.Generator().manual_seed(0)) * 0.02
    lengths = sorted(len(tok(d, add_special_tokens=False)["input_ids"]) for d in probe.check_documents)
    times: dict[str, list[float]] = {"fixed batches of 8": [], "similar lengths (default)": []}
    bpb: dict[str, float] = {}
    probe.bits_per_byte(rows, None, 2048)  # warm-up: model load, first-call allocations
    for _ in range(a.repeats):
        for name in times:
            patch = mock.patch.object(perplexity, "length_batches", fixed_batches) if name.startswith("fixed") \
                else mock.patch.object(perplexity, "length_batches", perplexity.length_batches)
            with patch:
                t = time.perf_counter()
                bpb[name] = probe.bits_per_byte(rows, None, 2048)
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["fixed batches of 8"] / med["similar lengths (default)"]
    assert abs(bpb["fixed batches of 8"] - bpb["similar lengths (default)"]) < 1e-6, bpb
    out = {"documents": len(lengths), "document_tokens": lengths, "seconds": times, "median_s": med,
           "ratio_fixed_over_default": round(ratio, 2), "bits_per_byte": bpb, "threads": 1}
    a.output.write_text(json.dumps(out, indent=1) + "\n")
    for k, v in med.items():
        print(f"{k:28s} median {v:.2f} s  (runs: {', '.join(f'{x:.2f}' for x in times[k])})")
    print(f"fixed / similar lengths: {ratio:.2f}x  -> {a.output}")


if __name__ == "__main__":
    main()
