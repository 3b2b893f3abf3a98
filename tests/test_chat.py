"""Instruct sources keep their chat: template, control tokens with the source's rows, stopping at end of turn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from clp_transfer.transfer.chat import template_texts, tokens_in_template
from clp_transfer.cli import main as cli
from clp_transfer.tiny import CHATML_TEMPLATE, add_chat_template, save_model, tiny_model, train_tokenizer
from clp_transfer.transfer.pipeline import summary, transfer
from safetensors_files import tensors

CONTROL = ("<|im_start|>", "<|im_end|>")
CHAT = [{"role": "user", "content": "Wie geht es dir heute?"}]


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def instruct_source(path: Path, lines, arch="gpt2", kind="bpe", tied=None, pad=64, template=CHATML_TEMPLATE,
                    eos_list=True, eos_token=None, dominant_end_of_turn=False) -> Path:
    """A tiny instruct model: ChatML control tokens after its vocabulary, a chat template and (``eos_list``)
    a generation config that stops at ``<|im_end|>`` as well as at its eos, like Llama-3-Instruct.

    ``dominant_end_of_turn``: the final layer norm outputs one constant vector whose logit is highest for
    ``<|im_end|>``, so the model answers every prompt with ``<|im_end|>`` at once.
    """
    tok = add_chat_template(train_tokenizer(lines, 400, kind), template=template, eos_token=eos_token)
    model = tiny_model(arch, tok, hidden_size=32, num_heads=4, pad_vocab_to_multiple_of=pad, tie_word_embeddings=tied)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    if dominant_end_of_turn:
        norm = model.transformer.ln_f if arch == "gpt2" else model.gpt_neox.final_layer_norm
        with torch.no_grad():
            unit = torch.nn.functional.normalize(torch.randn(32, generator=torch.Generator().manual_seed(3)), dim=0)
            model.get_output_embeddings().weight[end] = unit
            norm.weight.zero_()
            norm.bias.copy_(20 * unit)  # every final hidden state is 20 * unit: logit 20 for <|im_end|>
    save_model(model, tok, path)
    if eos_list:
        gen = json.loads((path / "generation_config.json").read_text())
        gen["eos_token_id"] = [tok.eos_token_id, end]
        (path / "generation_config.json").write_text(json.dumps(gen))
    return path


CASES = [
    # (source arch, tied, source tokenizer, helper tokenizer, source vocabulary padded to)
    ("gpt2", None, "bpe", "bpe", 64),
    ("gpt_neox", None, "bpe", "sentencepiece", 64),
    ("llama", True, "sentencepiece", "wordpiece", None),
    ("llama", False, "sentencepiece", "bpe", 128),
]


@pytest.mark.parametrize("arch,tied,src_kind,hlp_kind,pad", CASES)
def test_instruct_source_keeps_template_tokens_and_rows(tmp_path, model_factory, english_lines, arch, tied, src_kind,
                                                        hlp_kind, pad):
    src = instruct_source(tmp_path / "src", english_lines, arch, src_kind, tied, pad)
    hlp = model_factory("gpt2", "de", hlp_kind, vocab=450, hidden=16)
    result = transfer(str(src), str(hlp), str(tmp_path / "out"), method="clp")
    plain = transfer(str(src), str(hlp), str(tmp_path / "plain"), method="clp", chat=False)
    src_model, src_tok = load(src)
    model, tok = load(result.path)
    v_h = len(AutoTokenizer.from_pretrained(hlp))

    # the template is the source's and renders; every control token is one special token after the helper's ids
    assert tok.chat_template == src_tok.chat_template
    text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text == src_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    target_ids = [tok.convert_tokens_to_ids(t) for t in CONTROL]
    assert target_ids == [v_h, v_h + 1]
    for t, tid in zip(CONTROL, target_ids):
        assert tok(t, add_special_tokens=False)["input_ids"] == [tid]
        assert t in tok.all_special_tokens
    assert ids.count(target_ids[0]) == 2 and ids.count(target_ids[1]) == 1
    assert tok.decode(ids, skip_special_tokens=True).count("Wie geht es dir") == 1  # control tokens skipped

    # inside the source's padding when it has room, else the vocabulary grows by exactly the carried tokens
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows == (-(-(v_h + 2) // pad) * pad if pad else v_h + 2)
    assert result.report["target"]["added_control_tokens"] == 2
    if pad:
        assert rows == load(plain.path)[0].get_input_embeddings().weight.shape[0]

    # their rows are the source's, input and untied head; every other row is what --no-chat gives
    src_ids = [src_tok.convert_tokens_to_ids(t) for t in CONTROL]
    e_t, e_s = model.get_input_embeddings().weight, src_model.get_input_embeddings().weight
    assert torch.equal(e_t[target_ids], e_s[src_ids])
    if not model.config.tie_word_embeddings:
        assert torch.equal(model.get_output_embeddings().weight[target_ids],
                           src_model.get_output_embeddings().weight[src_ids])
    chat_t, plain_t = tensors(result.path), tensors(plain.path)
    assert chat_t.keys() == plain_t.keys()
    for k in chat_t:
        assert torch.equal(chat_t[k][:v_h], plain_t[k][:v_h]), k

    # generation stops at end of turn: both eos lists hold the target's eos and <|im_end|>
    eos = [tok.eos_token_id, target_ids[1]]
    assert model.config.eos_token_id == eos and model.generation_config.eos_token_id == eos
    chat = result.report["chat"]
    assert [(t["token"], t["source_id"], t["target_id"], t["new"]) for t in chat["tokens"]] == \
        list(zip(CONTROL, src_ids, target_ids, [True, True]))
    assert chat["tokens"][1]["from"] == ["chat_template", "generation_config.eos_token_id"]
    assert [t["end_of_turn"] for t in chat["tokens"]] == [False, True]
    assert chat["warnings"] == [] and chat["template_carried"] and not chat["dropped"]
    assert json.loads((result.path / "transfer_report.json").read_text())["chat"] == chat
    assert "Chat: template carried with 2 control tokens (<|im_start|>, <|im_end|>)" in summary(result.report,
                                                                                                  result.path)
    # --no-chat: the helper's tokenizer alone, as before
    p_tok = AutoTokenizer.from_pretrained(plain.path)
    assert p_tok.chat_template is None and len(p_tok) == v_h
    assert plain.report["chat"]["dropped"] and plain.report["chat"]["tokens"] == []
    assert load(plain.path)[0].config.eos_token_id == tok.eos_token_id


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])  # tied, untied head
def test_generate_stops_at_the_end_of_turn_token(tmp_path, model_factory, english_lines, arch):
    src = instruct_source(tmp_path / "src", english_lines, arch, dominant_end_of_turn=True)
    hlp = model_factory("gpt2", "de", "bpe", vocab=450, hidden=16)
    src_model, src_tok = load(src)
    prompt = src_tok.apply_chat_template(CHAT, return_tensors="pt", add_generation_prompt=True, return_dict=True)
    out = src_model.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=src_tok.pad_token_id)
    assert out[0, -1] == src_tok.convert_tokens_to_ids("<|im_end|>")
    assert out.shape[1] == prompt["input_ids"].shape[1] + 1  # the source stops at once

    for chat, stops in ((True, True), (False, False)):
        path = transfer(str(src), str(hlp), str(tmp_path / f"out-{chat}"), method="clp", chat=chat).path
        model, tok = load(path)
        ids = tok("Hallo", return_tensors="pt") if not chat else tok.apply_chat_template(
            CHAT, return_tensors="pt", add_generation_prompt=True, return_dict=True)
        n = ids["input_ids"].shape[1]
        gen = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        if stops:
            assert gen.shape[1] == n + 1 and tok.decode(gen[0, n:]) == "<|im_end|>"
        else:  # without the carried token and eos list, nothing in the helper's vocabulary ends the turn
            assert gen.shape[1] == n + 8


def test_base_source_without_template_is_unchanged(tmp_path, model_factory):
    src = model_factory("llama", "en", "sentencepiece", tied=False, vocab=420, pad=64)
    hlp = model_factory("gpt2", "de", "bpe", vocab=450, hidden=16)
    a = transfer(str(src), str(hlp), str(tmp_path / "a"), method="clp")
    b = transfer(str(src), str(hlp), str(tmp_path / "b"), method="clp", chat=False)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (a.path / name).read_bytes() == (b.path / name).read_bytes(), name
    assert not (a.path / "chat_template.jinja").exists()
    ta, tb = tensors(a.path), tensors(b.path)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert a.report["chat"] == {"template_carried": False, "templates": [], "dropped": False, "tokens": [],
                                "eos_token_id": [], "template_variables": {}, "warnings": []}
    assert a.report["chat"] == b.report["chat"] and a.report["target"]["added_control_tokens"] == 0
    assert "Chat:" not in summary(a.report, a.path)


def test_no_chat_flag_on_the_command_line(tmp_path, model_factory, english_lines, capsys):
    src = instruct_source(tmp_path / "src", english_lines)
    hlp = model_factory("gpt2", "de", "bpe", vocab=450, hidden=16)
    assert cli(["transfer", "--source", str(src), "--helper", str(hlp), "--output", str(tmp_path / "o"),
                "--no-chat"]) == 0
    report = json.loads((tmp_path / "o" / "transfer_report.json").read_text())
    assert report["chat"]["dropped"] is True and report["chat"]["tokens"] == []
    assert AutoTokenizer.from_pretrained(tmp_path / "o").chat_template is None
    assert cli(["transfer", "--source", str(src), "--helper", str(hlp), "--output", str(tmp_path / "c")]) == 0
    assert AutoTokenizer.from_pretrained(tmp_path / "c").chat_template == CHATML_TEMPLATE


def test_smollm2_style_eos_and_tokens_the_helper_already_has(tmp_path, english_lines, german_lines):
    # SmolLM2: <|im_end|> is the source's eos. The helper here already has <|im_start|> as a special token.
    src = instruct_source(tmp_path / "src", english_lines, "llama", "sentencepiece", eos_list=False,
                          eos_token="<|im_end|>")
    htok = add_chat_template(train_tokenizer(german_lines, 450, "bpe"), control_tokens=("<|im_start|>",))
    htok.chat_template = None
    hlp = save_model(tiny_model("gpt2", htok, hidden_size=16, num_heads=2), htok, tmp_path / "hlp")
    result = transfer(str(src), str(hlp), str(tmp_path / "out"), method="fvt")
    model, tok = load(result.path)
    src_model, src_tok = load(src)
    start, end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    assert start == htok.convert_tokens_to_ids("<|im_start|>") and end == len(htok)
    tokens = {t["token"]: t for t in result.report["chat"]["tokens"]}
    assert tokens["<|im_start|>"]["new"] is False and tokens["<|im_end|>"]["new"] is True
    assert tokens["<|im_end|>"]["from"] == ["chat_template", "config.eos_token_id", "generation_config.eos_token_id"]
    e_t, e_s = model.get_input_embeddings().weight, src_model.get_input_embeddings().weight
    assert torch.equal(e_t[[start, end]], e_s[src_tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])])
    # the helper's own eos keeps the source eos row (matched by role) and both stop generation
    assert torch.equal(e_t[tok.eos_token_id], e_s[src_tok.eos_token_id])
    assert model.generation_config.eos_token_id == [tok.eos_token_id, end]
    assert result.report["target"]["added_control_tokens"] == 1


def test_warnings_for_what_cannot_be_carried(tmp_path, english_lines, model_factory):
    template = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>"
                "{% endfor %}<|tool|>[INST]{% if eos_token_id is defined %}{{ eos_token_id }}{% endif %}")
    src = instruct_source(tmp_path / "src", english_lines, "llama", "sentencepiece", eos_list=False,
                          template=template)
    gen = json.loads((src / "generation_config.json").read_text())
    gen["eos_token_id"] = [gen["eos_token_id"], 99999]
    (src / "generation_config.json").write_text(json.dumps(gen))
    hlp = model_factory("gpt2", "de", "bpe", vocab=450, hidden=16)
    result = transfer(str(src), str(hlp), str(tmp_path / "out"), method="mean")
    warnings = "\n".join(result.report["chat"]["warnings"])
    assert "writes '<|tool|>', '[INST]', which the source tokenizer has no token for" in warnings
    assert "refers to token ids (eos_token_id)" in warnings
    assert "names id 99999, which no source token has" in warnings
    # bos_token renders the helper's <|endoftext|>, whose row is the source's eos (</s>), not its bos (<s>)
    assert "uses bos_token, which renders the target's '<|endoftext|>'" in warnings and "'<s>'" in warnings
    assert result.report["chat"]["template_variables"]["bos_token"]["rows_from_source_token"] == "</s>"
    assert "generate does not stop at the end of a turn" in warnings
    assert "; 5 warnings in the report." in summary(result.report, result.path)
    tok = AutoTokenizer.from_pretrained(result.path)
    assert tok.apply_chat_template(CHAT, tokenize=False).startswith("<|endoftext|><|im_start|>user")


def test_several_named_templates_are_all_carried(tmp_path, english_lines, model_factory):
    tool = CHATML_TEMPLATE.replace("{% endfor %}", "{% endfor %}<|tool_start|>")
    src = instruct_source(tmp_path / "src", english_lines)
    stok = AutoTokenizer.from_pretrained(src)
    stok.add_special_tokens({"extra_special_tokens": ["<|tool_start|>"]}, replace_extra_special_tokens=False)
    stok.chat_template = {"default": CHATML_TEMPLATE, "tool_use": tool}
    model = AutoModelForCausalLM.from_pretrained(src)
    model.resize_token_embeddings(len(stok), pad_to_multiple_of=64)
    save_model(model, stok, tmp_path / "src2")
    hlp = model_factory("gpt2", "de", "bpe", vocab=450, hidden=16)
    result = transfer(str(tmp_path / "src2"), str(hlp), str(tmp_path / "out"), method="mean")
    tok = AutoTokenizer.from_pretrained(result.path)
    assert template_texts(tok.chat_template) == {"default": CHATML_TEMPLATE, "tool_use": tool}
    assert result.report["chat"]["templates"] == ["default", "tool_use"]
    assert [t["token"] for t in result.report["chat"]["tokens"]] == ["<|im_start|>", "<|im_end|>", "<|tool_start|>"]
    assert tok("<|tool_start|>", add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids("<|tool_start|>")]


def test_template_scanning_helpers():
    found, rest = tokens_in_template("<|a|><|ab|>x<|ab|>", {"<|a|>": 1, "<|ab|>": 2, "<|b|>": 3})
    assert found == ["<|ab|>", "<|a|>"] and rest == "\x00\x00x\x00"
    assert template_texts(None) == {} and template_texts("t") == {"default": "t"}
    assert template_texts([{"name": "rag", "template": "r"}]) == {"rag": "r"}


def test_shards_of_the_helper_tokenizer_feed_the_chat_target(tmp_path, model_factory, english_lines, german_lines):
    # Token shards prepared with the helper's tokenizer stay valid for a target that only appends control
    # tokens after the helper's ids; a tokenizer that differs below them is still refused.
    from clp_transfer.errors import ClpError
    from clp_transfer.data.pipeline import prepare
    from clp_transfer.data.shards import tokenizer_fingerprint

    src = instruct_source(tmp_path / "src", english_lines)
    hlp = model_factory("gpt2", "de", "bpe", vocab=450, hidden=16)
    target = transfer(str(src), str(hlp), str(tmp_path / "out"), method="mean").path
    text = tmp_path / "de.txt"
    text.write_text("\n".join(german_lines) + "\n")
    shards = prepare(tmp_path / "data", 0.01, files=[str(text)], tokenizer=str(hlp), block_size=16,
                     progress=False).shards("train")
    tok, h_tok = AutoTokenizer.from_pretrained(target), AutoTokenizer.from_pretrained(hlp)
    assert tokenizer_fingerprint(tok) != tokenizer_fingerprint(h_tok)
    assert tokenizer_fingerprint(tok, below=len(h_tok)) == tokenizer_fingerprint(h_tok)
    shards.check_tokenizer(tok)
    other = AutoTokenizer.from_pretrained(model_factory("gpt2", "de", "bpe", vocab=300, hidden=16))
    below = AutoTokenizer.from_pretrained(target)  # an ordinary piece of the helper turned into a control token
    below.add_special_tokens({"extra_special_tokens": [h_tok.convert_ids_to_tokens(300)]},
                             replace_extra_special_tokens=False)
    for bad in (other, below):
        with pytest.raises(ClpError, match="made with tokenizer"):
            shards.check_tokenizer(bad)


def test_output_bias_entries_follow_the_carried_tokens(tmp_path, english_lines, model_factory):
    # Phi's head has a bias: the carried tokens get the source's bias entries too.
    from transformers import AutoConfig

    tok = add_chat_template(train_tokenizer(english_lines, 400, "bpe"))
    config = AutoConfig.for_model("phi", vocab_size=448, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, max_position_embeddings=128, tie_word_embeddings=False,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.lm_head.bias.normal_()
    src = save_model(model, tok, tmp_path / "src")
    hlp = model_factory("gpt2", "de", "bpe", vocab=450, hidden=16)
    out = transfer(str(src), str(hlp), str(tmp_path / "out"), method="mean").path
    bias_s, bias_t = model.lm_head.bias, load(out)[0].lm_head.bias
    src_ids = tok.convert_tokens_to_ids(list(CONTROL))
    tgt_ids = AutoTokenizer.from_pretrained(out).convert_tokens_to_ids(list(CONTROL))
    assert torch.equal(bias_t[tgt_ids], bias_s[src_ids])
