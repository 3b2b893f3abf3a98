"""``transfer``: a source model + a target-language helper -> a target-language model.

Build problem -> solve -> write, around the in-memory API :func:`clp_transfer.transfer.embeddings.transfer_embeddings`:

1. resolve source and helper to local safetensors directories (GGUF and hub ids included);
2. read the three small things the maths needs: source embeddings (and untied head), helper embeddings,
   and the two vocabularies - not the whole models;
3. match vocabularies canonically (:mod:`clp_transfer.transfer.tokens`), plan the carried chat tokens, and
   call :func:`transfer_embeddings` once: the method's rows, then (with ``--calibration_text``) the output
   calibration as a step on those rows;
4. copy the source checkpoint shard by shard with the embedding tensors replaced, write config, tokenizer and
   ``transfer_report.json`` into a temporary directory and rename it into place.

Peak memory is about the embedding matrices plus the largest shard, whatever the model size - except with
``--calibration_text``: measuring the calibration statistics (:mod:`clp_transfer.transfer.calibration`) runs
the target model once, which loads the whole source model in float32.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from .. import __version__
from ..atomic import atomic_directory, check_disjoint, check_output_path, claim_output
from .calibration import TargetText, calibration_statistics  # noqa: F401 (vocab_extend imports it from here)
from .chat import ChatPlan, apply_chat_tokenizer, plan_chat, set_chat_rows, update_chat_configs
from .chat import summary as chat_summary
from ..config import add_dataclass_arguments, build_config, require_flags, text_flag
from ..errors import ClpError
from .embeddings import TransferredEmbeddings, match_tokens, transfer_embeddings
from .embeddings import padded_rows  # noqa: F401 (vocab_extend imports it from here)
from .methods import METHODS, EmbeddingSolution, method_params
from ..models import (
    WEIGHTS_INDEX,
    EmbeddingKeys,
    ModelFiles,
    SafetensorsCheckpoint,
    find_embedding_keys,
    load_tokenizer,
    resolve_model,
)
from .tokens import TokenMatch, VocabInfo

log = logging.getLogger(__name__)

REPORT_NAME = "transfer_report.json"


@text_flag("calibration_text")
@dataclass
class TransferConfig:
    """Everything ``clp-transfer transfer`` takes."""

    source: str
    """Source model: local HF directory, hub id or .gguf file (large, other language)."""
    output: str
    """Output directory for the target model."""
    helper: str | None = None
    """Helper model in the target language (small), or a helper space directory (`clp-transfer helper --kind
    embeddings`); its tokenizer becomes the target tokenizer. Not needed with --helper_text."""
    helper_text: list[str] = field(default_factory=list)
    """Instead of --helper: target-language text files from which a helper space (skip-gram token vectors) is
    built on the fly, for --target_tokenizer or for a tokenizer trained on the text (clp_transfer.transfer.helper_space)."""
    target_tokenizer: str | None = None
    """With --helper_text: the target tokenizer (default: train a 16k byte-level BPE on the text)."""
    helper_text_cpu_minutes: float | None = None
    """With --helper_text: CPU-time budget of building the space (default 3)."""
    helper_tokenizer: str | None = None
    """Tokenizer of the helper when it is not stored with the helper model."""
    method: str = "auto"
    """Initialisation of the new tokens' rows (see `clp-transfer transfer --list-methods`). The default, auto,
    chooses among clp, fvt, their mix and omp, calibrated or not, by bits per byte on held-out documents of
    --text; without text it uses half FVT, half clp rows."""
    mode: Literal["replace", "extend"] = "replace"
    """replace: the helper's tokenizer becomes the target's (CLP). extend: keep the source tokenizer, its ids
    and rows, and add the helper's tokens it lacks as real vocabulary after them (same family only)."""
    new_token_logit_offset: float = 0.0
    """Extend mode, with --calibration_text: after the calibration, move the new output rows so their logits
    change by this many nats on average over the calibration text (negative: they take less probability from
    the source's tokens)."""
    keep_text: str | None = None
    """Extend mode: source-language text (.txt: a document per line; .jsonl: a "text" field) to keep as it was:
    new tokens that fire on it (see --keep_text_ratio) are left out, and with --new_token_guard the new rows'
    logits are lowered in contexts like it. Without it, new merges may fire inside source-language words."""
    keep_text_ratio: float = 0.1
    """Extend mode with --keep_text: leave out a new token when its rate (uses per byte) on the keep text is at
    least this times its rate on --calibration_text; 0 leaves out every new token that fires on the keep text."""
    keep_text_bytes: int = 8_000_000
    """Extend mode: UTF-8 bytes read from the keep text (and from the calibration text for the ratio)."""
    new_token_guard: float = 2.0
    """Extend mode with --keep_text and the calibration: lower the new rows' logits by about this many nats in
    keep-text contexts, leaving them in calibration-text contexts (a linear probe on the final hidden state;
    2 was best on the benchmark's dev texts, see docs/research.md); 0 turns it off."""
    params: list[str] = field(default_factory=list)
    """Method parameters as key=value, e.g. --params top_k=20 temperature=0.1."""
    seed: int = 0
    """Seed of the method's private random generator (the global RNG is not touched)."""
    canonical_matching: bool = True
    """Match tokens by canonical bytes across tokenizer families; --no-canonical_matching uses raw strings."""
    transfer_untied_head: bool = True
    """Give untied output heads the rows of their own tokens. --no-transfer_untied_head reproduces the
    original implementation's defect (head rows left in source positions), for ablations only."""
    pad_to_multiple_of: int | None = None
    """Pad the target vocabulary rows to a multiple of this (default: as the source, when it was padded)."""
    calibration_text: str | None = None
    """Target-language text (.txt: a document per line; .jsonl: a "text" field; .gz allowed) for the default
    method auto (it scores its candidates on held-out documents of it) and for methods with calibrate > 0,
    such as clp: target-token counts and forward passes of the target model (loads the whole source model).
    Without it auto falls back to fixed rows and the calibration is skipped, with a warning."""
    calibration_tokens: int = 4096
    """Positions of calibration text the target model is run on (hidden states for the calibration)."""
    calibration_count_bytes: int = 16_000_000
    """UTF-8 bytes of calibration text whose target tokens are counted (token frequencies)."""
    overwrite: bool = False
    """Replace an existing output directory."""
    allow_pickle: bool = False
    """Allow reading pickle checkpoints (*.bin); unsafe for files you do not trust."""
    trust_remote_code: bool = False
    """Allow models whose code lives in their repository."""
    chat: bool = True
    """Carry the source's chat template and its control tokens (with their source rows) into the target;
    --no-chat drops them (base-model use). A source without a chat template is not affected."""


@dataclass
class TransferResult:
    """What :func:`transfer` returns: where the model is, its report, and loaders."""

    path: Path
    report: dict[str, Any]

    def load_model(self, dtype: torch.dtype | None = torch.float32, **kwargs):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype, **kwargs)

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path)

    @property
    def model(self):
        return self.load_model()

    @property
    def tokenizer(self):
        return self.load_tokenizer()


def parse_params(items: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    if not items:
        return {}
    if isinstance(items, dict):
        return dict(items)
    out = {}
    for item in items:
        if "=" not in item:
            raise ClpError(f"method parameter {item!r} must look like key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def remap_rows(source: torch.Tensor, match: torch.Tensor, target_rows: int) -> torch.Tensor:
    """Per-token remap of a vocabulary-sized vector (e.g. an output bias): copied rows, mean elsewhere."""
    shared = match >= 0
    out = source[match[shared]].float().mean(0).expand(target_rows, *source.shape[1:]).clone()
    idx = torch.nonzero(shared).flatten()
    out[idx] = source[match[idx]].float()
    return out.to(source.dtype)


def _special_report(target: VocabInfo, source: VocabInfo, match: TokenMatch) -> dict[str, Any]:
    out = {}
    for role, tid in target.roles.items():
        sid = match.source_id[tid]
        out[role] = {
            "target_id": tid,
            "target_token": target.tokens[tid],
            "source_id": sid if sid >= 0 else None,
            "source_token": source.tokens[sid] if sid >= 0 else None,
        }
    return out


def _update_config(cfg: dict[str, Any], rows: int, roles: dict[str, int]) -> dict[str, Any]:
    cfg = dict(cfg)
    cfg["vocab_size"] = rows
    if isinstance(cfg.get("text_config"), dict) and "vocab_size" in cfg["text_config"]:
        cfg["text_config"] = {**cfg["text_config"], "vocab_size": rows}
    for role in ("bos", "eos", "pad"):
        key = f"{role}_token_id"
        if key in cfg or role in roles:
            cfg[key] = roles.get(role)
    return cfg


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def transfer(
    source: str,
    helper: str | None,
    output: str,
    method: str = "auto",
    helper_tokenizer: str | None = None,
    params: dict[str, Any] | list[str] | None = None,
    seed: int = 0,
    overwrite: bool = False,
    **options: Any,
) -> TransferResult:
    """Build the target model in ``output`` and return it (lazily loaded) with its report.

    >>> result = transfer("EleutherAI/pythia-410m", "malteos/gpt2-wechsel-german-ds-meg", "pythia-410m-de")  # doctest: +SKIP
    >>> model, tokenizer = result.model, result.tokenizer                                                    # doctest: +SKIP
    """
    cfg = TransferConfig(source=source, helper=helper, output=output, method=method,
                         helper_tokenizer=helper_tokenizer, params=params or [], seed=seed, overwrite=overwrite,
                         **options)
    return run_transfer(cfg)


def validate_transfer_config(cfg: TransferConfig) -> None:
    """Reject bad flags and method parameters before any work (ranges, finiteness, unknown names)."""
    from .methods import method_params

    METHODS.get(cfg.method)  # unknown method: "did you mean"
    method_params(cfg.method, parse_params(cfg.params))
    if cfg.pad_to_multiple_of is not None and cfg.pad_to_multiple_of < 1:
        raise ClpError(f"--pad_to_multiple_of must be a positive number of rows (got {cfg.pad_to_multiple_of})")
    for name in ("calibration_tokens", "calibration_count_bytes"):
        if getattr(cfg, name) < 1:
            raise ClpError(f"--{name} must be positive (got {getattr(cfg, name)})")
    if cfg.calibration_text is not None and not Path(cfg.calibration_text).is_file():
        raise ClpError(f"--calibration_text {cfg.calibration_text!r} does not exist; give a .txt or .jsonl file "
                       "of target text")


def _helper_space(cfg: TransferConfig):
    """The helper space of this transfer (built from --helper_text, or a helper space directory), else None."""
    from . import helper_space

    if cfg.helper_text:
        if cfg.helper:
            raise ClpError("give either --helper or --helper_text, not both")
        if cfg.helper_tokenizer:
            raise ClpError("--helper_tokenizer goes with --helper; with --helper_text use --target_tokenizer")
        return helper_space.space_from_text(cfg.helper_text, cfg.target_tokenizer, cfg.helper_text_cpu_minutes,
                                            seed=cfg.seed)
    if cfg.target_tokenizer or cfg.helper_text_cpu_minutes is not None:
        raise ClpError("--target_tokenizer and --helper_text_cpu_minutes go with --helper_text FILES")
    if not cfg.helper:
        raise ClpError("give a helper: --helper MODEL_OR_SPACE, or --helper_text FILES to build one from text")
    if helper_space.is_helper_space(cfg.helper):
        if cfg.helper_tokenizer:
            raise ClpError("a helper space carries its own tokenizer; leave out --helper_tokenizer")
        return helper_space.load_helper_space(cfg.helper)
    return None


def _space_report(report: dict[str, Any]) -> dict[str, Any]:
    return {"kind": report.get("kind"), "cpu_seconds": report.get("cpu_seconds"),
            "training": report.get("training"), "vectors": report.get("vectors"),
            "tokenizer": report.get("tokenizer"), "data_bytes": report.get("data", {}).get("bytes")}


def run_transfer(cfg: TransferConfig) -> TransferResult:
    """Check the flags, claim the output (refused when it overlaps an input; locked against a second run),
    then build the target model; see the module docstring."""
    validate_transfer_config(cfg)
    inputs = [cfg.source, cfg.helper, cfg.helper_tokenizer, cfg.calibration_text, cfg.keep_text, cfg.target_tokenizer,
              *(cfg.helper_text or [])]
    with claim_output(cfg.output, cfg.overwrite, inputs):
        return _run_transfer(cfg)


def _run_transfer(cfg: TransferConfig) -> TransferResult:
    """Build problem -> solve -> write: read the matrices, :func:`transfer_embeddings`, write the model."""
    t0 = time.perf_counter()
    from .vocab_extend import check_mode

    check_mode(cfg)
    out_path = check_output_path(cfg.output, cfg.overwrite)
    inputs = _read_inputs(cfg)
    if cfg.mode == "extend":
        from .vocab_extend import run_extend

        if cfg.method == "auto":  # the measured choice is built for replace mode; extend's measured method is clp
            log.info("extend mode: method auto chooses among replace-mode candidates; using clp (calibrated), "
                     "extend mode's measured default (docs/research.md)")
            cfg = dataclasses.replace(cfg, method="clp")

        return run_extend(cfg, inputs.src, inputs.hlp, inputs.src_tok, inputs.tgt_tok, inputs.src_ckpt,
                          inputs.keys, inputs.e_s, inputs.o_s, inputs.e_h, inputs.timings, t0)
    result, chat = _solve(cfg, inputs)
    report = _transfer_report(cfg, inputs, result, chat)
    t = time.perf_counter()
    with atomic_directory(out_path, overwrite=cfg.overwrite, inputs=[inputs.src.path, inputs.hlp.path]) as tmp:
        _write_model(tmp, cfg, inputs, result, chat, report)
        write_transfer_report(tmp, report, inputs.timings, t, t0)
        from ..model_card import write_model_card  # README.md: the hub model card, built from the report

        write_model_card(tmp, "transfer", source_dir=inputs.src.path, helper_dir=inputs.hlp.path)
    log.info("%s", summary(report, out_path))
    return TransferResult(out_path, report)


@dataclass
class _Inputs:
    """What the transfer reads: resolved models, tokenizers and the embedding matrices (never whole models)."""

    src: ModelFiles
    hlp: ModelFiles
    space: Any
    src_tok: Any
    tgt_tok: Any
    src_ckpt: SafetensorsCheckpoint
    keys: EmbeddingKeys
    e_s: torch.Tensor
    o_s: torch.Tensor | None
    e_h: torch.Tensor
    source_vocab: VocabInfo
    target_vocab: VocabInfo
    resolve_s: float
    timings: dict[str, float]


def _read_inputs(cfg: TransferConfig) -> _Inputs:
    t0 = time.perf_counter()
    src = resolve_model(cfg.source, "source model", cfg.allow_pickle, cfg.trust_remote_code)
    space = _helper_space(cfg)  # None for a helper model
    hlp = ModelFiles(space.path, cfg.helper or "text", "helper_space") if space else resolve_model(
        cfg.helper, "helper model", cfg.allow_pickle, cfg.trust_remote_code)
    check_disjoint(cfg.output, [src.path, hlp.path])  # what hub ids and .gguf files resolved to
    src_tok = load_tokenizer(src.path, cfg.trust_remote_code, "source model")
    tgt_tok = space.tokenizer if space else load_tokenizer(cfg.helper_tokenizer or hlp.path, cfg.trust_remote_code,
                                                           "helper model")
    resolve_s = time.perf_counter() - t0
    t = time.perf_counter()
    src_ckpt = SafetensorsCheckpoint(src.path)
    keys = find_embedding_keys(src.path, src_ckpt, cfg.trust_remote_code)
    e_s = src_ckpt.get(keys.input)
    o_s = src_ckpt.get(keys.output) if keys.output and not keys.tied else None
    if space is None:
        hlp_ckpt = SafetensorsCheckpoint(hlp.path)
        e_h = hlp_ckpt.get(find_embedding_keys(hlp.path, hlp_ckpt, cfg.trust_remote_code).input)
    else:
        e_h = space.vectors
    timings = {"resolve_s": resolve_s, "read_embeddings_s": time.perf_counter() - t}
    source_vocab, target_vocab = VocabInfo.from_tokenizer(src_tok), VocabInfo.from_tokenizer(tgt_tok)
    if len(target_vocab) > e_h.shape[0]:
        raise ClpError(
            f"the helper tokenizer has {len(target_vocab)} tokens but the helper model's embeddings only "
            f"{e_h.shape[0]} rows: tokenizer and model do not belong together (check --helper_tokenizer)"
        )
    if len(source_vocab) > e_s.shape[0]:
        raise ClpError(
            f"the source tokenizer has {len(source_vocab)} tokens but its embeddings only {e_s.shape[0]} rows"
        )
    return _Inputs(src, hlp, space, src_tok, tgt_tok, src_ckpt, keys, e_s, o_s, e_h, source_vocab, target_vocab,
                   resolve_s, timings)


def _solve(cfg: TransferConfig, inputs: _Inputs) -> tuple[TransferredEmbeddings, ChatPlan]:
    """Match, plan the carried chat tokens, then one :func:`transfer_embeddings` call (rows, calibration)."""
    t = time.perf_counter()
    match = match_tokens(inputs.source_vocab, inputs.target_vocab, cfg.canonical_matching)
    chat = plan_chat(inputs.src_tok, inputs.source_vocab, inputs.tgt_tok, inputs.target_vocab, match,
                     inputs.src.path, enabled=cfg.chat)
    inputs.timings["plan_s"] = time.perf_counter() - t

    params = parse_params(cfg.params)
    probe = _target_text(cfg, inputs, method_params(cfg.method, params)) if match.missing_ids else None
    try:
        result = transfer_embeddings(
            inputs.e_s, inputs.e_h, inputs.source_vocab, inputs.target_vocab, source_output=inputs.o_s,
            method=cfg.method, params=params, seed=cfg.seed,
            canonical_matching=cfg.canonical_matching, pad_to_multiple_of=cfg.pad_to_multiple_of,
            calibration=probe, match=match,
            extra_rows=len(chat.new_tokens))  # carried control tokens: ids after the helper's vocabulary
    finally:
        if probe is not None:
            probe.release()
    inputs.timings["match_s"] = inputs.timings.pop("plan_s") + result.report.timings.pop("match_s")
    inputs.timings.update(result.report.timings)
    o_s, rows = inputs.o_s, result.report.target_rows
    if o_s is not None and not cfg.transfer_untied_head:
        # Ablation: the original behaviour (resize by position) - row i of the head keeps source row i.
        log.warning("--no-transfer_untied_head: the output head keeps source rows by position (broken on purpose)")
        by_position = torch.arange(rows)
        by_position[by_position >= o_s.shape[0]] = -1
        result.output = remap_rows(o_s, by_position, rows)
    set_chat_rows(chat, result.input, result.output, inputs.e_s, o_s)  # after calibration: exact source rows
    return result, chat


def _target_text(cfg: TransferConfig, inputs: _Inputs, params: dict[str, Any]) -> TargetText | None:
    """The target text the method measures on: read and tokenized once, the source model loaded on first use;
    ``auto`` holds out check documents. None without text, or when the method needs none."""
    if cfg.calibration_text is None:
        return None
    auto = cfg.method == "auto"
    if not (auto or METHODS.get(cfg.method).wants_calibration(params)):
        return None
    return TargetText(inputs.src.path, inputs.tgt_tok, cfg.calibration_text, cfg.calibration_tokens,
                      cfg.calibration_count_bytes, check_tokens=int(params["check_tokens"]) if auto else 0,
                      seed=cfg.seed, trust_remote_code=cfg.trust_remote_code)


def _transfer_report(cfg: TransferConfig, inputs: _Inputs, result: TransferredEmbeddings,
                     chat: ChatPlan) -> dict[str, Any]:
    """``transfer_report.json`` without timings: the models, the typed embedding report, the options."""
    r, src, hlp, space = result.report, inputs.src, inputs.hlp, inputs.space
    report: dict[str, Any] = {
        "clp_transfer_version": __version__,
        "source": {"origin": src.origin, "kind": src.kind, "vocab_size": r.source_vocab_size,
                   "embedding_rows": r.source_rows, "tokenizer_style": r.source_tokenizer_style,
                   "tied": inputs.keys.tied},
        "helper": {"origin": hlp.origin, "kind": hlp.kind, "embedding_rows": r.helper_rows,
                   "tokenizer": cfg.helper_tokenizer or hlp.origin, "tokenizer_style": r.target_tokenizer_style,
                   **({"space": _space_report(space.report)} if space else {})},
        "target": {"vocab_size": r.target_vocab_size, "added_control_tokens": len(chat.new_tokens),
                   "embedding_rows": r.target_rows, "padded_to_multiple_of": r.padded_to_multiple_of,
                   "dtype": str(inputs.e_s.dtype).replace("torch.", ""), "tied": inputs.keys.tied},
        "method": r.method,
        "params": r.params,
        "seed": r.seed,
        "canonical_matching": r.canonical_matching,
        "calibration_text": cfg.calibration_text,
        "transfer_untied_head": cfg.transfer_untied_head,
        "matching": r.matching,
        "special_tokens": _special_report(result.problem.target_vocab, result.problem.source_vocab,
                                          result.problem.match),
        "new_rows": r.new_rows,
        "new_token_ids": r.new_token_ids,
    }
    if r.tokens_without_pieces is not None:
        report["pieces"] = {"no_pieces": r.tokens_without_pieces}
    return report


def _write_model(tmp: Path, cfg: TransferConfig, inputs: _Inputs, result: TransferredEmbeddings, chat: ChatPlan,
                 report: dict[str, Any]) -> None:
    """Checkpoint with the new matrices, config, chat files and tokenizer, into the directory being built."""
    solution = EmbeddingSolution(result.input, result.output, {})
    rows = result.report.target_rows
    _write_checkpoint(tmp, inputs.src_ckpt, inputs.keys, solution, result.problem.problem.source_id, rows,
                      chat.row_sources)
    _write_config(tmp, inputs.src.path, rows, inputs.target_vocab.roles)
    update_chat_configs(tmp, chat)
    fit_to_source_context(inputs.tgt_tok, inputs.src.path, cfg.trust_remote_code)
    apply_chat_tokenizer(inputs.tgt_tok, chat)
    report["chat"] = _chat_report(chat)
    inputs.tgt_tok.save_pretrained(tmp)


def fit_to_source_context(tokenizer: Any, source_dir: Path, trust_remote_code: bool = False) -> None:
    """Give the target tokenizer the source's context length.

    The target model has the source's context, not the helper's: without this, a helper trained on short
    blocks would make the target tokenizer warn about (and truncate at) the helper's length."""
    from ..models import context_length, plain_context_length

    known, context = plain_context_length(source_dir)  # config.json alone when that is safe
    if not known:
        from transformers import AutoConfig

        context = context_length(AutoConfig.from_pretrained(source_dir, trust_remote_code=trust_remote_code))
    if context:
        tokenizer.model_max_length = context


def write_transfer_report(tmp: Path, report: dict[str, Any], timings: dict[str, float], write_start: float,
                 start: float) -> None:
    """Complete ``report`` (timings from the perf-counter marks ``write_start`` and ``start``, peak RSS,
    versions) and write it as ``REPORT_NAME`` into the output directory being built."""
    timings["write_s"] = time.perf_counter() - write_start
    timings["total_s"] = time.perf_counter() - start
    report["timings"] = {k: round(v, 3) for k, v in timings.items()}
    report["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    report["versions"] = _versions()
    (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def _write_checkpoint(tmp: Path, ckpt: SafetensorsCheckpoint, keys: EmbeddingKeys, solution: EmbeddingSolution,
                      source_id: torch.Tensor, rows: int, row_sources: dict[int, int] | None = None) -> None:
    """Copy the source weights file by file, replacing the vocabulary-sized tensors.

    ``row_sources`` (target id -> source id, the carried control tokens) also sets those entries of an
    output bias.
    """
    from safetensors.torch import save_file

    replace: dict[str, torch.Tensor] = {keys.input: solution.input}
    if keys.output:
        replace[keys.output] = solution.output if solution.output is not None else solution.input
    total = 0
    weight_map: dict[str, str] = {}
    for file in tqdm(ckpt.files, desc="writing shards", unit="file", disable=len(ckpt.files) < 2):
        tensors: dict[str, torch.Tensor] = {}
        for k, v in ckpt.iter_file(file):
            if k in replace:
                v = replace[k].clone()  # a tied copy must not share memory with the input rows
            elif k == keys.output_bias:
                bias = remap_rows(v, source_id, rows)
                for t, s in (row_sources or {}).items():
                    bias[t] = v[s]
                v = bias
            tensors[k] = v.contiguous()
            total += v.numel() * v.element_size()
            weight_map[k] = file
        save_file(tensors, tmp / file, metadata={"format": "pt", **ckpt.file_metadata(file)})
        del tensors
    if len(ckpt.files) > 1 or (ckpt.path / WEIGHTS_INDEX).is_file():
        index = {"metadata": {**ckpt.metadata, "total_size": total}, "weight_map": weight_map}
        (tmp / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _write_config(tmp: Path, source_dir: Path, rows: int, roles: dict[str, int]) -> None:
    cfg = json.loads((source_dir / "config.json").read_text())
    (tmp / "config.json").write_text(json.dumps(_update_config(cfg, rows, roles), indent=2) + "\n")
    gen = source_dir / "generation_config.json"
    if gen.is_file():
        g = json.loads(gen.read_text())
        for role in ("bos", "eos", "pad"):
            key = f"{role}_token_id"
            if key in g or role in roles:
                g[key] = roles.get(role)
        (tmp / "generation_config.json").write_text(json.dumps(g, indent=2) + "\n")
    for extra in source_dir.glob("*.py"):  # remote-code models keep their modelling code
        shutil.copy2(extra, tmp / extra.name)


def _chat_report(chat: ChatPlan) -> dict[str, Any]:
    """The report's ``chat`` section; its warnings are logged too."""
    for w in chat.warnings:
        log.warning("chat: %s", w)
    return chat.report()


def _versions() -> dict[str, str]:
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}


def _head_summary(report: dict[str, Any]) -> str:
    if report["target"]["tied"]:
        return "tied"
    if report.get("transfer_untied_head", True):
        return "untied, transferred by token"
    return "untied, left in source positions (--no-transfer_untied_head)"


def _auto_summary(auto: dict[str, Any] | None) -> str:
    """`` (chose X: check bits per byte 2.03 vs runner-up Y 2.07)`` for method auto."""
    if not auto:
        return ""
    if "candidates" not in auto:
        return f" (chose {auto['choice']}: {auto.get('reason', '')})"
    scored = [c for c in auto["candidates"] if c.get("scores")]
    best = {c["name"]: c["scores"].get("check", c["scores"].get("screen")) for c in scored}
    final = [c for c in scored if "check" in c["scores"]] or scored
    ranked = sorted(final, key=lambda c: best[c["name"]])
    text = f" (chose {auto['choice']}, bits per byte {best[auto['choice']]:.4f} on held-out text"
    if len(ranked) > 1:
        runner = next(c for c in ranked if c["name"] != auto["choice"])
        text += f"; runner-up {runner['name']} {best[runner['name']]:.4f}"
    return text + f"; {len(scored)} candidates, see transfer_report.json)"


def summary(report: dict[str, Any], path: Path) -> str:
    m = report["matching"]
    nr = report["new_rows"]
    ratio = nr.get("norm_ratio_new_to_shared")
    return (
        f"Transferred {report['source']['origin']} to the vocabulary of {report['helper']['tokenizer']} with "
        f"method {report['method']}{_auto_summary(nr.get('auto'))}: {m['shared']} of {report['target']['vocab_size']} target tokens reuse a "
        f"source row ({m['exact']} exact, {m['canonical']} after canonical matching, "
        f"{m['special_role'] + m['special_text']} special), {m['missing']} are new"
        + (f" (mean norm {ratio:.2f}x that of shared rows)" if ratio is not None else "")
        + f". Head: {_head_summary(report)}; "
        f"{report['target']['embedding_rows']} rows ({report['target']['dtype']}). "
        f"Took {report['timings']['total_s']:.1f} s, peak RSS {report['peak_rss_mb']:.0f} MB. Wrote {path}."
        + chat_summary(report.get("chat"))
    )


# ------------------------------------------------------------------------------------------------- CLI


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, TransferConfig)
    parser.add_argument("--list-methods", action="store_true", help="list the transfer methods and exit")


def list_methods() -> str:
    """One line per registered method: name, description and default parameters."""
    lines = []
    for name in METHODS:
        spec = METHODS.get(name)
        defaults = ", ".join(f"{k}={v}" for k, v in spec.defaults.items())
        lines.append(f"{name:14s} {spec.description}" + (f" [{defaults}]" if defaults else ""))
    return "\n".join(lines)


def cli_main(args: argparse.Namespace) -> int:
    if args.list_methods:
        print(list_methods())
        return 0
    require_flags(TransferConfig, args, one_of=[("helper", "helper_text")])
    cfg = build_config(TransferConfig, args)
    run_transfer(cfg)  # logs its one-paragraph summary to stderr
    return 0
