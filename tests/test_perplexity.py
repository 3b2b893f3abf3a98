"""perplexity: window maths, exactness against naive references and lm-eval, token classes, CLI and bad input."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clp_transfer.cli import main
from clp_transfer.errors import ClpError
from clp_transfer.evaluate.perplexity import (
    count_words,
    length_batches,
    perplexity,
    plan_windows,
    prefix_rule,
    score_documents,
    score_token_stream,
    window_arrays,
)


@pytest.fixture(scope="module")
def gpt2_de(model_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_factory("gpt2", "de", "bpe")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, model, AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def llama_bos(german_lines):
    """A Llama-style tokenizer whose own encoding prepends BOS, with a tiny Llama model."""
    from tokenizers import processors

    from clp_transfer.tiny import tiny_model, train_tokenizer

    tok = train_tokenizer(german_lines, 400, "sentencepiece")
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.bos_token_id)]
    )
    assert tok("Hallo")["input_ids"][0] == tok.bos_token_id
    model = tiny_model("llama", tok, hidden_size=32, num_layers=2, num_heads=4)
    return model, tok


# ------------------------------------------------------------------------------------------ window maths


@settings(max_examples=200, deadline=None)
@given(length=st.integers(0, 300), block=st.integers(1, 64), data=st.data())
def test_windows_predict_every_target_exactly_once(length, block, data):
    stride = data.draw(st.integers(1, block))
    seq = np.arange(length)
    seen = []
    for w in plan_windows(length, block, stride):
        start, end, n = (int(v) for v in w)
        for bos in (False, True):
            x, y = window_arrays(seq, w, bos)
            assert len(x) == len(y) <= block and 1 <= n <= len(y)
            assert np.array_equal(y, seq[start + 1 : end])
        x, y = window_arrays(seq, w, False)
        assert np.array_equal(x + 1, y)  # input i predicts the next token
        seen.extend(y[len(y) - n :].tolist())
    assert seen == list(range(1, length))


def test_stride_equal_block_gives_disjoint_windows_like_lm_eval():
    # lm-eval (context_len=1): [prefix]+t[:4] -> t[:5]... here seq = [p] + 11 tokens, block 5
    w = plan_windows(12, 5, 5)
    assert w.tolist() == [[0, 6, 5], [5, 11, 5], [6, 12, 1]]
    assert plan_windows(12, 5, 2).tolist()[:3] == [[0, 6, 5], [2, 8, 2], [4, 10, 2]]


def test_bos_every_window_replaces_first_input():
    seq = np.array([100, 1, 2, 3, 4, 5, 6, 7])
    x, y = window_arrays(seq, (3, 8, 2), True)
    assert x.tolist() == [100, 4, 5, 6] and y.tolist() == [4, 5, 6, 7]
    x, y = window_arrays(seq, (0, 5, 4), True)
    assert x.tolist() == [100, 1, 2, 3]


def test_count_words_is_lm_evals():
    assert count_words("Der kleine  Hafen\tliegt") == 4
    assert count_words("a b ") == 3  # re.split keeps the empty tail, as lm-eval does


def test_prefix_rule(gpt2_de, llama_bos):
    _, _, tok = gpt2_de
    assert prefix_rule(tok) == (tok.bos_token_id, False)
    _, ltok = llama_bos
    assert prefix_rule(ltok) == (ltok.bos_token_id, True)


# ------------------------------------------------------------------------------------------ exactness


def _naive_nll(model, seqs, block):
    """Every target t predicted from seq[max(0, t-block):t], one forward per token."""
    total, n = 0.0, 0
    with torch.no_grad():
        for seq in seqs:
            for t in range(1, len(seq)):
                ctx = torch.tensor([seq[max(0, t - block) : t]])
                logp = torch.log_softmax(model(input_ids=ctx).logits[0, -1].double(), -1)
                total -= float(logp[seq[t]])
                n += 1
    return total, n


def test_sliding_window_stride_1_matches_naive_reference(gpt2_de, german_lines):
    _, model, tok = gpt2_de
    docs = [german_lines[0][:70], german_lines[3][:40]]
    r = score_documents(model, tok, docs, block_size=8, stride=1, batch_size=32, progress=False)
    seqs = [[tok.bos_token_id] + tok(d, add_special_tokens=False)["input_ids"] for d in docs]
    nll, n = _naive_nll(model, seqs, 8)
    assert r.num_tokens == n
    assert r.nll == pytest.approx(nll, rel=1e-5)
    assert r.num_bytes == sum(len(d.encode()) for d in docs)
    assert r.num_words == sum(len(d.split()) for d in docs)
    assert r.bits_per_byte == pytest.approx(nll / math.log(2) / r.num_bytes, rel=1e-5)


def test_batching_and_chunking_do_not_change_the_result(gpt2_de, german_lines):
    _, model, tok = gpt2_de
    docs = german_lines[:8]
    a = score_documents(model, tok, docs, block_size=16, stride=8, batch_size=2, progress=False)
    b = score_documents(model, tok, iter(docs), block_size=16, stride=8, batch_size=7, progress=False,
                        chunk_documents=3)
    assert (a.num_tokens, a.num_bytes, a.num_words, a.num_documents) == (b.num_tokens, b.num_bytes, b.num_words, 8)
    assert a.nll == pytest.approx(b.nll, rel=1e-6)
    full = score_documents(model, tok, docs, block_size=16, progress=False)
    assert full.num_tokens == a.num_tokens and full.num_windows < a.num_windows


def _lm_eval_rolling(tmp_path, model, tok, docs, max_length, **hflm_kwargs):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    (tmp_path / "ppl.yaml").write_text(
        "task: tiny_ppl\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: text\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n", encoding="utf-8")
    lm = HFLM(pretrained=model, tokenizer=tok, max_length=max_length, batch_size=4, **hflm_kwargs)
    tm = TaskManager(include_path=str(tmp_path), include_defaults=False)
    out = simple_evaluate(model=lm, tasks=["tiny_ppl"], task_manager=tm, log_samples=False, bootstrap_iters=0)
    return out["results"]["tiny_ppl"]


def test_bits_per_byte_matches_lm_eval(tmp_path, gpt2_de, german_lines):
    """Acceptance: same text, same model -> lm-eval's bits_per_byte to 1e-4 (multi-window documents)."""
    _, model, tok = gpt2_de
    docs = german_lines[:12]
    ours = score_documents(model, tok, docs, block_size=16, batch_size=5, progress=False)
    theirs = _lm_eval_rolling(tmp_path, model, tok, docs, max_length=16)
    assert ours.num_windows > len(docs)  # documents really span several windows
    assert abs(ours.bits_per_byte - theirs["bits_per_byte,none"]) < 1e-4
    assert ours.word_perplexity == pytest.approx(theirs["word_perplexity,none"], rel=1e-4)


def test_bos_tokenizer_scores_bos_once(tmp_path, llama_bos, german_lines):
    """A tokenizer that adds BOS: BOS is the unscored prefix; lm-eval agrees once told not to add a 2nd BOS."""
    model, tok = llama_bos
    docs = german_lines[:6]
    ours = score_documents(model, tok, docs, block_size=256, progress=False)
    assert ours.prefix_token == "<s>" and ours.bos_every_window
    assert ours.num_tokens == sum(len(tok(d, add_special_tokens=False)["input_ids"]) for d in docs)
    theirs = _lm_eval_rolling(tmp_path, model, tok, docs, max_length=256, add_bos_token=False)
    assert abs(ours.bits_per_byte - theirs["bits_per_byte,none"]) < 1e-4
    # long documents: every window starts with BOS, still every token once
    short = score_documents(model, tok, docs, block_size=8, stride=4, progress=False)
    assert short.num_tokens == ours.num_tokens


def test_max_tokens_cuts_at_a_token_and_counts_its_bytes(gpt2_de, german_lines):
    _, model, tok = gpt2_de
    first = tok(german_lines[0], add_special_tokens=False, return_offsets_mapping=True)
    n0 = len(first["input_ids"])
    r = score_documents(model, tok, german_lines, block_size=32, max_tokens=n0 + 5, progress=False)
    assert r.truncated and r.num_tokens == n0 + 5 and r.num_documents == 2
    second = tok(german_lines[1], add_special_tokens=False, return_offsets_mapping=True)
    cut = german_lines[1][: second["offset_mapping"][4][1]]
    assert r.num_bytes == len(german_lines[0].encode()) + len(cut.encode())
    whole = score_documents(model, tok, german_lines[:1], block_size=32, max_tokens=n0, progress=False)
    assert whole.num_tokens == n0 and whole.num_documents == 1


def test_loss_split_by_predicted_token_class(gpt2_de, german_lines):
    _, model, tok = gpt2_de
    rows = model.get_output_embeddings().weight.shape[0]
    mask = torch.zeros(rows, dtype=torch.bool)
    mask[::2] = True
    r = score_documents(model, tok, german_lines[:8], block_size=32, new_token_mask=mask, progress=False)
    new, shared = r.token_classes["new"], r.token_classes["shared"]
    ids = [i for d in german_lines[:8] for i in tok(d, add_special_tokens=False)["input_ids"]]
    assert new.num_tokens == sum(1 for i in ids if i % 2 == 0)
    assert new.num_tokens + shared.num_tokens == r.num_tokens
    assert new.nll + shared.nll == pytest.approx(r.nll, rel=1e-9)
    assert new.share_of_nll + shared.share_of_nll == pytest.approx(1.0)
    plain = score_documents(model, tok, german_lines[:8], block_size=32, progress=False)
    assert plain.token_classes is None and plain.nll == pytest.approx(r.nll, rel=1e-9)


def test_token_stream_is_the_training_loss(gpt2_de, german_lines, tmp_path):
    from clp_transfer.data.shards import ShardIndex, ShardInfo, TokenShards, tokenizer_fingerprint

    _, model, tok = gpt2_de
    ids = np.array([i for d in german_lines[:6] for i in tok(d)["input_ids"] + [tok.eos_token_id]])
    ids = ids[: (len(ids) - 1) // 16 * 16 + 1]  # whole blocks: the reference below has no short last block
    r = score_token_stream(model, ids, block_size=16, batch_size=3)
    blocks = [ids[s : s + 17] for s in range(0, len(ids) - 1, 16)]
    ref = 0.0
    with torch.no_grad():
        for b in blocks:
            x = torch.tensor(b[None])
            ref += float(torch.nn.functional.cross_entropy(model(x[:, :-1]).logits[0], x[0, 1:], reduction="sum"))
    assert r.num_tokens == len(ids) - 1 and r.nll == pytest.approx(ref, rel=1e-5)

    d = tmp_path / "tokens" / "valid"
    d.mkdir(parents=True)
    ids.astype(np.uint16).tofile(d / "00000.bin")
    nbytes = sum(len(x.encode()) for x in german_lines[:6])
    index = ShardIndex("uint16", "tiny", tokenizer_fingerprint(tok), len(tok), tok.eos_token_id, 6, nbytes,
                       len(ids), [ShardInfo("00000.bin", len(ids))])
    (d / "index.json").write_text(index.to_json())
    shards = TokenShards(tmp_path, "valid")
    s = score_token_stream(model, shards, block_size=16)
    assert s.nll == pytest.approx(r.nll, rel=1e-6) and s.num_bytes == nbytes and not s.bytes_estimated
    part = score_token_stream(model, shards, block_size=16, max_tokens=40)
    assert part.num_tokens == 40 and part.bytes_estimated and 0 < part.num_bytes < nbytes


# ------------------------------------------------------------------------------------------ API, CLI, errors


def test_api_with_path_data_dir_and_auto_new_tokens(tmp_path, gpt2_de, german_lines):
    path, _, _ = gpt2_de
    model_dir = tmp_path / "target"
    shutil.copytree(path, model_dir)
    (model_dir / "transfer_report.json").write_text(json.dumps({"new_token_ids": list(range(50, 150))}))
    data = tmp_path / "data"
    data.mkdir()
    (data / "valid.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in german_lines[:10]))
    out = tmp_path / "ppl.json"
    r = perplexity(str(model_dir), data=str(data), block_size=32, output=str(out), progress=False)
    assert r.token_classes and r.token_classes["new"].num_tokens > 0
    saved = json.loads(out.read_text())
    assert saved["kind"] == "perplexity" and saved["bits_per_byte"] == pytest.approx(r.bits_per_byte)
    assert saved["num_documents"] == 10 and saved["data"].endswith(":valid")
    with pytest.raises(ClpError, match="exists"):
        perplexity(str(model_dir), data=str(data), output=str(out), progress=False)
    off = perplexity(str(model_dir), data=str(data), block_size=32, new_tokens="none", progress=False)
    assert off.token_classes is None


def test_cli_text_files(tmp_path, gpt2_de, german_lines, capsys):
    path, _, _ = gpt2_de
    txt = tmp_path / "de.txt"
    txt.write_text("\n".join(german_lines[:5]) + "\n\n")
    jsonl = tmp_path / "de.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in german_lines[5:10]))
    out = tmp_path / "r.json"
    code = main(["perplexity", "--model", str(path), "--text_files", str(txt), str(jsonl), "--block-size", "32",
                 "--stride", "16", "--batch_size", "4", "--output", str(out), "--no-progress"])
    assert code == 0
    r = json.loads(out.read_text())
    assert r["num_documents"] == 10 and r["stride"] == 16 and "bits/byte" in capsys.readouterr().out


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty", "is empty"),
        ("blank", "every document is empty"),
        ("no_tokenizer", "has no tokenizer"),
        ("pickle", "allow-pickle"),
        ("no_split", "has no valid.jsonl"),
        ("block", "exceeds the model's context length"),
        ("both", "exactly one of --data"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, gpt2_de, capsys, case, message):
    path, _, _ = gpt2_de
    model = str(path)
    txt = tmp_path / "t.txt"
    txt.write_text("Ein kurzer Satz.\n")
    args = ["--text_files", str(txt)]
    if case == "empty":
        txt.write_text("")
    elif case == "blank":
        txt.write_text("\n \n\n")
    elif case == "no_tokenizer":
        bare = tmp_path / "bare"
        bare.mkdir()
        for f in ("config.json", "model.safetensors"):
            shutil.copy(path / f, bare / f)
        model = str(bare)
    elif case == "pickle":
        pk = tmp_path / "pk"
        pk.mkdir()
        shutil.copy(path / "config.json", pk / "config.json")
        (pk / "pytorch_model.bin").write_bytes(b"not really")
        model = str(pk)
    elif case == "no_split":
        (tmp_path / "data").mkdir()
        args = ["--data", str(tmp_path / "data")]
    elif case == "block":
        args += ["--block_size", "100000"]
    elif case == "both":
        args += ["--data", str(tmp_path)]
    code = main(["perplexity", "--model", model, *args, "--no-progress"])
    assert code == 2
    assert message in capsys.readouterr().err


@given(st.lists(st.integers(1, 600), min_size=1, max_size=60), st.integers(1, 9), st.floats(0.1, 1.0))
def test_length_batches_cover_everything_in_order_with_bounded_padding(lengths, batch_size, fill):
    lengths = sorted(lengths, reverse=True)
    batches = length_batches(lengths, batch_size, fill)
    assert [i for b in batches for i in b] == list(range(len(lengths)))
    for b in batches:
        assert 1 <= len(b) <= batch_size
        assert all(lengths[i] >= fill * lengths[b[0]] for i in b)


def test_equal_windows_fill_whole_batches():
    assert length_batches([512] * 10 + [100, 95, 20], 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11], [12]]
