"""Deterministic document-level split of the German corpora for the initialisation-quality benchmark.

    python benchmarks/quality/data.py [--corpora DIR] [--cache DIR] [--seed 0] [--overwrite]

Documents. The corpora hold one paragraph per line, in the order of the documents they were extracted from.
A *document* here is a run of consecutive lines of one corpus file: a new document starts at the next line
once the current one holds ``--doc_bytes`` (1,500) UTF-8 bytes, and, in the man pages, at every new man page
(a line starting with ``BEZEICHNUNG`` / ``NAME``). Its text is its lines joined by newlines.

Split. Per corpus file, documents are ranked by sha256(seed, text); ``test`` takes documents in that order
until it holds its share of ``--test_bytes`` (60,000; shares proportional to each corpus' size, so test and
dev mix the six corpora like the whole), ``dev`` the next ones up to ``--dev_bytes``. Only documents of at
most ``--max_heldout_doc_bytes`` are eligible. Everything else goes to ``helper_train``, except

- the documents right before and after a held-out one in the same file (same man page or chapter, so the
  closest paraphrases of held-out text): they are left out of every split (``buffer``);
- lines of a training document that occur verbatim in a held-out document (headings, boilerplate).

``cpt_train`` (``--cpt_fraction``, default 0.2 of the training documents, chosen by sha256(seed, "cpt", text)
and ordered by it) is the continued-pretraining text of the real-model study (``benchmarks/study_real``): the
helper never sees it, so the study's training bytes are new to every model.

The English corpora (``*.en.txt.gz``) become ``en_train`` with the same document rule, whole. They are
translations of many of the same documents (not aligned), so English counterparts of held-out German text
can be in ``en_train``; use it only for source-side resources (English fastText, dictionaries).

Output (``<cache>/splits/``, written atomically): ``<split>.jsonl`` (one ``{"id", "corpus", "text"}``
document per line), ``<split>.txt`` (one paragraph per line, for tools that read plain text), and
``manifest.json`` (settings, sizes per split and corpus, sha256 of every file and of the input corpora).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
from collections import defaultdict
from pathlib import Path

from common import DEFAULT_CORPORA, jsonl_text, sha256_file, splits_dir

from clp_transfer.atomic import atomic_directory
from clp_transfer.errors import ClpError

MANPAGE_START = {"de": "BEZEICHNUNG ", "en": "NAME "}


def documents(path: Path, lang: str, doc_bytes: int) -> list[str]:
    """Consecutive lines of one corpus file grouped into documents (see the module docstring)."""
    corpus = path.name.split(".")[0]
    lines = [ln.strip() for ln in gzip.decompress(path.read_bytes()).decode("utf-8").splitlines() if ln.strip()]
    docs: list[str] = []
    cur: list[str] = []
    size = 0
    for line in lines:
        new_page = corpus == "manpages" and line.startswith(MANPAGE_START[lang])
        if cur and (new_page or size >= doc_bytes):
            docs.append("\n".join(cur))
            cur, size = [], 0
        cur.append(line)
        size += len(line.encode("utf-8")) + 1
    if cur:
        docs.append("\n".join(cur))
    return docs


def rank_key(seed: int, text: str) -> bytes:
    return hashlib.sha256(f"{seed}\0{text}".encode("utf-8")).digest()


def nbytes(text: str) -> int:
    return len(text.encode("utf-8"))


def fill(order: list[int], docs: list[str], taken: set[int], quota: float) -> list[int]:
    """Take documents in ``order`` while that brings the total closer to ``quota`` (bytes)."""
    chosen, total = [], 0
    for i in order:
        if total >= quota:
            break
        if i in taken:
            continue
        size = nbytes(docs[i])
        if total + size / 2 > quota:  # taking it would overshoot more than leaving it undershoots
            continue
        chosen.append(i)
        taken.add(i)
        total += size
    return chosen


def cpt_bucket(seed: int, text: str) -> float:
    """A document's place in [0, 1) for the helper / continued-pretraining division of the training text."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0cpt\0{text}".encode("utf-8")).digest()[:8], "big") / 2**64


def make_splits(corpora: Path, seed: int = 0, doc_bytes: int = 1500, dev_bytes: int = 60_000,
                test_bytes: int = 60_000, max_heldout_doc_bytes: int = 6000,
                cpt_fraction: float = 0.0) -> tuple[dict, dict]:
    de_files = sorted(corpora.glob("*.de.txt.gz"))
    en_files = sorted(corpora.glob("*.en.txt.gz"))
    if not de_files:
        raise ClpError(f"no German corpora (*.de.txt.gz) in {str(corpora)!r}; pass --corpora DIR")
    per_file = {f: documents(f, "de", doc_bytes) for f in de_files}
    total = sum(nbytes(d) for docs in per_file.values() for d in docs)
    rows: dict[str, list[dict]] = defaultdict(list)
    stats: dict[str, dict] = {"buffer": {"documents": 0, "bytes": 0}, "dedup_lines_removed": 0}
    for f, docs in per_file.items():
        corpus = f.name.split(".")[0]
        share = sum(nbytes(d) for d in docs) / total
        order = sorted((i for i, d in enumerate(docs) if nbytes(d) <= max_heldout_doc_bytes),
                       key=lambda i: rank_key(seed, docs[i]))
        taken: set[int] = set()
        test = fill(order, docs, taken, test_bytes * share)
        dev = fill(order, docs, taken, dev_bytes * share)
        held = set(test) | set(dev)
        buffer = {j for i in held for j in (i - 1, i + 1) if 0 <= j < len(docs)} - held
        held_lines = {ln for i in held for ln in docs[i].split("\n")}
        for name, idx in (("test", test), ("dev", dev)):
            for i in sorted(idx):
                rows[name].append({"id": f"{corpus}.de:{i:05d}", "corpus": corpus, "text": docs[i]})
        for i, d in enumerate(docs):
            if i in held:
                continue
            if i in buffer:
                stats["buffer"]["documents"] += 1
                stats["buffer"]["bytes"] += nbytes(d)
                continue
            lines = d.split("\n")
            kept = [ln for ln in lines if ln not in held_lines]
            stats["dedup_lines_removed"] += len(lines) - len(kept)
            if kept:
                rows["helper_train"].append({"id": f"{corpus}.de:{i:05d}", "corpus": corpus, "text": "\n".join(kept)})
    for f in en_files:
        corpus = f.name.split(".")[0]
        for i, d in enumerate(documents(f, "en", doc_bytes)):
            rows["en_train"].append({"id": f"{corpus}.en:{i:05d}", "corpus": corpus, "text": d})
    if cpt_fraction > 0:
        train_rows = rows["helper_train"]
        rows["helper_train"] = [r for r in train_rows if cpt_bucket(seed, r["text"]) >= cpt_fraction]
        rows["cpt_train"] = sorted((r for r in train_rows if cpt_bucket(seed, r["text"]) < cpt_fraction),
                                   key=lambda r: cpt_bucket(seed, r["text"]))
    # Guard: no held-out document may appear in a training split.
    train_texts = {r["text"] for r in rows["helper_train"]} | {r["text"] for r in rows.get("cpt_train", [])}
    assert not any(r["text"] in train_texts for s in ("dev", "test") for r in rows[s])
    stats["inputs"] = {f.name: sha256_file(f) for f in de_files + en_files}
    return rows, stats


def split_summary(rows: list[dict]) -> dict:
    by_corpus: dict[str, dict[str, int]] = defaultdict(lambda: {"documents": 0, "bytes": 0})
    for r in rows:
        by_corpus[r["corpus"]]["documents"] += 1
        by_corpus[r["corpus"]]["bytes"] += nbytes(r["text"])
    return {"documents": len(rows), "paragraphs": sum(r["text"].count("\n") + 1 for r in rows),
            "bytes": sum(nbytes(r["text"]) for r in rows), "by_corpus": dict(sorted(by_corpus.items()))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpora", type=Path, default=DEFAULT_CORPORA, help=f"corpus directory (default: {DEFAULT_CORPORA})")
    p.add_argument("--cache", type=Path, default=None, help="benchmark cache directory (default: benchmarks/.cache/quality)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--doc_bytes", "--doc-bytes", type=int, default=1500, help="minimum size of a document")
    p.add_argument("--dev_bytes", "--dev-bytes", type=int, default=60_000)
    p.add_argument("--test_bytes", "--test-bytes", type=int, default=60_000)
    p.add_argument("--max_heldout_doc_bytes", "--max-heldout-doc-bytes", type=int, default=6000)
    p.add_argument("--cpt_fraction", "--cpt-fraction", type=float, default=0.2,
                   help="share of the training documents held apart as the study's continued-pretraining text")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    out = splits_dir(a.cache)
    try:
        if out.exists() and not a.overwrite:
            raise ClpError(f"{out} exists; pass --overwrite to rebuild it")
        rows, stats = make_splits(a.corpora, a.seed, a.doc_bytes, a.dev_bytes, a.test_bytes, a.max_heldout_doc_bytes,
                                  a.cpt_fraction)
        manifest = {"settings": {"corpora": str(a.corpora.resolve()), "seed": a.seed, "doc_bytes": a.doc_bytes,
                                 "dev_bytes": a.dev_bytes, "test_bytes": a.test_bytes,
                                 "max_heldout_doc_bytes": a.max_heldout_doc_bytes,
                                 "cpt_fraction": a.cpt_fraction},
                    "input_sha256": stats.pop("inputs"), "excluded": stats, "splits": {}}
        with atomic_directory(out, overwrite=a.overwrite) as tmp:
            for name in [n for n in ("helper_train", "cpt_train", "dev", "test", "en_train") if n in rows]:
                (tmp / f"{name}.jsonl").write_text(jsonl_text(rows[name]), encoding="utf-8")
                (tmp / f"{name}.txt").write_text("".join(r["text"] + "\n" for r in rows[name]), encoding="utf-8")
                manifest["splits"][name] = split_summary(rows[name]) | {
                    "files": {ext: {"path": f"{name}.{ext}", "sha256": sha256_file(tmp / f"{name}.{ext}")}
                              for ext in ("jsonl", "txt")}}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    except ClpError as e:
        print(f"data.py: error: {e}", file=sys.stderr)
        return 2
    for name, s in manifest["splits"].items():
        print(f"{name:13s} {s['documents']:6d} documents {s['bytes']:>11,d} bytes")
    print(f"excluded: {stats['buffer']['documents']} buffer documents ({stats['buffer']['bytes']:,} bytes), "
          f"{stats['dedup_lines_removed']} duplicate lines; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
