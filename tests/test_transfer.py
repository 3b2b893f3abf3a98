"""End-to-end transfers between tiny models of every supported family (offline)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from clp_transfer.cli import main as cli
from clp_transfer.errors import ClpError
from clp_transfer.tiny import save_model, tiny_model, train_tokenizer
from clp_transfer.transfer.tokens import VocabInfo, match_vocabularies
from clp_transfer.transfer.pipeline import transfer
from safetensors_files import tensors

REPO = Path(__file__).resolve().parents[1]


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=None).eval(), AutoTokenizer.from_pretrained(path)


def dir_hash(path) -> str:
    h = hashlib.sha256()
    for f in sorted(Path(path).rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


FAMILIES = [
    # (source arch, tied, source tokenizer, helper tokenizer)
    ("gpt2", None, "bpe", "bpe"),
    ("gpt_neox", None, "bpe", "sentencepiece"),
    ("llama", True, "sentencepiece", "bpe"),
    ("llama", False, "sentencepiece", "wordpiece"),
]


@pytest.mark.parametrize("arch,tied,src_kind,hlp_kind", FAMILIES)
@pytest.mark.parametrize("method", ["clp", "clp-original", "fvt", "random", "omp"])
def test_transfer_keeps_shared_rows_heads_and_loads(tmp_path, model_factory, arch, tied, src_kind, hlp_kind, method):
    src_dir = model_factory(arch, "en", src_kind, tied=tied, vocab=420, pad=64)
    hlp_dir = model_factory("gpt2", "de", hlp_kind, vocab=450, hidden=16)
    before = dir_hash(src_dir)
    out = tmp_path / "target"
    result = transfer(str(src_dir), str(hlp_dir), str(out), method=method)
    assert dir_hash(src_dir) == before, "the source model was modified"

    src_model, src_tok = load(src_dir)
    tgt_model, tgt_tok = load(out)
    hlp_tok = AutoTokenizer.from_pretrained(hlp_dir)
    assert tgt_tok.get_vocab() == hlp_tok.get_vocab()
    e_t, e_s = tgt_model.get_input_embeddings().weight, src_model.get_input_embeddings().weight
    # padded like the source (multiple of 64), config agrees with the weights
    assert e_t.shape[0] % 64 == 0 and e_t.shape[0] >= len(tgt_tok)
    assert tgt_model.config.vocab_size == e_t.shape[0]
    # tied stays tied, untied stays untied
    assert tgt_model.config.tie_word_embeddings == src_model.config.tie_word_embeddings
    o_t = tgt_model.get_output_embeddings().weight
    assert (o_t.data_ptr() == e_t.data_ptr()) == bool(src_model.config.tie_word_embeddings)
    # shared rows are the source rows of the same *token*, in the input and in an untied head
    match = match_vocabularies(VocabInfo.from_tokenizer(tgt_tok), VocabInfo.from_tokenizer(src_tok))
    shared = torch.tensor(match.shared_ids)
    src_rows = torch.tensor([match.source_id[i] for i in match.shared_ids])
    assert len(shared) > 20
    assert torch.equal(e_t[shared], e_s[src_rows])
    if not src_model.config.tie_word_embeddings:
        assert torch.equal(o_t[shared], src_model.get_output_embeddings().weight[src_rows])
    # special-token ids in the config are the target tokenizer's
    assert tgt_model.config.eos_token_id == tgt_tok.eos_token_id
    assert torch.equal(e_t[tgt_tok.eos_token_id], e_s[src_tok.eos_token_id])
    # the report describes what happened
    report = json.loads((out / "transfer_report.json").read_text())
    assert report["method"] == method and report["matching"]["shared"] == len(shared)
    assert sorted(report["new_token_ids"]) == match.missing_ids
    assert result.report["matching"] == report["matching"]
    # it generates
    ids = tgt_tok("Die Katze", return_tensors="pt")
    gen = tgt_model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tgt_tok.pad_token_id)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 4


def test_untied_head_follows_its_tokens_unlike_the_original(tmp_path, model_factory):
    src_dir = model_factory("gpt_neox", "en", "bpe", vocab=420)
    hlp_dir = model_factory("gpt2", "de", "bpe", vocab=450, hidden=16)
    good = transfer(str(src_dir), str(hlp_dir), str(tmp_path / "good"), method="clp")
    bad = transfer(str(src_dir), str(hlp_dir), str(tmp_path / "bad"), method="clp", transfer_untied_head=False)
    src_model, src_tok = load(src_dir)
    tgt_tok = AutoTokenizer.from_pretrained(good.path)
    match = match_vocabularies(VocabInfo.from_tokenizer(tgt_tok), VocabInfo.from_tokenizer(src_tok))
    moved = [i for i in match.shared_ids if match.source_id[i] != i]
    assert len(moved) > 10
    head_src = src_model.get_output_embeddings().weight
    for path, should_follow in [(good.path, True), (bad.path, False)]:
        head = load(path)[0].get_output_embeddings().weight
        follows = torch.equal(head[moved], head_src[[match.source_id[i] for i in moved]])
        assert follows == should_follow
    from clp_transfer.transfer.pipeline import summary

    assert "untied, transferred by token" in summary(good.report, good.path)
    assert "left in source positions" in summary(bad.report, bad.path)


def test_dtype_is_kept_and_nothing_is_instantiated(tmp_path, monkeypatch, german_lines, english_lines):
    src_tok = train_tokenizer(english_lines, 300, "bpe")
    src = save_model(tiny_model("llama", src_tok, hidden_size=32, num_layers=1).to(torch.bfloat16), src_tok,
                     tmp_path / "src")
    hlp_tok = train_tokenizer(german_lines, 350, "bpe")
    hlp = save_model(tiny_model("gpt2", hlp_tok, hidden_size=16, num_heads=2), hlp_tok, tmp_path / "hlp")

    def refuse(*a, **k):
        raise AssertionError("transfer must not load whole models")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    out = transfer(str(src), str(hlp), str(tmp_path / "out"), method="clp").path
    monkeypatch.undo()
    assert all(t.dtype == torch.bfloat16 for t in tensors(out).values())


def test_sharded_checkpoints_are_copied_shard_by_shard(tmp_path, german_lines, english_lines):
    src_tok = train_tokenizer(english_lines, 300, "bpe")
    model = tiny_model("gpt_neox", src_tok, hidden_size=64, num_layers=3)
    src = save_model(model, src_tok, tmp_path / "src", max_shard_size="60KB")
    assert len(list(src.glob("*.safetensors"))) > 2
    hlp_tok = train_tokenizer(german_lines, 350, "bpe")
    hlp = save_model(tiny_model("gpt2", hlp_tok, hidden_size=16, num_heads=2), hlp_tok, tmp_path / "hlp")
    out = transfer(str(src), str(hlp), str(tmp_path / "out")).path
    assert (out / "model.safetensors.index.json").is_file()
    src_t, out_t = tensors(src), tensors(out)
    assert src_t.keys() == out_t.keys()
    for k in src_t:
        if "embed" not in k and "lm_head" not in k:
            assert torch.equal(src_t[k], out_t[k]), k
    load(out)


def test_same_seed_gives_identical_output(tmp_path, model_factory):
    src_dir = model_factory("gpt2", "en", "bpe", vocab=420)
    hlp_dir = model_factory("gpt2", "de", "bpe", vocab=450, hidden=16)
    torch.manual_seed(1)
    a = transfer(str(src_dir), str(hlp_dir), str(tmp_path / "a"), method="random", seed=5)
    torch.manual_seed(2)
    torch.randn(10)
    b = transfer(str(src_dir), str(hlp_dir), str(tmp_path / "b"), method="random", seed=5)
    c = transfer(str(src_dir), str(hlp_dir), str(tmp_path / "c"), method="random", seed=6)
    ta, tb, tc = tensors(a.path), tensors(b.path), tensors(c.path)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not all(torch.equal(ta[k], tc[k]) for k in ta)


def test_seed_readme_command(tmp_path, model_factory):
    src_dir = model_factory("gpt_neox", "en", "bpe", vocab=420)
    hlp_dir = model_factory("gpt2", "de", "bpe", vocab=450, hidden=16)
    out = tmp_path / "seed-out"
    cmd = [sys.executable, str(REPO / "clp.py"), "apply_clp", "--source_model_name_or_path", str(src_dir),
           "--helper_model_name_or_path", str(hlp_dir), "--target_model_path", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert json.loads((out / "transfer_report.json").read_text())["method"] == "clp"
    again = subprocess.run(cmd + ["--random_init", "--random_init_method", "xavier_normal", "--override"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    report = json.loads((out / "transfer_report.json").read_text())
    assert report["method"] == "random" and report["params"]["init"] == "xavier_normal"
    load(out)


def _bad(tmp_path, *flags) -> tuple[int, str]:
    return cli(["transfer", *flags])


@pytest.fixture
def pair(model_factory):
    return str(model_factory("gpt2", "en", "bpe", vocab=420)), str(model_factory("gpt2", "de", "bpe", vocab=450, hidden=16))


def test_bad_inputs_fail_clearly_and_write_nothing(tmp_path, pair, capsys, german_lines, english_lines):
    src, hlp = pair
    out = tmp_path / "out"

    def fails(match, *flags):
        code = cli(["transfer", "--output", str(out), *flags])
        err = capsys.readouterr().err
        assert code == 2, err
        assert match in err, err
        assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]

    fails("does not exist", "--source", str(tmp_path / "nope"), "--helper", hlp)
    fails("does not exist", "--source", src, "--helper", str(tmp_path / "nope"))
    fails("did you mean 'clp'", "--source", src, "--helper", hlp, "--method", "clpp")
    fails("no parameter 'k'", "--source", src, "--helper", hlp, "--params", "k=3")

    # a helper whose tokenizer does not belong to its embeddings
    big_tok = train_tokenizer(german_lines, 600, "bpe")
    big_tok.save_pretrained(tmp_path / "bigtok")
    fails("do not belong together", "--source", src, "--helper", hlp, "--helper-tokenizer", str(tmp_path / "bigtok"))

    # a helper in another script: nothing shared but special tokens
    cyr = ["привет мир как дела сегодня хорошо", "мы идем домой вечером поздно тихо"] * 20
    cyr_tok = train_tokenizer(cyr, 120, "wordpiece")
    cyr_dir = save_model(tiny_model("gpt2", cyr_tok, hidden_size=16, num_heads=2), cyr_tok, tmp_path / "cyr")
    fails("shares no ordinary token", "--source", src, "--helper", str(cyr_dir))

    # pickle checkpoints are refused unless allowed
    pkl = tmp_path / "pickle_model"
    pkl.mkdir()
    model = AutoModelForCausalLM.from_pretrained(src)
    model.config.save_pretrained(pkl)
    AutoTokenizer.from_pretrained(src).save_pretrained(pkl)
    torch.save(model.state_dict(), pkl / "pytorch_model.bin")
    fails("--allow-pickle", "--source", str(pkl), "--helper", hlp)

    # existing output
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = cli(["transfer", "--source", src, "--helper", hlp, "--output", str(out)])
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_allow_pickle_converts_and_transfers(tmp_path, pair, monkeypatch):
    monkeypatch.setenv("CLP_TRANSFER_CACHE", str(tmp_path / "cache"))
    src, hlp = pair
    pkl = tmp_path / "pickle_model"
    pkl.mkdir()
    model = AutoModelForCausalLM.from_pretrained(src)
    model.config.save_pretrained(pkl)
    AutoTokenizer.from_pretrained(src).save_pretrained(pkl)
    torch.save(model.state_dict(), pkl / "pytorch_model.bin")
    assert cli(["transfer", "--source", str(pkl), "--helper", hlp, "--output", str(tmp_path / "o"),
                "--allow-pickle"]) == 0
    load(tmp_path / "o")


def test_interrupted_transfer_leaves_nothing(tmp_path, pair, monkeypatch):
    src, hlp = pair
    import clp_transfer.transfer.pipeline as mod

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(mod, "_write_config", boom)
    with pytest.raises(KeyboardInterrupt):
        transfer(src, hlp, str(tmp_path / "out"))
    assert list(tmp_path.iterdir()) == []


def test_hub_ids_fail_clearly_offline(tmp_path, pair, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ClpError, match="could not be fetched"):
        transfer("EleutherAI/pythia-410m", pair[1], str(tmp_path / "o"))


@pytest.mark.parametrize("arch,tied,src_kind,hlp_kind", [("llama", True, "bpe", "bpe"), ("gpt_neox", None, "bpe", "bpe")])
def test_calibration_text_calibrates_the_output_side(tmp_path, model_factory, german_lines, arch, tied, src_kind,
                                                     hlp_kind):
    src_dir = model_factory(arch, "en", src_kind, tied=tied, vocab=420, pad=64)
    hlp_dir = model_factory("gpt2", "de", hlp_kind, vocab=450, hidden=16)
    text = tmp_path / "de.jsonl"
    text.write_text("".join(json.dumps({"text": line}) + "\n" for line in german_lines))
    plain = transfer(str(src_dir), str(hlp_dir), str(tmp_path / "plain"), method="clp")
    assert plain.report["new_rows"]["calibration"]["applied"] is False
    assert plain.report["calibration_text"] is None
    runs = [transfer(str(src_dir), str(hlp_dir), str(tmp_path / name), method="clp", calibration_text=str(text),
                     calibration_tokens=64) for name in ("a", "b")]
    cal = runs[0].report["new_rows"]["calibration"]
    assert cal["applied"] is True and cal["positions"] == 64 and cal["counted_tokens"] > 100
    assert "calibration_s" in runs[0].report["timings"]
    ta, tb, tp = tensors(runs[0].path), tensors(runs[1].path), tensors(plain.path)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)  # deterministic
    model, tok = load(runs[0].path)
    e, o = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    e_plain = load(plain.path)[0].get_input_embeddings().weight
    if model.config.tie_word_embeddings:
        assert not torch.equal(e, e_plain)  # the tied matrix is the output side: it moves
    else:  # an untied head moves, the input rows stay those of the uncalibrated method
        assert torch.equal(e, e_plain)
        assert not torch.equal(o, load(plain.path)[0].get_output_embeddings().weight)
    assert torch.isfinite(o).all()
    ids = tok("Die Katze", return_tensors="pt")
    assert model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id).shape[1] > 2
    # without calibration the method is what it always was
    t0 = tensors(transfer(str(src_dir), str(hlp_dir), str(tmp_path / "c0"), method="clp",
                          params={"calibrate": 0}).path)
    assert all(torch.equal(tp[k], t0[k]) for k in tp)


def test_bad_calibration_text_fails_clearly(tmp_path, model_factory):
    src_dir = model_factory("gpt2", "en", "bpe", vocab=420)
    hlp_dir = model_factory("gpt2", "de", "bpe", vocab=450, hidden=16)
    with pytest.raises(ClpError, match="does not exist"):
        transfer(str(src_dir), str(hlp_dir), str(tmp_path / "x"), method="clp", calibration_text=str(tmp_path / "no"))
    assert not (tmp_path / "x").exists()


def test_target_tokenizer_takes_the_source_context_length(model_factory, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    from clp_transfer.transfer.pipeline import transfer

    src, hlp = model_factory("llama", "en", kind="sentencepiece"), model_factory("gpt2", "de")
    htok = AutoTokenizer.from_pretrained(hlp)
    htok.model_max_length = 16  # a helper trained on short blocks
    htok.save_pretrained(tmp_path / "hlp-tok")
    transfer(str(src), str(hlp), str(tmp_path / "out"), helper_tokenizer=str(tmp_path / "hlp-tok"))
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok.model_max_length == AutoConfig.from_pretrained(src).max_position_embeddings


@pytest.mark.parametrize("arch,tied,src_kind,hlp_kind", FAMILIES)
def test_cli_transfer_method_omp_on_every_family(tmp_path, model_factory, german_lines, arch, tied, src_kind, hlp_kind):
    src_dir = model_factory(arch, "en", src_kind, tied=tied, vocab=420, pad=64)
    hlp_dir = model_factory("gpt2", "de", hlp_kind, vocab=450, hidden=16)
    text = tmp_path / "de.jsonl"
    text.write_text("".join(json.dumps({"text": line}) + "\n" for line in german_lines))
    out = tmp_path / "omp"
    code = cli(["transfer", "--source", str(src_dir), "--helper", str(hlp_dir), "--output", str(out), "--method", "omp",
                "--params", "k=8", "nonneg=true", "calibrate=1.0", "--calibration_text", str(text),
                "--calibration_tokens", "64"])
    assert code == 0
    report = json.loads((out / "transfer_report.json").read_text())
    assert report["method"] == "omp" and report["params"]["k"] == 8 and report["params"]["nonneg"] is True
    rows = report["new_rows"]
    assert rows["calibration"]["applied"] is True
    assert 0 < rows["mean_support"] <= 8 and rows["negative_weights"] == 0
    model, tok = load(out)
    src_model, _ = load(src_dir)
    assert model.config.tie_word_embeddings == src_model.config.tie_word_embeddings
    assert torch.isfinite(model.get_input_embeddings().weight).all()
    ids = tok("Die Katze", return_tensors="pt")
    assert model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id).shape[1] > 2


# ------------------------------------------------------------------------ the fast paths of the fixed cost


@pytest.mark.parametrize("family", sorted(__import__("clp_transfer.models", fromlist=["x"]).KNOWN_FAMILIES))
@pytest.mark.parametrize("tied", [True, False])
def test_known_families_read_from_config_json_match_the_model_classes(tmp_path, monkeypatch, family, tied):
    # the parameter names, tying and context length read from config.json and the checkpoint's key names
    # are what building the model class gives
    from transformers import AutoConfig

    from clp_transfer import models

    cfg = AutoConfig.for_model(family, vocab_size=64, hidden_size=16, n_embd=16, intermediate_size=32,
                               num_hidden_layers=1, n_layer=1, num_attention_heads=2, n_head=2,
                               num_key_value_heads=2, tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(tmp_path)
    assert models.plain_config(tmp_path) is not None
    fast = models.find_embedding_keys(tmp_path)
    known, context = models.plain_context_length(tmp_path)
    monkeypatch.setattr(models, "plain_config", lambda _: None)
    assert fast == models.find_embedding_keys(tmp_path)  # the general path: the model on the meta device
    assert known and context == models.context_length(AutoConfig.from_pretrained(tmp_path))


def test_plain_tokenizer_families_are_the_ones_autotokenizer_keeps():
    from transformers.models.auto.tokenization_auto import (
        MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS,
        TOKENIZER_MAPPING_NAMES,
    )

    from clp_transfer.models import KNOWN_FAMILIES, PLAIN_TOKENIZER_FAMILIES

    for family in PLAIN_TOKENIZER_FAMILIES:
        assert family in KNOWN_FAMILIES and family not in MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS
        assert TOKENIZER_MAPPING_NAMES.get(family) != "MistralCommonBackend"


@pytest.mark.parametrize("arch,tied,kind", [("gpt2", None, "bpe"), ("gpt_neox", None, "sentencepiece"),
                                            ("llama", True, "sentencepiece"), ("llama", False, "wordpiece")])
def test_the_direct_tokenizer_load_is_autotokenizers(tmp_path, model_factory, arch, tied, kind):
    from clp_transfer import models

    path = model_factory(arch, "de", kind, tied=tied)
    assert models._plain_tokenizer_class(path) is not None  # the fast path applies to these directories
    fast, auto = models.load_tokenizer(path), AutoTokenizer.from_pretrained(path)
    assert type(fast) is type(auto) and fast.get_vocab() == auto.get_vocab()
    assert fast.all_special_tokens == auto.all_special_tokens and fast.init_kwargs == auto.init_kwargs
    text = "Die Katze schläft. <|endoftext|> 123"
    assert fast(text)["input_ids"] == auto(text)["input_ids"]
    fast.save_pretrained(tmp_path / "fast")
    auto.save_pretrained(tmp_path / "auto")
    for f in (tmp_path / "auto").iterdir():
        assert (tmp_path / "fast" / f.name).read_bytes() == f.read_bytes(), f.name
