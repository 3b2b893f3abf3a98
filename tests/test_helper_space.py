"""Helper spaces built from text (``clp-transfer helper --kind embeddings``, ``transfer --helper_text``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from clp_transfer.cli import main
from clp_transfer.errors import ClpError
from clp_transfer.transfer.helper_space import (
    REPORT_NAME,
    VECTORS_KEY,
    VECTORS_NAME,
    SpaceConfig,
    build_helper_space,
    fill_unseen,
    is_helper_space,
    load_helper_space,
)
from clp_transfer.transfer.methods import METHODS
from clp_transfer.transfer.tokens import TokenizerStyle, VocabInfo
from clp_transfer.transfer.pipeline import transfer

FAST = dict(vocab_size=300, dim=16, epochs=3.0, num_threads=1, min_count=1)


def _word_tokenizer(path: Path, words: list[str]) -> Path:
    """A whitespace word-level tokenizer: [UNK] + <s> + ``words`` (ids in that order)."""
    vocab = {"[UNK]": 0, "<s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="<s>").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def space(tmp_path_factory, fixtures_dir) -> Path:
    out = tmp_path_factory.mktemp("space") / "space-de"
    return build_helper_space(SpaceConfig(text=[str(fixtures_dir / "german.txt")], output_dir=str(out), **FAST))


def test_space_directory_holds_tokenizer_vectors_and_report(space):
    assert is_helper_space(space) and not (space / "config.json").exists()
    tok = AutoTokenizer.from_pretrained(space)
    vectors = load_file(space / VECTORS_NAME)[VECTORS_KEY]
    assert vectors.dtype == torch.float32 and vectors.shape == (len(tok), 16) and len(tok) <= 300
    report = json.loads((space / REPORT_NAME).read_text())
    v, t = report["vectors"], report["training"]
    assert v["trained"] + v["from_pieces"] + v["zero"] == len(tok)
    # min_count=1 and 3 full passes: every token that occurs in the text is trained (most of the 256 byte
    # tokens of a 300-token byte-level BPE never occur).
    assert v["trained"] == report["data"]["target_tokens_occurring"] > 80
    assert t["budget"] == "epochs" and t["epochs"] == pytest.approx(3.0, abs=1e-3)
    assert t["tokens_trained"] == pytest.approx(3 * report["data"]["tokens"], abs=1)
    assert report["tokenizer"]["trained"] and report["cpu_seconds"] > 0
    # Special tokens never occur in the text: zero vectors (cosine 0 with everything).
    for i in tok.all_special_ids:
        assert torch.all(vectors[i] == 0)
    # Trained rows are real vectors, not the zero fallback.
    assert (vectors.norm(dim=1) > 0).sum() >= v["trained"] + v["from_pieces"] - 1


def test_skipgram_puts_tokens_of_the_same_contexts_together(tmp_path):
    # "hund" and "katze" occur among the same context words, "tisch" and "stuhl" among others: in the space,
    # each one's nearest neighbour is its partner, far ahead of the other pair.
    import random

    rng = random.Random(0)
    animal_ctx, thing_ctx = [f"a{i}" for i in range(20)], [f"t{i}" for i in range(20)]
    words = ["hund", "katze", "tisch", "stuhl", *animal_ctx, *thing_ctx]
    tok = _word_tokenizer(tmp_path / "tok", words)
    lines = []
    for _ in range(400):
        for w, ctx in (("hund", animal_ctx), ("katze", animal_ctx), ("tisch", thing_ctx), ("stuhl", thing_ctx)):
            lines.append(" ".join(rng.sample(ctx, 3) + [w] + rng.sample(ctx, 3)))
    rng.shuffle(lines)
    text = tmp_path / "t.txt"
    text.write_text("\n".join(lines) + "\n")
    out = build_helper_space(SpaceConfig(text=[str(text)], output_dir=str(tmp_path / "s"), tokenizer=str(tok),
                                         dim=16, window=3, epochs=5.0, num_threads=1, min_count=1))
    sp = load_helper_space(out)
    v = torch.nn.functional.normalize(sp.vectors, dim=1)
    ids = {w: sp.tokenizer.convert_tokens_to_ids(w) for w in words}
    cos = lambda a, b: float(v[ids[a]] @ v[ids[b]])  # noqa: E731
    for a, b, c in (("hund", "katze", "tisch"), ("tisch", "stuhl", "katze")):
        assert cos(a, b) > cos(a, c) + 0.3, (a, cos(a, b), cos(a, c))
        others = [w for w in words if w != a]
        assert max(others, key=lambda w: cos(a, w)) in (b, *animal_ctx, *thing_ctx)


def test_unseen_tokens_take_the_mean_of_their_pieces_or_zero():
    tokens = ["<|endoftext|>", "Ġha", "us", "Ġhaus", "Ġhausboot", "boot", "Ã¤", "Ġx"]
    vocab = VocabInfo(tokens, TokenizerStyle.BYTE_LEVEL, {0}, {"eos": 0})
    vectors = torch.arange(len(tokens) * 3, dtype=torch.float32).reshape(len(tokens), 3) + 1
    known = torch.tensor([True, True, True, False, False, True, False, False])
    out, counts = fill_unseen(vectors, known, vocab)
    assert torch.equal(out[3], (vectors[1] + vectors[2]) / 2)  # Ġhaus = Ġha + us
    assert torch.equal(out[4], (vectors[1] + vectors[2] + vectors[5]) / 3)  # Ġhausboot = Ġha + us + boot
    assert torch.all(out[6] == 0) and torch.all(out[7] == 0)  # no known piece spells them
    assert torch.all(out[0] == 0)  # special token: zero, even though "known" said so
    assert torch.equal(out[[1, 2, 5]], vectors[[1, 2, 5]])
    assert counts == {"trained": 3, "from_pieces": 2, "zero": 3}


def test_cpu_budget_stops_the_training(tmp_path, german_lines):
    text = tmp_path / "t.txt"
    text.write_text("\n".join(german_lines * 40) + "\n")  # ~23k tokens per pass
    out = build_helper_space(SpaceConfig(text=[str(text)], output_dir=str(tmp_path / "s"), vocab_size=300, dim=16,
                                         cpu_minutes=0.02, num_threads=1))
    report = json.loads((out / REPORT_NAME).read_text())
    t = report["training"]
    assert t["budget"] == "cpu_minutes" and t["cpu_minutes_budget"] == 0.02
    assert t["tokens_trained"] > 0
    # Stopped by the budget (1.2 CPU s, one slice of overrun at most), not by running out of text.
    assert report["cpu_seconds"] < 1.2 + 3.0


def test_transfer_without_a_helper_model_end_to_end(tmp_path, model_factory, fixtures_dir):
    src = model_factory("gpt2", "en")
    german = str(fixtures_dir / "german.txt")
    res = transfer(str(src), None, str(tmp_path / "out"), helper_text=[german], helper_text_cpu_minutes=0.02,
                   calibration_text=german)
    model = AutoModelForCausalLM.from_pretrained(res.path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(res.path)
    assert model.get_input_embeddings().weight.shape[0] == len(tok) > 200  # a 16k BPE trained on 3 KB of text
    assert res.report["helper"]["kind"] == "helper_space" and res.report["helper"]["space"]["vectors"]["trained"] > 0
    auto = res.report["new_rows"]["auto"]  # the default measured its candidates on the text
    assert res.report["method"] == "auto" and any(c.get("scores") for c in auto["candidates"])
    ids = tok("Die Stadt liegt am Fluss", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(ids).logits).all()


def test_every_similarity_method_runs_on_a_space_via_the_cli(tmp_path, model_factory, space):
    src = model_factory("gpt_neox", "en")  # untied head
    for name in [n for n in METHODS if METHODS.get(n).needs_helper]:
        out = tmp_path / name
        assert main(["transfer", "--source", str(src), "--helper", str(space), "--output", str(out),
                     "--method", name]) == 0
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        assert model.get_input_embeddings().weight.shape[0] >= len(AutoTokenizer.from_pretrained(space))
        assert torch.isfinite(model.get_output_embeddings().weight).all()


def test_cli_builds_a_space_with_a_given_tokenizer(tmp_path, model_factory, fixtures_dir):
    helper = model_factory("gpt2", "de")  # take its tokenizer as the target tokenizer
    out = tmp_path / "space"
    assert main(["helper", "--kind", "embeddings", "--text", str(fixtures_dir / "german.txt"), "--tokenizer",
                 str(helper), "--output_dir", str(out), "--dim", "8", "--epochs", "1", "--num_threads", "1"]) == 0
    sp = load_helper_space(out)
    assert sp.tokenizer.get_vocab() == AutoTokenizer.from_pretrained(helper).get_vocab()
    assert sp.report["tokenizer"] == {**sp.report["tokenizer"], "trained": False, "origin": str(helper)}


@pytest.mark.parametrize("case", ["no_target_token", "empty_text", "tiny_vocab", "only_special", "mixed_flags",
                                  "stray_model_flag", "stray_space_flag", "both_helpers", "no_helper"])
def test_bad_input_fails_clearly(tmp_path, case, capsys, fixtures_dir, model_factory):
    german = str(fixtures_dir / "german.txt")
    out = tmp_path / "out"
    base = ["helper", "--kind", "embeddings", "--output_dir", str(out), "--dim", "8", "--epochs", "1"]
    if case == "no_target_token":
        tok = _word_tokenizer(tmp_path / "tok", ["hallo", "welt"])
        text = tmp_path / "zh.txt"
        text.write_text("这是 一个 测试\n另一个 句子\n")
        argv, expect = [*base, "--text", str(text), "--tokenizer", str(tok)], "contains 0 ordinary token"
    elif case == "empty_text":
        text = tmp_path / "empty.txt"
        text.write_text("\n  \n\n")
        argv, expect = [*base, "--text", str(text)], "holds no text"
    elif case == "tiny_vocab":
        argv, expect = [*base, "--text", german, "--vocab_size", "10"], "--vocab_size 10 is smaller than the 258"
    elif case == "only_special":
        tok = _word_tokenizer(tmp_path / "tok", [])
        argv, expect = [*base, "--text", german, "--tokenizer", str(tok)], "all of them special"
    elif case == "mixed_flags":
        argv, expect = [*base, "--text", german, "--cpu_minutes", "1"], "either --cpu_minutes or --epochs"
    elif case == "stray_model_flag":
        argv, expect = [*base, "--text", german, "--hidden_size", "64"], "--hidden_size does not apply"
    elif case == "stray_space_flag":
        argv = ["helper", "--text", german, "--output_dir", str(out), "--cpu_minutes", "1"]
        expect = "--cpu_minutes does not apply to --kind model"
    elif case == "both_helpers":
        src = model_factory("gpt2", "en")
        argv = ["transfer", "--source", str(src), "--helper", str(src), "--helper_text", german, "--output", str(out)]
        expect = "either --helper or --helper_text"
    else:
        src = model_factory("gpt2", "en")
        argv, expect = ["transfer", "--source", str(src), "--output", str(out)], "--helper (or --helper_text)"
    capsys.readouterr()  # drop what building the fixtures printed
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expect in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_space_and_model_tokenizer_mismatch_is_refused(tmp_path, space):
    # A space whose vectors do not cover its tokenizer (files from different builds).
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in space.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    from safetensors.torch import save_file

    save_file({VECTORS_KEY: torch.zeros(5, 16)}, broken / VECTORS_NAME)
    with pytest.raises(ClpError, match="do not belong together"):
        load_helper_space(broken)
