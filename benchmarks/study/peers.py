"""Thin adapters that run the peers FOCUS (pip ``deepfocus``) and WECHSEL (pip ``wechsel``) offline.

Both compute an embedding matrix for the target tokenizer from the source's matrix. The untied output head is
given to each peer as a second source matrix (the peers' weights depend only on their auxiliary spaces, so
both matrices get the same mixing weights). The result is written into a copy of the study's ``random`` init
(same architecture, source body, German tokenizer), so that the peers' models differ from ours only in the
embedding rows.

- FOCUS: fastText token-level model trained by FOCUS itself on the German training text tokenized with the
  target tokenizer (``processes=1``; its default 3 epochs, dim 100, min_count 10).
- WECHSEL: fastText word models trained here on the English source text and the German training text
  (regex word tokenisation, cbow, dim 100, minn=maxn=5 as WECHSEL's own ``train_embeddings``, ``--epochs``),
  aligned with the Ding German-English word pairs (``../shared/corpora/ding.de-en.pairs.tsv.gz``, written as
  ``english<TAB>german``); WECHSEL's defaults: 10 neighbours, temperature 0.1.

Install (see CONTEXT.md 3): ``pip install --no-deps deepfocus wechsel fasttext-numpy2 entmax fastdist numba
llvmlite print-on-steroids gensim smart_open wrapt``.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
import shutil
from pathlib import Path

log = logging.getLogger("study.peers")
WORD = re.compile(r"\w+|[^\w\s]")


def _write_model(init_random: Path, out: Path, rows_in, rows_out, report: dict) -> None:  # noqa: ANN001
    import torch
    from transformers import AutoModelForCausalLM

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(init_random, tmp)
    model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    with torch.no_grad():
        for mod, rows in ((model.get_input_embeddings(), rows_in), (model.get_output_embeddings(), rows_out)):
            if rows is None:
                continue
            rows = torch.as_tensor(rows, dtype=torch.float32)
            mod.weight[: rows.shape[0]] = rows
    model.save_pretrained(tmp)
    (tmp / "transfer_report.json").unlink(missing_ok=True)
    (tmp / ".done").unlink(missing_ok=True)
    (tmp / "peer_report.json").write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    (out / ".done").write_text("ok\n")


def _matrices(source: Path):  # noqa: ANN202
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    e_in = m.get_input_embeddings().weight.detach().clone()
    head = m.get_output_embeddings()
    e_out = None if (m.config.tie_word_embeddings or head is None) else head.weight.detach().clone()
    return AutoTokenizer.from_pretrained(source), e_in, e_out


def focus_init(source: Path, init_random: Path, splits: Path, out: Path, cache: Path, threads: int = 1) -> Path:
    import deepfocus.fasttext_embs as fe
    from deepfocus import FOCUS
    from transformers import AutoTokenizer

    fe.CACHE_DIR = cache / "focus-cache"  # keep FOCUS' fastText model and tokenized text in the study cache
    src_tok, e_in, e_out = _matrices(source)
    tgt_tok = AutoTokenizer.from_pretrained(init_random)
    data = str(splits / "target_de.txt")
    kw = dict(target_tokenizer=tgt_tok, source_tokenizer=src_tok, target_training_data_path=data, processes=threads,
              seed=0, verbosity="silent")
    rows_in = FOCUS(source_embeddings=e_in, **kw)
    rows_out = FOCUS(source_embeddings=e_out, **kw) if e_out is not None else None
    _write_model(init_random, out, rows_in, rows_out, {"peer": "focus", "fasttext_data": data,
                                                       "untied_head": e_out is not None})
    return out


def _fasttext_words(text_files: list[Path], path: Path, epochs: int, threads: int):  # noqa: ANN202
    import fasttext

    if path.exists():
        return fasttext.load_model(str(path))
    tok_txt = path.with_suffix(".tok.txt")
    with open(tok_txt, "w", encoding="utf-8") as f:
        for tf in text_files:
            for line in open(tf, encoding="utf-8"):
                f.write(" ".join(WORD.findall(line)) + "\n")
    m = fasttext.train_unsupervised(str(tok_txt), dim=100, neg=10, model="cbow", minn=5, maxn=5, epoch=epochs,
                                    thread=threads, verbose=0)
    m.save_model(str(path))
    return m


def wechsel_init(source: Path, init_random: Path, splits: Path, out: Path, cache: Path, corpora: Path,
                 threads: int = 1, epochs: int = 5) -> Path:
    from transformers import AutoTokenizer
    from wechsel import WECHSEL

    d = cache / "wechsel"
    d.mkdir(parents=True, exist_ok=True)
    en = _fasttext_words([splits / "en_train.txt"], d / "en.bin", epochs, threads)
    de = _fasttext_words([splits / "helper_de.txt", splits / "target_de.txt"], d / "de.bin", epochs, threads)
    dict_path = d / "en-de.ding.txt"
    if not dict_path.exists():
        with gzip.open(corpora / "ding.de-en.pairs.tsv.gz", "rt", encoding="utf-8") as f, open(dict_path, "w") as g:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) == 2 and parts[0] and parts[1] and " " not in parts[0] + parts[1]:
                    g.write(f"{parts[1]}\t{parts[0]}\n")
    src_tok, e_in, e_out = _matrices(source)
    tgt_tok = AutoTokenizer.from_pretrained(init_random)
    w = WECHSEL(en, de, bilingual_dictionary=str(dict_path))
    rows_in, _ = w.apply(src_tok, tgt_tok, e_in.numpy())
    rows_out = w.apply(src_tok, tgt_tok, e_out.numpy())[0] if e_out is not None else None
    _write_model(init_random, out, rows_in, rows_out, {"peer": "wechsel", "dictionary": str(dict_path),
                                                       "fasttext_epochs": epochs, "untied_head": e_out is not None})
    return out
