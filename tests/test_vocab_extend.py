"""``--mode extend``: the source tokenizer keeps every token and id, the helper's missing tokens are added as
real vocabulary (merges / pieces), the source rows are kept bit for bit (offline, tiny models)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from clp_transfer.cli import main as cli
from clp_transfer.errors import ClpError
from clp_transfer.transfer.methods import METHODS
from clp_transfer.tiny import save_model, tiny_model, train_tokenizer
from clp_transfer.transfer.pipeline import transfer
from clp_transfer.transfer.vocab_extend import extend_vocabulary, tokenizer_kind, tokenizer_spec
from safetensors_files import tensors


def new_ids_in(ids: list[int], first_new: int) -> bool:
    return any(i >= first_new for i in ids)


FAMILIES = [
    # (source arch, tied, tokenizer family of source and helper)
    ("gpt2", None, "bpe"),
    ("gpt_neox", None, "bpe"),  # untied head
    ("llama", True, "sentencepiece"),
    ("llama", False, "sentencepiece"),
    ("llama", True, "wordpiece"),
]


@pytest.fixture
def calibration_file(tmp_path, german_lines) -> str:
    path = tmp_path / "calibration.txt"
    path.write_text("\n".join(german_lines), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("arch,tied,kind", FAMILIES)
def test_extend_keeps_source_tokens_ids_and_rows(tmp_path, model_factory, english_lines, german_lines,
                                                 calibration_file, arch, tied, kind):
    src_dir = model_factory(arch, "en", kind, tied=tied, vocab=420, pad=64)
    hlp_dir = model_factory("gpt2", "de", kind, vocab=450, hidden=16)
    out = tmp_path / "extended"
    result = transfer(str(src_dir), str(hlp_dir), str(out), method="clp", mode="extend",
                      calibration_text=calibration_file)
    src_tok, hlp_tok = AutoTokenizer.from_pretrained(src_dir), AutoTokenizer.from_pretrained(hlp_dir)
    ext_tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=None).eval()
    src_model = AutoModelForCausalLM.from_pretrained(src_dir, dtype=None).eval()
    v_s = len(src_tok)
    report = result.report
    assert report["mode"] == "extend" and report["new_token_ids"][0] == v_s
    assert len(ext_tok) == v_s + report["extension"]["new_tokens"] > v_s + 20

    # every source token keeps its id, and no new token is a Hugging Face "added token"
    ext_vocab = ext_tok.get_vocab()
    assert all(ext_vocab[t] == i for t, i in src_tok.get_vocab().items())
    assert set(ext_tok.added_tokens_decoder) == set(src_tok.added_tokens_decoder)
    spec = json.loads((out / "tokenizer.json").read_text())
    model_vocab = spec["model"]["vocab"]
    assert all(t in model_vocab for t in ext_tok.convert_ids_to_tokens(report["new_token_ids"]))
    # special tokens unchanged, in the tokenizer and in the config
    assert ext_tok.all_special_tokens == src_tok.all_special_tokens
    for role in ("bos", "eos", "pad", "unk"):
        assert getattr(ext_tok, f"{role}_token_id") == getattr(src_tok, f"{role}_token_id")
        assert getattr(model.config, f"{role}_token_id", None) == getattr(src_model.config, f"{role}_token_id", None)

    # every source token encodes to its old id: the tokenizer model splits each source token's string (in the
    # model's own alphabet, after normalisation and pre-tokenisation) exactly as the source's does, which is
    # the token itself for nearly all of them
    src_model_tok, ext_model_tok = src_tok.backend_tokenizer.model, ext_tok.backend_tokenizer.model
    own = 0
    byte_fallback = {i for t, i in src_tok.get_vocab().items() if re.fullmatch(r"<0x[0-9A-F]{2}>", t)}
    ordinary = [(t, i) for t, i in src_tok.get_vocab().items()
                if i not in src_tok.all_special_ids and i not in byte_fallback]  # bytes are reached by fallback
    for tok, i in ordinary:
        before = [t.id for t in src_model_tok.tokenize(tok)]
        assert [t.id for t in ext_model_tok.tokenize(tok)] == before, tok
        own += before == [i]
    assert own > 0.9 * len(ordinary)
    # text the source covers: identical ids in every line where no new token is used; where one is, fewer tokens
    unchanged = changed = 0
    for line in english_lines + german_lines:
        before = src_tok(line, add_special_tokens=False)["input_ids"]
        after = ext_tok(line, add_special_tokens=False)["input_ids"]
        if src_tok.unk_token_id in before:  # text the source does not cover: the extension may cover it
            assert after.count(ext_tok.unk_token_id) <= before.count(src_tok.unk_token_id)
            continue
        assert ext_tok.decode(after) == src_tok.decode(before)
        if new_ids_in(after, v_s):
            changed += 1
            # BPE joins runs of source tokens; WordPiece's greedy longest match may trade one piece for another
            assert len(after) < len(before) if kind != "wordpiece" else len(after) <= len(before)
        else:
            unchanged += 1
            assert after == before
    assert unchanged > 0 and changed > 0
    # German needs fewer tokens than with the source tokenizer, about as few as with the helper's
    n = {name: sum(len(t(line, add_special_tokens=False)["input_ids"]) for line in german_lines)
         for name, t in (("source", src_tok), ("extended", ext_tok), ("helper", hlp_tok))}
    assert n["extended"] < 0.85 * n["source"] and n["extended"] < 1.15 * n["helper"], n

    # the source rows are identical; padded like the source; tied stays tied
    e_s, e_t = src_model.get_input_embeddings().weight, model.get_input_embeddings().weight
    assert torch.equal(e_t[:v_s], e_s[:v_s])
    assert e_t.shape[0] % 64 == 0 and e_t.shape[0] >= len(ext_tok) and model.config.vocab_size == e_t.shape[0]
    o_t = model.get_output_embeddings().weight
    assert (o_t.data_ptr() == e_t.data_ptr()) == bool(src_model.config.tie_word_embeddings)
    if not src_model.config.tie_word_embeddings:
        assert torch.equal(o_t[:v_s], src_model.get_output_embeddings().weight[:v_s])
    new = report["new_token_ids"]
    assert not torch.equal(e_t[new], torch.zeros_like(e_t[new]))
    assert report["new_rows"]["calibration"]["applied"] and report["params"]["calibrate_shared"] is False
    # the rest of the checkpoint is the source's
    src_t, out_t = tensors(src_dir), tensors(out)
    assert src_t.keys() == out_t.keys()
    assert all(torch.equal(src_t[k], out_t[k]) for k in src_t if src_t[k].shape == out_t[k].shape)
    # it runs and generates
    ids = ext_tok("Die Katze schläft", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=ext_tok.pad_token_id)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 3


def test_byte_level_text_is_a_coarsening_of_the_source_split(tmp_path, model_factory, english_lines, german_lines):
    """BPE: the source merges all run first, so the new split only joins runs of the source's tokens."""
    src_dir = model_factory("gpt2", "en", "bpe", vocab=420)
    hlp_dir = model_factory("gpt2", "de", "bpe", vocab=450, hidden=16)
    out = transfer(str(src_dir), str(hlp_dir), str(tmp_path / "x"), method="fvt", mode="extend").path
    src_tok, ext_tok = AutoTokenizer.from_pretrained(src_dir), AutoTokenizer.from_pretrained(out)
    v_s = len(src_tok)
    joined = 0
    for line in english_lines + german_lines:
        before = src_tok.convert_ids_to_tokens(src_tok(line, add_special_tokens=False)["input_ids"])
        after = ext_tok(line, add_special_tokens=False)["input_ids"]
        pos = 0
        for tid in after:
            tok = ext_tok.convert_ids_to_tokens(tid)
            if tid < v_s:
                assert before[pos] == tok
                pos += 1
                continue
            run = ""
            while run != tok:
                run += before[pos]
                pos += 1
                assert len(run) <= len(tok) and tok.startswith(run)
            joined += 1
        assert pos == len(before)
    assert joined > 50


@pytest.mark.parametrize("method", [m for m in METHODS if m != "clp"])
def test_every_registered_method_fills_the_new_rows(tmp_path, model_factory, method):
    src_dir = model_factory("gpt_neox", "en", "bpe", vocab=420)
    hlp_dir = model_factory("gpt2", "de", "bpe", vocab=450, hidden=16)
    result = transfer(str(src_dir), str(hlp_dir), str(tmp_path / "x"), method=method, mode="extend")
    t, s = tensors(result.path), tensors(src_dir)
    v_s = result.report["source"]["vocab_size"]
    new = result.report["new_token_ids"]
    for key in ("gpt_neox.embed_in.weight", "embed_out.weight"):
        assert torch.equal(t[key][:v_s], s[key][:v_s])
        assert torch.isfinite(t[key]).all() and t[key][new].norm(dim=1).min() > 0


def test_new_rows_are_the_replace_mode_rows_of_the_same_tokens(tmp_path, model_factory):
    src_dir = model_factory("gpt2", "en", "bpe", vocab=420)
    hlp_dir = model_factory("gpt2", "de", "bpe", vocab=450, hidden=16)
    rep = transfer(str(src_dir), str(hlp_dir), str(tmp_path / "r"), method="fvt")
    ext = transfer(str(src_dir), str(hlp_dir), str(tmp_path / "e"), method="fvt", mode="extend")
    r, e = tensors(rep.path)["transformer.wte.weight"], tensors(ext.path)["transformer.wte.weight"]
    helper_ids = ext.report["new_token_helper_ids"]
    assert torch.equal(e[ext.report["new_token_ids"]], r[helper_ids])


def test_bfloat16_source_rows_are_kept_bit_for_bit(tmp_path, english_lines, german_lines):
    src_tok = train_tokenizer(english_lines, 300, "bpe")
    src = save_model(tiny_model("llama", src_tok, hidden_size=32, num_layers=1).to(torch.bfloat16), src_tok,
                     tmp_path / "src")
    hlp_tok = train_tokenizer(german_lines, 350, "bpe")
    hlp = save_model(tiny_model("gpt2", hlp_tok, hidden_size=16, num_heads=2), hlp_tok, tmp_path / "hlp")
    res = transfer(str(src), str(hlp), str(tmp_path / "out"), method="clp", mode="extend")
    t, s = tensors(res.path), tensors(src)
    assert all(v.dtype == torch.bfloat16 for v in t.values())
    key = "model.embed_tokens.weight"
    assert torch.equal(t[key][: len(src_tok)], s[key][: len(src_tok)])


# ------------------------------------------------------------------------------------------- merge rules


def _byte_level(vocab: dict[str, int], merges: list[tuple[str, str]], use_regex: bool = True) -> dict:
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
    tok.decoder = decoders.ByteLevel()
    return json.loads(tok.to_str())


def test_new_merges_are_rederived_and_unformable_tokens_dropped():
    source = _byte_level({"a": 0, "b": 1, ".": 2, "Ġ": 3, "ab": 4}, [("a", "b")])
    # The helper's pre-tokenizer does not split punctuation off words, so it learnt "a." and "a.b" - tokens the
    # source's pre-tokenizer never hands over in one piece. It makes "Ġab" from "Ġa" + "b", but the source's
    # merge a+b runs first, so in the merged model "Ġab" must come from "Ġ" + "ab". "Ġc" has a part ("c")
    # neither vocabulary has (a malformed helper).
    target = _byte_level({"a": 0, "b": 1, ".": 2, "Ġ": 3, "a.": 4, "a.b": 5, "Ġa": 6, "Ġab": 7, "é": 8},
                         [("a", "."), ("a.", "b"), ("Ġ", "a"), ("Ġa", "b")], use_regex=False)
    target["model"]["vocab"]["Ġc"] = 9
    target["model"]["merges"] = [" ".join(m) for m in target["model"]["merges"]] + ["Ġ c"]  # older spelling
    ext = extend_vocabulary(source, target)
    assert ext.new_tokens == ["é", "Ġa", "Ġab"] and ext.first_new_id == 5 and ext.new_ids == [5, 6, 7]
    assert ext.target_ids == [8, 6, 7]
    assert ext.dropped == {"unreachable": 2, "merge_parts_missing": 1, "no_single_merge": 0, "merges_rederived": 1}
    assert ext.tokenizer_json["model"]["merges"] == [["a", "b"], ["Ġ", "a"], ["Ġ", "ab"]]
    tok = Tokenizer.from_str(json.dumps(ext.tokenizer_json))  # every merge's parts exist
    assert tok.encode("ab a.b ab").tokens == ["ab", "Ġa", ".", "b", "Ġab"]
    assert tok.encode("ab").ids == [4] and tok.encode(" ab").ids == [7]
    assert source["model"]["vocab"] == {"a": 0, "b": 1, ".": 2, "Ġ": 3, "ab": 4}  # inputs untouched


def test_a_token_no_single_merge_can_form_is_left_out():
    source = _byte_level({"x": 0, "b": 1, "c": 2, "y": 3, "bc": 4}, [("b", "c")])
    # The helper makes "xbcy" from "xb" + "cy"; with the source's b+c first, "xbcy" arrives as x + bc + y and
    # neither helper merge can fire: it would need a token ("xbc" or "bcy") the helper has no row for.
    target = _byte_level({"x": 0, "b": 1, "c": 2, "y": 3, "xb": 4, "cy": 5, "xbcy": 6},
                         [("x", "b"), ("c", "y"), ("xb", "cy")])
    ext = extend_vocabulary(source, target)
    assert ext.new_tokens == ["xb", "cy"] and ext.target_ids == [4, 5]
    assert ext.dropped == {"unreachable": 0, "merge_parts_missing": 0, "no_single_merge": 1, "merges_rederived": 0}
    tok = Tokenizer.from_str(json.dumps(ext.tokenizer_json))
    assert tok.encode("xbcy").tokens == ["x", "bc", "y"] and tok.encode("xb").ids == [5]
    assert tok.encode("bc").ids == [4] and tok.encode("cyx").tokens == ["cy", "x"]


def test_other_families_are_refused(english_lines, german_lines):
    specs = {k: tokenizer_spec(train_tokenizer(english_lines if k == "bpe" else german_lines, 300, k), "x")
             for k in ("bpe", "sentencepiece", "wordpiece")}
    assert {k: tokenizer_kind(v) for k, v in specs.items()} == {
        "bpe": "byte_level_bpe", "sentencepiece": "sentencepiece_bpe", "wordpiece": "wordpiece"}
    for src, tgt in (("bpe", "wordpiece"), ("bpe", "sentencepiece"), ("sentencepiece", "bpe"), ("wordpiece", "bpe")):
        with pytest.raises(ClpError, match="family"):
            extend_vocabulary(specs[src], specs[tgt])


def _unigram(lines: list[str], size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=size, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>",
                                      show_progress=False)
    tok.train_from_iterator(lines, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


def test_unigram_pieces_are_merged_with_scores_on_the_source_scale(tmp_path, english_lines, german_lines):
    src_tok, hlp_tok = _unigram(english_lines, 300), _unigram(german_lines, 350)
    s_spec, t_spec = tokenizer_spec(src_tok, "source"), tokenizer_spec(hlp_tok, "helper")
    ext = extend_vocabulary(s_spec, t_spec)
    pieces = ext.tokenizer_json["model"]["vocab"]
    assert pieces[: len(s_spec["model"]["vocab"])] == s_spec["model"]["vocab"]
    t_score = dict(map(tuple, t_spec["model"]["vocab"]))
    offset = ext.dropped["score_offset"]
    assert len(ext.new_tokens) > 20
    for k, piece in enumerate(ext.new_tokens):
        assert pieces[ext.first_new_id + k] == [piece, pytest.approx(t_score[piece] + offset)]
    # end to end: a tiny Llama with this source tokenizer, extended; source rows kept
    src = save_model(tiny_model("llama", src_tok, hidden_size=32, num_layers=1), src_tok, tmp_path / "src")
    hlp = save_model(tiny_model("gpt2", hlp_tok, hidden_size=16, num_heads=2), hlp_tok, tmp_path / "hlp")
    res = transfer(str(src), str(hlp), str(tmp_path / "out"), method="clp", mode="extend")
    ext_tok = AutoTokenizer.from_pretrained(res.path)
    assert all(ext_tok.get_vocab()[t] == i for t, i in src_tok.get_vocab().items())
    for line in english_lines:
        after = ext_tok(line, add_special_tokens=False)["input_ids"]
        if not new_ids_in(after, len(src_tok)):
            assert after == src_tok(line, add_special_tokens=False)["input_ids"]
    key = "model.embed_tokens.weight"
    assert torch.equal(tensors(res.path)[key][: len(src_tok)], tensors(src)[key][: len(src_tok)])


# ------------------------------------------------------------------------------------------- bad input


def test_extend_bad_inputs_fail_clearly_and_write_nothing(tmp_path, model_factory, capsys):
    src = str(model_factory("gpt2", "en", "bpe", vocab=420))
    wordpiece = str(model_factory("gpt2", "de", "wordpiece", vocab=450, hidden=16))
    hlp = str(model_factory("gpt2", "de", "bpe", vocab=450, hidden=16))
    out = tmp_path / "out"

    def fails(match, *flags):
        code = cli(["transfer", "--source", src, "--output", str(out), *flags])
        err = capsys.readouterr().err
        assert code == 2, err
        assert match in err, err
        assert not out.exists()

    fails("source is byte_level_bpe, the helper wordpiece", "--helper", wordpiece, "--mode", "extend")
    fails("calibrate_shared", "--helper", hlp, "--mode", "extend", "--params", "calibrate_shared=true")
    fails("replace-mode ablation", "--helper", hlp, "--mode", "extend", "--no-transfer_untied_head")
    fails("nothing to extend", "--helper", src, "--mode", "extend")
    with pytest.raises(SystemExit):  # argparse choices
        cli(["transfer", "--source", src, "--helper", hlp, "--output", str(out), "--mode", "append"])
    with pytest.raises(ClpError, match="unknown transfer mode"):
        transfer(src, hlp, str(out), mode="append")
    assert cli(["transfer", "--source", src, "--helper", hlp, "--output", str(out), "--mode", "extend",
                "--method", "fvt"]) == 0
    assert json.loads((out / "transfer_report.json").read_text())["mode"] == "extend"


def test_new_token_logit_offset_moves_only_the_new_rows_along_one_direction(tmp_path, model_factory,
                                                                              calibration_file):
    src_dir = model_factory("gpt2", "en", "bpe", vocab=420)
    hlp_dir = model_factory("gpt2", "de", "bpe", vocab=450, hidden=16)
    runs = {b: transfer(str(src_dir), str(hlp_dir), str(tmp_path / f"o{b}"), mode="extend",
                        calibration_text=calibration_file, new_token_logit_offset=b) for b in (0.0, -2.0)}
    key = "transformer.wte.weight"
    a, b = tensors(runs[0.0].path)[key], tensors(runs[-2.0].path)[key]
    v_s, new = runs[0.0].report["source"]["vocab_size"], runs[0.0].report["new_token_ids"]
    assert torch.equal(a[:v_s], b[:v_s])
    delta = b[new] - a[new]  # [N, d]: the same vector -2 * u for every new row
    assert delta.norm(dim=1).min() > 0
    torch.testing.assert_close(delta, delta[:1].expand_as(delta), atol=1e-5, rtol=0)
    assert runs[-2.0].report["new_rows"]["calibration"]["logit_offset"] == -2.0
    with pytest.raises(ClpError, match="needs the output calibration"):
        transfer(str(src_dir), str(hlp_dir), str(tmp_path / "x"), mode="extend", new_token_logit_offset=-1.0)
    with pytest.raises(ClpError, match="extend only"):
        transfer(str(src_dir), str(hlp_dir), str(tmp_path / "y"), new_token_logit_offset=-1.0)


@pytest.fixture
def keep_file(tmp_path, english_lines) -> str:
    path = tmp_path / "keep.txt"
    path.write_text("\n".join(english_lines), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("arch,tied,kind", [("gpt2", None, "bpe"), ("llama", True, "sentencepiece")])
def test_keep_text_leaves_its_tokenization_as_the_source_s(tmp_path, model_factory, english_lines, german_lines,
                                                           calibration_file, keep_file, arch, tied, kind):
    src_dir = model_factory(arch, "en", kind, tied=tied, vocab=420)
    hlp_dir = model_factory("gpt2", "de", kind, vocab=450, hidden=16)
    plain = transfer(str(src_dir), str(hlp_dir), str(tmp_path / "plain"), mode="extend", method="fvt")
    kept = transfer(str(src_dir), str(hlp_dir), str(tmp_path / "kept"), mode="extend", method="fvt",
                    keep_text=keep_file, keep_text_ratio=0.0)
    src_tok = AutoTokenizer.from_pretrained(src_dir)
    p_tok, k_tok = (AutoTokenizer.from_pretrained(r.path) for r in (plain, kept))
    v_s = len(src_tok)
    enc = lambda tok, s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    # Without a keep text some new token fires on English; with it (ratio 0) the English ids are the source's.
    assert any(new_ids_in(enc(p_tok, s), v_s) for s in english_lines)
    for s in english_lines:
        assert enc(k_tok, s) == enc(src_tok, s)
    for token, i in src_tok.get_vocab().items():  # every source token keeps its id
        assert k_tok.convert_tokens_to_ids(token) == i
    record = kept.report["extension"]["keep_text_filter"]
    assert record["remaining_uses"] == 0 and record["converged"] and record["left_out"] > 0
    assert kept.report["extension"]["new_tokens"] < plain.report["extension"]["new_tokens"]
    # German still gets shorter than with the source tokenizer.
    n = {name: sum(len(enc(t, s)) for s in german_lines) for name, t in (("src", src_tok), ("kept", k_tok))}
    assert n["kept"] < 0.9 * n["src"], n
    model = AutoModelForCausalLM.from_pretrained(kept.path, dtype=None)
    src_model = AutoModelForCausalLM.from_pretrained(src_dir, dtype=None)
    assert torch.equal(model.get_input_embeddings().weight[:v_s], src_model.get_input_embeddings().weight[:v_s])


def test_keep_text_ratio_keeps_tokens_more_frequent_in_the_target_language(tmp_path, model_factory, english_lines,
                                                                           german_lines, calibration_file):
    src_dir = model_factory("gpt2", "en", "bpe", vocab=420)
    hlp_dir = model_factory("gpt2", "de", "bpe", vocab=450, hidden=16)
    # A keep text that quotes German: at ratio 0 its German tokens go, at ratio 1 they stay.
    keep = tmp_path / "keep_quoting.txt"
    keep.write_text("\n".join(english_lines + german_lines[:2]), encoding="utf-8")
    runs = {r: transfer(str(src_dir), str(hlp_dir), str(tmp_path / f"r{r}"), mode="extend", method="fvt",
                        keep_text=str(keep), keep_text_ratio=r, calibration_text=calibration_file)
            for r in (0.0, 1.0)}
    left = {r: run.report["extension"]["keep_text_filter"]["left_out"] for r, run in runs.items()}
    assert left[1.0] < left[0.0], left
    with pytest.raises(ClpError, match="calibration_text"):
        transfer(str(src_dir), str(hlp_dir), str(tmp_path / "x"), mode="extend", method="fvt",
                 keep_text=str(keep), keep_text_ratio=0.5)
    with pytest.raises(ClpError, match="extend only"):
        transfer(str(src_dir), str(hlp_dir), str(tmp_path / "y"), keep_text=str(keep))


def test_new_token_guard_lowers_new_logits_in_keep_text_contexts_only(tmp_path, model_factory, calibration_file,
                                                                      keep_file):
    src_dir = model_factory("gpt2", "en", "bpe", vocab=420)
    hlp_dir = model_factory("gpt2", "de", "bpe", vocab=450, hidden=16)
    runs = {g: transfer(str(src_dir), str(hlp_dir), str(tmp_path / f"g{g}"), mode="extend",
                        calibration_text=calibration_file, keep_text=keep_file, new_token_guard=g)
            for g in (0.0, 3.0)}
    key = "transformer.wte.weight"
    a, b = tensors(runs[0.0].path)[key], tensors(runs[3.0].path)[key]
    v_s, new = runs[0.0].report["source"]["vocab_size"], runs[0.0].report["new_token_ids"]
    assert runs[3.0].report["new_token_ids"] == new  # the guard does not change the vocabulary
    assert torch.equal(a[:v_s], b[:v_s])  # source rows bit for bit
    delta = b[new] - a[new]  # [N, d]: the same vector 3 * g for every new row
    torch.testing.assert_close(delta, delta[:1].expand_as(delta), atol=1e-5, rtol=0)
    guard = runs[3.0].report["new_rows"]["calibration"]["guard"]
    # The probe lowers new logits on the keep text more than on the calibration (target) text (a random tiny
    # model separates its two languages only weakly; SmolLM2's separation is in benchmarks/results).
    assert guard["keep_mean"] < 0 and guard["keep_mean"] < guard["target_mean"], guard
    assert "guard" not in runs[0.0].report["new_rows"]["calibration"]
    # Without the calibration there are no target hidden states to contrast with: the guard is skipped.
    res = transfer(str(src_dir), str(hlp_dir), str(tmp_path / "x"), mode="extend", method="fvt",
                   keep_text=keep_file, keep_text_ratio=0.0, new_token_guard=1.0)
    assert "calibration" not in res.report["new_rows"]


def test_extend_writes_a_model_card(tmp_path, model_factory, calibration_file, keep_file):
    from huggingface_hub import ModelCard

    src_dir = model_factory("gpt2", "en", "bpe", vocab=420)
    hlp_dir = model_factory("gpt2", "de", "bpe", vocab=450, hidden=16)
    res = transfer(str(src_dir), str(hlp_dir), str(tmp_path / "card"), mode="extend",
                   calibration_text=calibration_file, keep_text=keep_file, new_token_guard=2.0)
    card = ModelCard.load(res.path / "README.md")
    assert "vocabulary-extension" in card.data.tags and card.data.library_name == "transformers"
    n_new = res.report["extension"]["new_tokens"]
    assert f"**{n_new:,} new**" in card.text and "transfer --mode extend" in card.text
    assert "keep text" in card.text and "new-token guard" in card.text
