"""Throughput and memory of ``clp-transfer prepare`` vs the Hugging Face ``run_clm.py`` recipe, side by side.

Corpus: the German text of ``../shared/corpora/*.de.txt.gz`` (one document per line, ~14 MB), repeated until it
reaches each ``--sizes-mb`` size (default 100 and 200 MB, as issue 3 asks), plus the text once (``1x``). Every copy
after the first is *perturbed*: the words (split at single spaces) of every document are shuffled with a seeded
RNG, so no document repeats and the byte count stays exactly the same. Word frequencies do repeat, and in a
repeated corpus *no new word appears after the first copy*, which flatters any word cache (``prepare``'s piece
cache; the Rust BPE's own word cache, on both sides). A real corpus keeps bringing new words at a slowly falling
rate (Heaps' law): ``1x`` is the cold-cache lower bound, ``NNMB`` the upper bound, and the README puts a real
corpus between them. Tokenizer: a 32k byte-level BPE trained on the text with ``tokenizers``.

Memory and worst case: ``prepare`` alone on never-repeating random words (``--synthetic-mb``, default 16 and
48 MB), where a word cache can only cost.

Competitors, each in its own subprocess (peak memory is its own, workers included), 2 processes/threads each:

- ``prepare``: ``clp-transfer prepare --files ... --tokenizer ... --block_size 512 --num_proc 2`` with its
  defaults (2 worker processes, piece cache on; split 90/10 covering the whole file; writes train/valid.jsonl,
  token shards and stats.json);
- ``prepare-no-cache``: the same with ``--no-piece_cache`` (every byte through the Rust tokenizer);
- ``prepare-threads`` (``--threads``): ``--no-piece_cache --parallelism threads`` (one process, Rust threads);
- ``run_clm``: the recipe of transformers' ``examples/pytorch/language-modeling/run_clm.py``, re-implemented
  here: ``load_dataset("text")`` into a fresh cache dir, ``map(tokenize, batched=True, num_proc=2)``,
  ``map(group_texts, batched=True, num_proc=2)`` into blocks of 512 with labels;
- ``rust-ceiling``: the Rust tokenizer alone (``Tokenizer.encode_batch_fast`` with 2 rayon threads on batches of
  10,000 lines read from the file, nothing written), with its default word cache: what a pipeline that sends
  every byte through the stock tokenizer can reach at most.

Reported per run: wall time of the whole process (imports, tokenizer loading and process start-up included),
input MB/s (2**20 bytes of the input file), tokens/s (tokens of the document text; run_clm's count also holds
the "\n" it keeps at the end of every line, ``prepare``'s count leaves out the EOS it writes after every
document: both are one token per document on top of the text), peak RSS summed over the process tree (sampled
every 0.1 s; an upper bound, shared pages count once per process), peak PSS summed over the tree (shared pages
split) and the largest single process's max RSS (getrusage).

The machine is shared: competitors run one after the other, so a load spike hits whichever runs at that time.
``loadavg`` is recorded before every run.

    python benchmarks/bench_prepare.py                   # ~15 minutes on 2 cores
    python benchmarks/bench_prepare.py --sizes-mb 100 --no-uncached --synthetic-mb ''   # quicker
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import math
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_CORPORA = Path(__file__).resolve().parents[2] / "shared" / "corpora"
MB = 2**20


# ----------------------------------------------------------------------------------------------- the recipe
def recipe_child(args: argparse.Namespace) -> None:
    """run_clm.py's data path: text dataset -> batched tokenization -> group_texts, num_proc workers."""
    t_start = time.perf_counter()
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    t0 = time.perf_counter()
    # run_clm's default keep_linebreaks=True: each line keeps its "\n" (one more token per document, which
    # matches the EOS that prepare writes instead).
    raw = datasets.load_dataset("text", data_files={"train": args.corpus}, cache_dir=args.cache_dir,
                                keep_linebreaks=True)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    columns = raw["train"].column_names
    text_column = "text" if "text" in columns else columns[0]

    def tokenize_function(examples):
        return tokenizer(examples[text_column])

    t1 = time.perf_counter()
    tokenized = raw.map(tokenize_function, batched=True, num_proc=args.num_proc, remove_columns=columns)
    t2 = time.perf_counter()
    block_size = args.block_size

    def group_texts(examples):
        # Concatenate every column, cut into blocks of block_size (dropping the remainder), labels = inputs.
        joined = {k: list(itertools.chain.from_iterable(examples[k])) for k in examples}
        total = (len(joined["input_ids"]) // block_size) * block_size
        result = {k: [v[i : i + block_size] for i in range(0, total, block_size)] for k, v in joined.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    grouped = tokenized.map(group_texts, batched=True, num_proc=args.num_proc)
    t3 = time.perf_counter()
    import pyarrow.compute as pc

    lengths = pc.list_value_length(tokenized["train"].data.column("input_ids"))
    out = {
        "tokens": int(pc.sum(lengths).as_py()),
        "blocks": grouped["train"].num_rows,
        "phases_s": {"imports": t0 - t_start, "load_dataset": t1 - t0, "tokenize_map": t2 - t1, "group_texts_map": t3 - t2},
    }
    Path(args.result).write_text(json.dumps(out))


def ceiling_child(args: argparse.Namespace) -> None:
    """The Rust tokenizer alone on the file's lines: rayon threads, large batches, no Python per-token work."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(args.tokenizer) / "tokenizer.json"))
    tok.encode_special_tokens = True
    tokens = 0
    batch: list[str] = []
    with open(args.corpus, encoding="utf-8", newline="\n") as f:
        for line in f:
            batch.append(line.rstrip("\n"))
            if len(batch) == 10_000:
                tokens += sum(map(len, tok.encode_batch_fast(batch, add_special_tokens=False)))
                batch = []
    if batch:
        tokens += sum(map(len, tok.encode_batch_fast(batch, add_special_tokens=False)))
    Path(args.result).write_text(json.dumps({"tokens": tokens}))


# ------------------------------------------------------------------------------------------------ measuring
def _tree(proc):
    try:
        return [proc, *proc.children(recursive=True)]
    except Exception:
        return [proc]


def run_measured(cmd: list[str], env: dict[str, str]) -> dict:
    """Run ``cmd``; wall time, peak tree RSS and PSS (sampled), max single-process RSS (getrusage)."""
    import psutil

    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    before = r0.ru_maxrss
    t0 = time.perf_counter()
    popen = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc = psutil.Process(popen.pid)
    peak = {"rss": 0, "pss": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            rss = pss = 0
            for p in _tree(proc):
                try:
                    info = p.memory_full_info()
                    rss += info.rss
                    pss += getattr(info, "pss", info.rss)
                except Exception:
                    pass
            peak["rss"] = max(peak["rss"], rss)
            peak["pss"] = max(peak["pss"], pss)
            done.wait(0.1)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    stdout, stderr = popen.communicate()
    wall = time.perf_counter() - t0
    done.set()
    th.join()
    if popen.returncode != 0:
        raise SystemExit(f"command failed ({popen.returncode}): {' '.join(cmd)}\n{stderr[-3000:]}")
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    after = r1.ru_maxrss
    return {
        "wall_s": wall,
        # CPU seconds of the whole tree (user + sys of every waited-for descendant): less sensitive than wall
        # time to other users' load on a shared machine.
        "cpu_s": (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime),
        "peak_tree_rss_mb": peak["rss"] / MB,
        "peak_tree_pss_mb": peak["pss"] / MB,
        # ru_maxrss of children is the largest of any one descendant so far (KB): only meaningful when it grew.
        "max_single_process_rss_mb": after / 1024 if after > before else None,
        "stderr_tail": stderr[-600:],
    }


# -------------------------------------------------------------------------------------------------- set-up
def load_german(corpora: Path) -> list[str]:
    files = sorted(corpora.glob("*.de.txt.gz"))
    if not files:
        raise SystemExit(f"no *.de.txt.gz under {corpora}; pass --corpora")
    lines: list[str] = []
    for f in files:
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            lines.extend(line.rstrip("\n") for line in fh if line.strip())
    return lines


def train_bpe(lines: list[str], vocab_size: int, out: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(lines, trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                            unk_token="<|endoftext|>").save_pretrained(out)
    return out


def perturbed(lines: list[str], copy: int) -> list[str]:
    """Copy 0 as is; later copies shuffle the words of every document (same bytes, different documents)."""
    if copy == 0:
        return lines
    rng = random.Random(copy)
    out = []
    for line in lines:
        words = line.split(" ")
        rng.shuffle(words)
        out.append(" ".join(words))
    return out


def write_corpus(lines: list[str], target_mb: float | None, path: Path, perturb: bool = True) -> dict:
    """The text repeated until it holds ``target_mb`` (None: once), copies perturbed; returns sizes."""
    block = ("\n".join(lines) + "\n").encode("utf-8")
    copies = 1 if target_mb is None else max(1, math.ceil(target_mb * MB / len(block)))
    with open(path, "wb") as f:
        for k in range(copies):
            data = ("\n".join(perturbed(lines, k)) + "\n").encode("utf-8") if perturb and k else block
            assert len(data) == len(block)
            f.write(data)
    text_bytes = (len(block) - len(lines)) * copies  # document text without the newlines
    return {"copies": copies, "file_mb": len(block) * copies / MB, "text_bytes": text_bytes,
            "documents": len(lines) * copies}


def write_synthetic(target_mb: float, path: Path, seed: int = 0) -> dict:
    """Random lowercase words (3-12 letters), 100 per line: text that never repeats, so caches cannot help and
    keep starting over. Shows that memory stays flat when nothing is reused."""
    import numpy as np

    rng = np.random.default_rng(seed)
    target = int(target_mb * MB)
    written = text_bytes = docs = 0
    with open(path, "wb") as f:
        while written < target:
            n_words = 100_000
            lens = rng.integers(3, 13, size=n_words)
            letters = rng.integers(ord("a"), ord("z") + 1, size=int(lens.sum()), dtype=np.uint8)
            ends = np.cumsum(lens + 1) - 1  # a separator after every word
            buf = np.empty(int(ends[-1]) + 1, dtype=np.uint8)
            mask = np.ones(len(buf), dtype=bool)
            mask[ends] = False
            buf[mask] = letters
            buf[ends] = ord(" ")
            buf[ends[99::100]] = ord("\n")
            data = buf.tobytes()
            f.write(data)
            written += len(data)
            docs += n_words // 100
            text_bytes += len(data) - n_words // 100
    return {"copies": 0, "file_mb": written / MB, "text_bytes": text_bytes, "documents": docs}


def new_word_shares(lines: list[str], seed: int = 0) -> list[float]:
    """Share of new words (split at spaces, never seen before) in each successive MB of the German text, its
    documents shuffled (seeded) so that the sources mix as in a crawl: how fast a word cache warms up on real
    text (Heaps' law), as opposed to the repeated benchmark corpus, where no word is new after the first copy."""
    docs = list(lines)
    random.Random(seed).shuffle(docs)
    seen: set[str] = set()
    shares, size, words, new = [], 0, 0, 0
    for d in docs:
        for w in d.split(" "):
            words += 1
            if w not in seen:
                seen.add(w)
                new += 1
        size += len(d.encode("utf-8")) + 1
        if size >= MB:
            shares.append(round(new / words, 4))
            size = words = new = 0
    return shares


def write_results(args: argparse.Namespace, lines: list[str], runs: list[dict], final: bool) -> None:
    # Same tokenization on both sides: run_clm's tokens (text + one "\n" per line) = prepare's text + EOS.
    for label in {r["corpus"] for r in runs}:
        toks = {r["competitor"]: r.get("tokens_with_eos", r["tokens"]) for r in runs if r["corpus"] == label}
        if len(set(toks.values())) != 1:
            if final:
                print(f"WARNING: token counts differ for {label}: {toks}")
    ratios: dict = {}
    cpu_ratios: dict = {}
    for label in dict.fromkeys(r["corpus"] for r in runs):
        by = {r["competitor"]: r for r in runs if r["corpus"] == label}
        if "run_clm" in by:
            ratios[label] = {k: round(by[k]["mb_per_s"] / by["run_clm"]["mb_per_s"], 2) for k in by if k != "run_clm"}
            cpu_ratios[label] = {k: round(by["run_clm"]["cpu_s"] / by[k]["cpu_s"], 2) for k in by if k != "run_clm"}
    if final:
        print("\nthroughput (wall) relative to run_clm:", json.dumps(ratios))
        print("CPU-time efficiency relative to run_clm:", json.dumps(cpu_ratios))
    result = {
        "benchmark": "bench_prepare",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_at_end": os.getloadavg()},
        "settings": {"vocab_size": args.vocab_size, "block_size": args.block_size, "num_proc": args.num_proc,
                     "perturbed_copies": args.perturb,
                     "corpora": str(args.corpora), "documents_once": len(lines)},
        "new_word_share_per_mb_of_the_text_once": args.new_word_shares,
        "complete": final,
        "runs": runs,
        "throughput_ratio_vs_run_clm": ratios,
        "cpu_time_ratio_vs_run_clm": cpu_ratios,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.output)
    if final:
        print(f"wrote {args.output}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpora", type=Path, default=DEFAULT_CORPORA)
    ap.add_argument("--sizes-mb", default="100,200", help="comma-separated corpus sizes (repetitions of the text)")
    ap.add_argument("--vocab-size", type=int, default=32000)
    ap.add_argument("--block-size", type=int, default=512)
    ap.add_argument("--num-proc", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None, help="scratch space (default: a temporary directory)")
    ap.add_argument("--uncached", action=argparse.BooleanOptionalAction, default=True,
                    help="also run prepare --no-piece_cache (the Rust tokenizer alone in the workers)")
    ap.add_argument("--threads", action=argparse.BooleanOptionalAction, default=False,
                    help="also run prepare --no-piece_cache --parallelism threads (at the first size and 1x)")
    ap.add_argument("--ceiling", action=argparse.BooleanOptionalAction, default=True,
                    help="also run the Rust tokenizer alone (2 threads, nothing written)")
    ap.add_argument("--perturb", action=argparse.BooleanOptionalAction, default=True,
                    help="shuffle the words of every document in each copy after the first")
    ap.add_argument("--unique", action=argparse.BooleanOptionalAction, default=True,
                    help="also run every competitor on the text once (1x, nothing repeats)")
    ap.add_argument("--synthetic-mb", default="16,48",
                    help="sizes of never-repeating random text for prepare alone (memory check; '' to skip)")
    ap.add_argument("--output", type=Path, default=HERE / "results" / "bench_prepare.json")
    # child mode (internal)
    ap.add_argument("--child-recipe", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-ceiling", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_recipe:
        recipe_child(args)
        return
    if args.child_ceiling:
        ceiling_child(args)
        return

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-prepare-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        lines = load_german(args.corpora)
        args.new_word_shares = new_word_shares(lines)
        t = time.perf_counter()
        tok_dir = train_bpe(lines, args.vocab_size, work / "tokenizer")
        print(f"trained a {args.vocab_size} byte-level BPE on {len(lines):,} German documents in "
              f"{time.perf_counter() - t:.1f} s", flush=True)
        sizes: list[float | None] = ([None] if args.unique else []) + [float(s) for s in args.sizes_mb.split(",")]
        synthetic = [float(s) for s in args.synthetic_mb.split(",") if s.strip()]
        # Most important first (results are written after every run, so a cut-short run still reports).
        first = [s for s in sizes if s is not None][:1]
        plan = ([(s, False) for s in first] + [(s, True) for s in synthetic]
                + [(s, False) for s in sizes if s not in first])
        runs: list[dict] = []
        for size, is_synthetic in plan:
            label = ("1x" if size is None else f"{size:g}MB") + ("-random" if is_synthetic else "")
            corpus = work / f"de-{label}.txt"
            info = write_synthetic(size, corpus) if is_synthetic else write_corpus(lines, size, corpus, args.perturb)
            n = int(info["text_bytes"] * 0.9)
            competitors = ["prepare"] if is_synthetic else ["run_clm", "prepare"]
            if args.uncached and not is_synthetic:
                competitors.append("prepare-no-cache")
            if args.threads and not is_synthetic and (size is None or size == sizes[1 if args.unique else 0]):
                competitors.append("prepare-threads")
            if args.ceiling and not is_synthetic:
                competitors.append("rust-ceiling")
            for name in competitors:
                out = work / f"out-{name}-{label}"
                load = os.getloadavg()[0]
                run_env = env
                result = work / f"child-{name}-{label}.json"
                if name == "rust-ceiling":
                    run_env = {**env, "RAYON_NUM_THREADS": str(args.num_proc), "TOKENIZERS_PARALLELISM": "true"}
                    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-ceiling", "--corpus", str(corpus),
                           "--tokenizer", str(tok_dir), "--result", str(result)]
                elif name == "run_clm":
                    cache = work / f"hf-cache-{label}"
                    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-recipe", "--corpus", str(corpus),
                           "--tokenizer", str(tok_dir), "--cache-dir", str(cache), "--result", str(result),
                           "--num-proc", str(args.num_proc), "--block-size", str(args.block_size)]
                else:
                    cmd = [sys.executable, "-m", "clp_transfer.cli", "--log-level", "WARNING", "prepare",
                           "--files", str(corpus), "--output_dir", str(out), "--tokenizer", str(tok_dir),
                           "--block_size", str(args.block_size), "--num_proc", str(args.num_proc),
                           "--subsample_size_mb", repr(n / MB),
                           "--valid_size_mb", repr((info["text_bytes"] - n) / MB), "--no-progress"]
                    if name == "prepare-no-cache":
                        cmd.append("--no-piece_cache")
                    if name == "prepare-threads":
                        cmd += ["--no-piece_cache", "--parallelism", "threads"]
                m = run_measured(cmd, run_env)
                if name == "rust-ceiling":
                    tokens = json.loads(result.read_text())["tokens"]
                    extra = {"tokens_with_eos": tokens + info["documents"]}  # one separator per line, as the others
                elif name == "run_clm":
                    child = json.loads(result.read_text())
                    tokens, extra = child["tokens"], {"blocks": child["blocks"], "phases_s": child["phases_s"]}
                    shutil.rmtree(cache, ignore_errors=True)
                else:
                    stats = json.loads((out / "stats.json").read_text())
                    sp = stats["splits"]
                    tokens = sum(s["text_tokens"] for s in sp.values())
                    extra = {"blocks": sum(s["blocks"] for s in sp.values()), "work_s": stats["run"]["seconds"],
                             "documents": sum(s["documents"] for s in sp.values()),
                             "tokens_with_eos": sum(s["tokens"] for s in sp.values())}
                    shutil.rmtree(out, ignore_errors=True)
                row = {
                    "competitor": name, "corpus": label, "copies": info["copies"], "loadavg_1m_before": load,
                    "input_mb": info["file_mb"],
                    "text_mb": info["text_bytes"] / MB, "tokens": tokens, "wall_s": round(m["wall_s"], 2),
                    "mb_per_s": round(info["file_mb"] / m["wall_s"], 3),
                    "tokens_per_s": round(tokens / m["wall_s"]),
                    "cpu_s": round(m["cpu_s"], 2), "mb_per_cpu_s": round(info["file_mb"] / m["cpu_s"], 3),
                    "peak_tree_rss_mb": round(m["peak_tree_rss_mb"], 1),
                    "peak_tree_pss_mb": round(m["peak_tree_pss_mb"], 1),
                    "max_single_process_rss_mb": (round(m["max_single_process_rss_mb"], 1)
                                                  if m["max_single_process_rss_mb"] else None),
                    **extra,
                }
                runs.append(row)
                print(f"{label:>7} {name:16s} {row['wall_s']:7.1f} s {row['mb_per_s']:6.2f} MB/s "
                      f"{row['tokens_per_s']:>9,} tok/s  CPU {row['cpu_s']:6.1f} s  RSS {row['peak_tree_rss_mb']:6.0f} MB "
                      f"PSS {row['peak_tree_pss_mb']:6.0f} MB  tokens {tokens:,}", flush=True)
                write_results(args, lines, runs, final=False)
            corpus.unlink()

        write_results(args, lines, runs, final=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
