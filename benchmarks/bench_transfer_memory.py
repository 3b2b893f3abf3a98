"""Peak memory of a whole ``transfer`` run against the size of the source checkpoint.

Builds a sharded GPT-NeoX source (defaults: d=1024, 24 layers, 50k vocab, ~1.6 GB fp32 in 200 MB shards) and a
small helper, then runs ``clp-transfer transfer`` in a subprocess and reads its peak RSS. The claim to check:
peak RSS is about the embedding matrices plus one shard, not the model size.

    python benchmarks/bench_transfer_memory.py     # writes benchmarks/results/bench_transfer_memory.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build(root: Path, args) -> tuple[Path, Path]:
    import torch
    from transformers import AutoModelForCausalLM

    from clp_transfer.tiny import save_model, tiny_config, tiny_model, train_tokenizer

    text = [f"word{i} token{i % 97} piece{i % 13} " * 3 for i in range(3000)]
    src_tok = train_tokenizer(text, args.source_vocab, "bpe", min_frequency=1)
    hlp_tok = train_tokenizer([t.replace("word", "wort") for t in text], args.target_vocab, "bpe", min_frequency=1)
    cfg = tiny_config("gpt_neox", args.source_vocab, hidden_size=args.dim, num_layers=args.layers, num_heads=16)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    model = model.to_empty(device="cpu")  # values do not matter for memory; skip the slow random init
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    src = save_model(model, src_tok, root / "source", max_shard_size=args.shard_size)
    del model
    hlp = save_model(tiny_model("gpt2", hlp_tok, hidden_size=256, num_layers=2, num_heads=4), hlp_tok, root / "helper")
    return src, hlp


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--source-vocab", type=int, default=50_000)
    p.add_argument("--target-vocab", type=int, default=30_000)
    p.add_argument("--shard-size", default="200MB")
    p.add_argument("--output", default=str(HERE / "results" / "bench_transfer_memory.json"))
    p.add_argument("--build-into", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.build_into:
        build(Path(args.build_into), args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # Build in a child process: Linux carries a parent's peak RSS into children across fork+exec, so the
        # transfer must be started from this small process, not from one that held the model.
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("output", "build_into")]
        subprocess.run([sys.executable, __file__, *flags, "--build-into", str(root)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        src, hlp = root / "source", root / "helper"
        build_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        files = sorted(src.glob("*.safetensors"))
        total_mb = sum(f.stat().st_size for f in files) / 2**20
        largest_mb = max(f.stat().st_size for f in files) / 2**20
        t = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "clp_transfer.cli", "transfer", "--source", str(src),
                              "--helper", str(hlp), "--output", str(root / "target")], capture_output=True, text=True)
        seconds = time.perf_counter() - t
        if run.returncode:
            sys.exit(run.stderr)
        report = json.loads((root / "target" / "transfer_report.json").read_text())
    child_rss = report["peak_rss_mb"]  # measured inside the transfer process
    emb_mb = args.source_vocab * args.dim * 4 / 2**20
    result = {
        "source_checkpoint_mb": round(total_mb, 1),
        "shards": len(files),
        "largest_shard_mb": round(largest_mb, 1),
        "source_embedding_mb": round(emb_mb, 1),
        "transfer_peak_rss_mb": round(child_rss, 1),
        "builder_peak_rss_mb": round(build_rss, 1),
        "seconds": round(seconds, 1),
        "matching": report["matching"],
    }
    print(json.dumps(result, indent=2))
    print(f"peak RSS {child_rss:.0f} MB for a {total_mb:.0f} MB checkpoint "
          f"({child_rss / total_mb:.2f}x its size; embeddings {emb_mb:.0f} MB, largest shard {largest_mb:.0f} MB)")
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
