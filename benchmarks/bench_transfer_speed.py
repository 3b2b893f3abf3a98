"""Speed and memory of the embedding computation: the original per-token loop vs ``clp-original`` and ``clp``.

Synthetic problem of realistic size (defaults: source 50k x 1024, helper 50k x 768, 30k missing tokens).
Each approach runs in its own subprocess so that its peak RSS is its own. The original loop is timed on
``--loop-tokens`` missing tokens and extrapolated linearly to all of them (its per-token cost is constant;
``--loop-tokens 0`` runs them all, ~15+ minutes).

    python benchmarks/bench_transfer_speed.py            # writes benchmarks/results/bench_transfer_speed.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def make_problem(args):
    import numpy as np

    rng = np.random.default_rng(0)
    # Anisotropic "trained-looking" embeddings: a shared offset plus noise.
    src = (rng.standard_normal((args.source_vocab, args.dim)) * 0.5 + rng.standard_normal(args.dim)).astype("float32")
    hlp = (rng.standard_normal((args.target_vocab, args.helper_dim)) * 0.5 + rng.standard_normal(args.helper_dim)).astype("float32")
    perm = rng.permutation(args.target_vocab)
    missing = np.sort(perm[: args.missing])
    overlap_t = np.sort(perm[args.missing:])
    overlap_s = rng.choice(args.source_vocab, size=len(overlap_t), replace=False)
    return src, hlp, overlap_t, overlap_s, missing


def child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    src, hlp, overlap_t, overlap_s, missing = make_problem(args)
    t = time.perf_counter()
    if args.approach == "original-loop":
        sys.path.insert(0, str(HERE))
        from original_clp_loop import original_clp_loop

        limit = args.loop_tokens or None
        t_sims = time.perf_counter()
        original_clp_loop(src, hlp, overlap_t, overlap_s, missing, limit=limit)
        elapsed = time.perf_counter() - t_sims
        done = limit or len(missing)
        # Split measured time into the batched part (sims, init) and the per-token loop to extrapolate.
        t0 = time.perf_counter()
        from original_clp_loop import cosine_matrix

        cosine_matrix(hlp[missing], hlp[overlap_t])
        batched = time.perf_counter() - t0
        per_token = max(elapsed - batched, 0) / done
        seconds = batched + per_token * len(missing)
        extra = {"tokens_timed": done, "per_token_ms": per_token * 1e3, "extrapolated": done < len(missing)}
    else:
        from clp_transfer.transfer.methods import EmbeddingProblem, compute_target_embeddings

        source_id = torch.full((args.target_vocab,), -1)
        source_id[torch.from_numpy(overlap_t)] = torch.from_numpy(overlap_s)
        problem = EmbeddingProblem(torch.from_numpy(src), source_id, args.target_vocab,
                                   helper_input=torch.from_numpy(hlp))
        compute_target_embeddings(problem, args.approach)
        seconds = time.perf_counter() - t
        extra = {}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"approach": args.approach, "seconds": seconds, "peak_rss_mb": rss, **extra}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source-vocab", type=int, default=50_000)
    p.add_argument("--target-vocab", type=int, default=50_000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--helper-dim", type=int, default=768)
    p.add_argument("--missing", type=int, default=30_000)
    p.add_argument("--loop-tokens", type=int, default=1500, help="missing tokens to time the loop on (0 = all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--approach", default=None, help=argparse.SUPPRESS)
    p.add_argument("--output", default=str(HERE / "results" / "bench_transfer_speed.json"))
    args = p.parse_args()
    if args.approach:
        print(json.dumps(child(args)))
        return
    results = []
    for approach in ("original-loop", "clp-original", "clp"):
        cmd = [sys.executable, __file__, "--approach", approach] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("approach", "output")]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        results.append(json.loads(out))
        print(f"{approach:14s} {results[-1]['seconds']:9.1f} s   peak RSS {results[-1]['peak_rss_mb']:7.0f} MB",
              flush=True)
    loop = results[0]["seconds"]
    for r in results:
        r["speedup_vs_loop"] = loop / r["seconds"]
    summary = {
        "problem": {k: getattr(args, k) for k in ("source_vocab", "target_vocab", "dim", "helper_dim", "missing")},
        "threads": args.threads,
        "results": results,
    }
    for r in results[1:]:
        print(f"{r['approach']} is {r['speedup_vs_loop']:.0f}x faster than the original loop")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
