"""``make-tasks``: local lm-eval tasks built from text (and a bilingual word list) that the user gives.

Offline there are no German benchmark datasets, so this stage writes small task folders that lm-eval runs
from local JSONL files (``clp-transfer evaluate --include_path DIR --tasks <prefix>``):

- ``<prefix>_ppl`` (``loglikelihood_rolling``): held-out documents; reports bits per byte, byte and word
  perplexity exactly as :mod:`clp_transfer.evaluate.perplexity` does. Give text none of the models was trained on.
- ``<prefix>_cloze`` (``multiple_choice``): the first half of a sentence, then which continuation is the
  original one; the others are second halves of other sentences of similar length.
- ``<prefix>_translate`` (``multiple_choice``, needs ``--pairs``): an English word, then which German word
  translates it; distractors are other German words of the list with the same capitalisation and a similar
  length, never another valid translation. With ``--text``, words that occur in the text are preferred.

Every task carries the tag ``<prefix>``, so ``--tasks <prefix>`` runs them all. Multiple-choice tasks get a
small disjoint ``train`` split for few-shot prompts. Everything is deterministic given ``--seed``; the YAML
files name their data by absolute path (``evaluate`` also repairs moved folders and relative paths).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from .. import __version__
from ..atomic import atomic_directory
from ..config import add_dataclass_arguments, build_config
from ..errors import ClpError

log = logging.getLogger(__name__)

_SENTENCE_END = re.compile(r"(?<=\w\w[.!?])\s+(?=[\"„»A-ZÄÖÜ0-9])")  # "z. B." and "3. Mai" do not end one
_WORD = re.compile(r"^[^\W\d_]+(?:-[^\W\d_]+)*$", re.UNICODE)
_TOKEN = re.compile(r"[^\W\d_]+", re.UNICODE)


@dataclass
class MakeTasksConfig:
    """Everything ``clp-transfer make-tasks`` takes."""

    text: list[str] = field(default_factory=list)
    """Target-language text: .txt (one document or sentence per line) or .jsonl with a 'text' field; .gz ok."""
    output_dir: str = ""
    """Folder to write the tasks into (JSONL data + lm-eval YAML)."""
    pairs: str | None = None
    """Bilingual word list, TSV german<TAB>english per line (e.g. the Ding pairs): adds <prefix>_translate."""
    prefix: str = "de_local"
    """Task name prefix (also the tag that runs all tasks)."""
    seed: int = 0
    """Seed of every random choice (sampling, distractors, split into test and few-shot examples)."""
    num_ppl: int = 500
    """Documents in the perplexity task (all when fewer)."""
    num_cloze: int = 500
    """Items in the cloze task."""
    num_translate: int = 500
    """Items in the translation task."""
    num_choices: int = 4
    """Choices per multiple-choice item (the right one included)."""
    num_fewshot_pool: int = 8
    """Items set aside as the few-shot (train) split of each multiple-choice task."""
    min_words: int = 6
    """Shortest sentence (in words) used for cloze items."""
    max_words: int = 40
    """Longest sentence (in words) used for cloze items."""
    overwrite: bool = False
    """Replace an existing output folder."""


@dataclass
class TaskFolder:
    """What :func:`make_tasks` wrote."""

    path: Path
    tasks: dict[str, dict[str, Any]]
    """Task name -> {type, test, train, file}."""
    tag: str

    @property
    def names(self) -> list[str]:
        return list(self.tasks)


# --------------------------------------------------------------------------------------------- items


def sentences(docs: Iterable[str]) -> list[str]:
    """Split documents into sentences at ``.``/``!``/``?`` after a word of 2+ characters and before an
    upper-case start or digit; drop repeated sentences."""
    seen: set[str] = set()
    out: list[str] = []
    for doc in docs:
        for s in _SENTENCE_END.split(" ".join(doc.split())):
            s = s.strip()
            if s and s not in seen:
                seen.add(s)
                out.append(s)
    return out


def cloze_items(sents: Sequence[str], n: int, num_choices: int, rng: random.Random, min_words: int = 6,
                max_words: int = 40) -> list[dict[str, Any]]:
    """Items ``{context, choices, label}``: the original second half of a sentence among others' halves."""
    halves: list[tuple[str, str]] = []
    for s in sents:
        words = s.split(" ")
        if not min_words <= len(words) <= max_words:
            continue
        cut = len(words) // 2
        halves.append((" ".join(words[:cut]), " ".join(words[cut:])))
    if len(halves) < num_choices:
        raise ClpError(
            f"the text has {len(halves)} sentences of {min_words}-{max_words} words; the cloze task needs at "
            f"least {num_choices} (give more text or lower --num_choices/--min_words)"
        )
    order = list(range(len(halves)))
    rng.shuffle(order)
    lengths = [len(c.split(" ")) for _, c in halves]
    items = []
    for i in order[:n]:
        context, right = halves[i]
        pool = [j for j in range(len(halves)) if j != i and halves[j][1] != right]
        # distractors of similar length, so that length alone does not give the answer away
        pool.sort(key=lambda j: (abs(lengths[j] - lengths[i]), rng.random()))
        wrong = []
        for j in pool:
            if halves[j][1] not in wrong:
                wrong.append(halves[j][1])
            if len(wrong) == num_choices - 1:
                break
        if len(wrong) < num_choices - 1:
            continue
        choices = wrong + [right]
        rng.shuffle(choices)
        items.append({"context": context, "choices": choices, "label": choices.index(right)})
    return items


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    """``german<TAB>english`` lines (``.gz`` ok); lines without a tab are an error, blank lines skipped."""
    from ..data import open_text

    p = Path(path)
    if not p.is_file():
        raise ClpError(f"pairs file {str(p)!r} does not exist")
    out = []
    with open_text(p) as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) < 2:
                raise ClpError(f"{str(p)!r} line {lineno} is not german<TAB>english: {line[:60]!r}")
            out.append((parts[0].strip(), parts[1].strip()))
    if not out:
        raise ClpError(f"pairs file {str(p)!r} is empty; it needs german<TAB>english lines")
    return out


def translation_items(pairs: Sequence[tuple[str, str]], n: int, num_choices: int, rng: random.Random,
                      word_counts: Counter | None = None) -> list[dict[str, Any]]:
    """Items ``{english, choices, label}``: which German word translates the English one.

    Only single words (letters, inner hyphens) are used; pairs that are the same word in both languages are
    dropped (nothing to translate). Clear pairs come first: English words with at most three German
    translations, answered by a German word with at most three English ones; with ``word_counts`` (of the
    user's text), frequent words first. Distractors share the answer's capitalisation, have a similar length,
    are never a valid translation of the English word, and come from words of the text when there are enough
    (so that rare words do not give the answer away).
    """
    de_of: dict[str, set[str]] = defaultdict(set)
    en_of: dict[str, set[str]] = defaultdict(set)
    for de, en in pairs:
        if _WORD.match(de) and _WORD.match(en) and de.lower() != en.lower():
            de_of[en].add(de)
            en_of[de].add(en)
    if not de_of:
        raise ClpError("the pairs file has no single-word german<TAB>english pairs")
    english = sorted(de_of)
    rng.shuffle(english)
    # English words with few German translations first (a cue like "then" has ten), then, with a text,
    # words seen in it, most frequent first
    def clear(d: str) -> bool:  # a German word with few senses ("Platte" has a dozen)
        return len(en_of[d]) <= 3

    english.sort(key=lambda en: (len(de_of[en]) > 3 or not any(clear(d) for d in de_of[en]),
                                 -max(word_counts.get(d, 0) for d in de_of[en]) if word_counts else 0))
    german = sorted({d for ds in de_of.values() for d in ds})
    if len(german) < num_choices:
        raise ClpError(f"the pairs file has {len(german)} German words; need at least {num_choices}")
    by_shape: dict[bool, list[str]] = defaultdict(list)
    seen_shape: dict[bool, list[str]] = defaultdict(list)  # words of the text: as familiar as the answers
    for d in german:
        by_shape[d[:1].isupper()].append(d)
        if word_counts and word_counts.get(d, 0) > 0:
            seen_shape[d[:1].isupper()].append(d)
    items = []
    for en in english:
        if len(items) >= n:
            break
        answers = sorted(de_of[en], key=lambda d: (not clear(d), -(word_counts or {}).get(d, 0), d))
        right = answers[0] if word_counts else rng.choice([d for d in answers if clear(d)] or answers)
        def ok(d: str) -> bool:
            return d not in de_of[en] and d.lower() != right.lower()

        near: list[str] = []
        shape = right[:1].isupper()
        for source in (seen_shape[shape], by_shape[shape], german):
            candidates = rng.sample(source, min(len(source), 50 * num_choices))
            near = [d for d in candidates if ok(d)]
            if len(near) >= num_choices - 1:
                break
        if len(near) < num_choices - 1:
            continue
        near.sort(key=lambda d: (abs(len(d) - len(right)), rng.random()))
        wrong: list[str] = []
        for d in near:
            if d.lower() not in {w.lower() for w in wrong}:
                wrong.append(d)
            if len(wrong) == num_choices - 1:
                break
        choices = wrong + [right]
        rng.shuffle(choices)
        items.append({"english": en, "choices": choices, "label": choices.index(right)})
    return items


# --------------------------------------------------------------------------------------------- YAML


def _data_files(folder: Path, stem: str, with_train: bool) -> dict[str, str]:
    files = {"test": str(folder / f"{stem}.test.jsonl")}
    if with_train:
        files["train"] = str(folder / f"{stem}.train.jsonl")
    return files


def ppl_task_yaml(name: str, tag: str, folder: Path) -> dict[str, Any]:
    return {
        "task": name,
        "tag": [tag],
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": _data_files(folder, name, False)},
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "num_fewshot": 0,
        "doc_to_text": "",
        "doc_to_target": "text",
        "metric_list": [
            {"metric": m, "aggregation": agg, "higher_is_better": False}
            for m, agg in (("word_perplexity", "weighted_perplexity"), ("byte_perplexity", "weighted_perplexity"),
                           ("bits_per_byte", "bits_per_byte"))
        ],
        "metadata": {"version": 1.0, "made_by": f"clp-transfer {__version__} make-tasks"},
    }


def choice_task_yaml(name: str, tag: str, folder: Path, doc_to_text: str, description: str = "") -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "task": name,
        "tag": [tag],
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": _data_files(folder, name, True)},
        "training_split": "train",
        "fewshot_split": "train",
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": doc_to_text,
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "target_delimiter": " ",
        "fewshot_delimiter": "\n\n",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0, "made_by": f"clp-transfer {__version__} make-tasks"},
    }
    if description:
        cfg["description"] = description
    return cfg


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def _write_yaml(path: Path, cfg: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True), encoding="utf-8")


# --------------------------------------------------------------------------------------------- API


def make_tasks(
    text: str | Sequence[str],
    output_dir: str | Path,
    pairs: str | None = None,
    prefix: str = "de_local",
    seed: int = 0,
    overwrite: bool = False,
    **options: Any,
) -> TaskFolder:
    """Write ``<prefix>_ppl``, ``<prefix>_cloze`` and (with ``pairs``) ``<prefix>_translate`` into ``output_dir``.

    >>> folder = make_tasks("held_out.de.txt", "tasks_de", pairs="ding.tsv")   # doctest: +SKIP
    >>> folder.names                                                           # doctest: +SKIP
    ['de_local_ppl', 'de_local_cloze', 'de_local_translate']
    """
    files = [text] if isinstance(text, (str, Path)) else list(text)
    cfg = MakeTasksConfig(text=[str(f) for f in files], output_dir=str(output_dir), pairs=pairs, prefix=prefix,
                          seed=seed, overwrite=overwrite, **options)
    return run_make_tasks(cfg)


def run_make_tasks(cfg: MakeTasksConfig) -> TaskFolder:
    from ..data import read_documents, resolve_text_sources

    if not cfg.output_dir:
        raise ClpError("missing required flag: --output_dir")
    if not cfg.text:
        raise ClpError("missing required flag: --text FILE (target-language text, one document per line)")
    if not re.fullmatch(r"[A-Za-z][\w-]*", cfg.prefix):
        raise ClpError(f"--prefix {cfg.prefix!r} must start with a letter and hold only letters, digits, _ and -")
    if cfg.num_choices < 2:
        raise ClpError("--num_choices must be at least 2")
    files, _ = resolve_text_sources(None, "", cfg.text)
    docs = [d for f in files for d in read_documents(f)]
    if not docs:
        raise ClpError(f"the text files {', '.join(cfg.text)} hold no text (only blank lines)")
    pair_list = read_pairs(cfg.pairs) if cfg.pairs else None

    rng = random.Random(cfg.seed)
    ppl_idx = sorted(rng.sample(range(len(docs)), min(cfg.num_ppl, len(docs))))
    ppl_docs = [{"text": docs[i]} for i in ppl_idx]
    sents = sentences(docs)
    cloze = cloze_items(sents, cfg.num_cloze + cfg.num_fewshot_pool, cfg.num_choices, random.Random(cfg.seed + 1),
                        cfg.min_words, cfg.max_words)
    translate = None
    if pair_list is not None:
        counts = Counter(w for d in docs for w in _TOKEN.findall(d))
        translate = translation_items(pair_list, cfg.num_translate + cfg.num_fewshot_pool, cfg.num_choices,
                                      random.Random(cfg.seed + 2), counts)
        if len(translate) < 2:
            raise ClpError("too few usable word pairs for a translation task (need single-word pairs that differ)")

    final = Path(cfg.output_dir).resolve()
    tag = cfg.prefix
    manifest: dict[str, dict[str, Any]] = {}
    with atomic_directory(final, cfg.overwrite, inputs=[*cfg.text, cfg.pairs]) as tmp:
        name = f"{cfg.prefix}_ppl"
        n = _write_jsonl(tmp / f"{name}.test.jsonl", ppl_docs)
        _write_yaml(tmp / f"{name}.yaml", ppl_task_yaml(name, tag, final))
        manifest[name] = {"type": "loglikelihood_rolling", "test": n, "train": 0}

        mc: list[tuple[str, list[dict[str, Any]], str, str]] = [
            (f"{cfg.prefix}_cloze", cloze, "{{context}}", ""),
        ]
        if translate is not None:
            mc.append((f"{cfg.prefix}_translate", translate, "Englisch: {{english}}\nDeutsch:",
                       "Übersetze das englische Wort ins Deutsche.\n\n"))
        for name, items, template, description in mc:
            k = min(cfg.num_fewshot_pool, max(1, len(items) // 5)) if cfg.num_fewshot_pool else 0
            train, test = items[:k], items[k:]
            if not train:  # the harness needs a few-shot split; reuse the first item (only used with --num_fewshot)
                train = items[:1]
            _write_jsonl(tmp / f"{name}.train.jsonl", train)
            n = _write_jsonl(tmp / f"{name}.test.jsonl", test)
            _write_yaml(tmp / f"{name}.yaml", choice_task_yaml(name, tag, final, template, description))
            manifest[name] = {"type": "multiple_choice", "test": n, "train": len(train),
                              "choices": cfg.num_choices}
        info = {
            "tag": tag,
            "tasks": manifest,
            "seed": cfg.seed,
            "text": [str(Path(f).resolve()) for f in files],
            "pairs": str(Path(cfg.pairs).resolve()) if cfg.pairs else None,
            "made_by": f"clp-transfer {__version__}",
            "usage": f"clp-transfer evaluate --model M --include_path {final} --tasks {tag}",
        }
        (tmp / "tasks.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for name, m in manifest.items():
        log.info("%s: %d test items (%s)", name, m["test"], m["type"])
    return TaskFolder(final, manifest, tag)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, MakeTasksConfig)


def cli_main(args: argparse.Namespace) -> int:
    cfg = build_config(MakeTasksConfig, args)
    folder = run_make_tasks(cfg)
    for name, m in folder.tasks.items():
        print(f"{name:28s} {m['type']:22s} {m['test']:6d} test items")
    print(f"wrote {folder.path}; run them with: clp-transfer evaluate --model M --include_path {folder.path} "
          f"--tasks {folder.tag}")
    return 0
