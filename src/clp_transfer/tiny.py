"""Small tokenizers and models built from scratch: test fixtures, the quick demo and helper models.

Three tokenizer families, as the big models use them:

- ``bpe``:         byte-level BPE with ``Ġ`` word-start marks (GPT-2, Pythia, SmolLM, Llama 3)
- ``sentencepiece``: Metaspace ``▁`` word starts with ``<0xNN>`` byte fallback (Llama 2, Mistral, Gemma)
- ``wordpiece``:   ``##`` continuation marks (BERT)
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Literal

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

TokenizerKind = Literal["bpe", "sentencepiece", "wordpiece"]
Architecture = Literal["gpt2", "gpt_neox", "llama"]


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, kind: TokenizerKind = "bpe", min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Train a tokenizer of the given family on ``texts`` and wrap it for ``transformers``."""
    texts = list(texts) if not isinstance(texts, list) else texts
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        specials = ["<|endoftext|>", "<pad>"]
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
            unk_token="<|endoftext|>", pad_token="<pad>",
        )
    if kind == "sentencepiece":
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
        specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials, show_progress=False
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
        )
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials, show_progress=False
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="[CLS]", eos_token="[SEP]", unk_token="[UNK]", pad_token="[PAD]"
        )
    raise ValueError(f"unknown tokenizer kind {kind!r}")


def tiny_config(
    arch: Architecture,
    vocab_size: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_position_embeddings: int = 256,
    tie_word_embeddings: bool | None = None,
    intermediate_size: int | None = None,
    **special_ids: int,
):
    """A small config of one of the supported architectures (``tie_word_embeddings=None``: family default)."""
    inter = intermediate_size or 4 * hidden_size
    if arch == "gpt2":
        kw = dict(n_embd=hidden_size, n_layer=num_layers, n_head=num_heads, n_positions=max_position_embeddings,
                  n_inner=inter)
        tied = True if tie_word_embeddings is None else tie_word_embeddings
    elif arch == "gpt_neox":
        kw = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                  intermediate_size=inter, max_position_embeddings=max_position_embeddings, rotary_pct=0.25)
        tied = False if tie_word_embeddings is None else tie_word_embeddings
    elif arch == "llama":
        kw = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                  num_key_value_heads=max(1, num_heads // 2), intermediate_size=inter,
                  max_position_embeddings=max_position_embeddings)
        tied = True if tie_word_embeddings is None else tie_word_embeddings
    else:
        raise ValueError(f"unknown architecture {arch!r}")
    return AutoConfig.for_model(arch, vocab_size=vocab_size, tie_word_embeddings=tied, **kw, **special_ids)


def tiny_model(
    arch: Architecture,
    tokenizer: PreTrainedTokenizerFast,
    seed: int = 0,
    pad_vocab_to_multiple_of: int | None = None,
    dtype: torch.dtype = torch.float32,
    **config_kwargs,
) -> PreTrainedModel:
    """A randomly initialised model sized to ``tokenizer`` (vocabulary padded up if asked)."""
    vocab = len(tokenizer)
    if pad_vocab_to_multiple_of:
        vocab = -(-vocab // pad_vocab_to_multiple_of) * pad_vocab_to_multiple_of
    ids = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
           if getattr(tokenizer, k) is not None}
    config = tiny_config(arch, vocab, **config_kwargs, **ids)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def save_model(model: PreTrainedModel, tokenizer, path: str | Path, **save_kwargs) -> Path:
    """``save_pretrained`` both into ``path`` (safetensors)."""
    path = Path(path)
    model.save_pretrained(path, **save_kwargs)
    tokenizer.save_pretrained(path)
    return path


CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""A ChatML chat template (the format of SmolLM2-Instruct and Qwen), for tiny instruct-style sources."""


def add_chat_template(tokenizer: PreTrainedTokenizerFast, template: str = CHATML_TEMPLATE,
                      control_tokens: tuple[str, ...] = ("<|im_start|>", "<|im_end|>"),
                      eos_token: str | None = None) -> PreTrainedTokenizerFast:
    """Make ``tokenizer`` an instruct model's: ``control_tokens`` added as special tokens (after its
    vocabulary), ``template`` as its chat template and, if given, ``eos_token`` as its end-of-sequence token.
    Size a model to the tokenizer afterwards (:func:`tiny_model` uses ``len(tokenizer)``)."""
    from tokenizers import AddedToken

    tokenizer.add_special_tokens(
        {"extra_special_tokens": [AddedToken(t, special=True, normalized=False) for t in control_tokens]},
        replace_extra_special_tokens=False,
    )
    tokenizer.chat_template = template
    if eos_token is not None:
        tokenizer.eos_token = eos_token
    return tokenizer
