"""Hugging Face model cards (``README.md``) for every model directory the tool writes.

``transfer``, ``train`` (its ``final/``) and ``helper`` each call :func:`write_model_card` once. The card is
built from the machine-readable records next to the model (``transfer_report.json``, ``helper_report.json``,
``train_config.yaml`` and the run's ``results.json``), so it states only what the tool did and measured:

- YAML metadata in the hub's format (``huggingface_hub.ModelCardData``): ``language``, ``base_model``,
  ``library_name: transformers``, ``pipeline_tag``, ``tags``, ``datasets`` and ``license``. The license and the
  base model come from the source where it records them (its own model card, the GGUF metadata, a hub id or a
  hub cache path); a fact that is not known is left out of the metadata and the card says so.
- What was done (source, helper, method and its parameters, shared/new token counts; training data, budget,
  phases), the bits per byte measured where the stage measures them, and how to load the model.

The cards of later stages inherit ``language``, ``license`` and ``base_model`` from the card of the model they
start from (a helper's card gives the transfer its language; a transfer's card gives training its base
model), so the chain helper -> transfer -> train keeps its facts.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from .atomic import atomic_write_text

log = logging.getLogger(__name__)

CARD_NAME = "README.md"
TAG = "clp-transfer"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_CACHE = re.compile(r"models--([^/]+?)--([^/]+)/snapshots/")
_TMP_NAME = re.compile(r"^\.(.+)\.tmp-[0-9a-f]{8}$")


@dataclass
class Provenance:
    """What is known about a model the output derives from."""

    license: str | None = None
    language: list[str] = field(default_factory=list)
    hub_id: str | None = None
    """The model's own hub id, when it has one."""
    base_model: str | None = None
    """The base model its card names (for a card written by this tool: the original source)."""
    tags: list[str] = field(default_factory=list)


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def read_card_data(directory: Path) -> dict[str, Any]:
    """The YAML metadata of ``directory/README.md`` (empty when there is none or it does not parse)."""
    path = directory / CARD_NAME
    if not path.is_file():
        return {}
    try:
        from huggingface_hub import ModelCard

        return ModelCard.load(path).data.to_dict()
    except Exception as e:  # a hand-written README without (valid) front matter is not an error
        log.debug("no model card metadata in %s: %s", path, e)
        return {}


def _gguf_metadata(origin: Path) -> dict[str, Any]:
    """``general.license`` / ``general.languages`` of a GGUF file (or of the one .gguf in a directory)."""
    files = [origin] if origin.is_file() else sorted(origin.glob("*.gguf")) if origin.is_dir() else []
    if len(files) != 1 or files[0].suffix != ".gguf":
        return {}
    try:
        from gguf import GGUFReader

        fields = GGUFReader(files[0]).fields
        out = {}
        for key in ("general.license", "general.languages"):
            if key in fields:
                out[key] = fields[key].contents()
        return out
    except Exception as e:  # gguf not installed or an unreadable file: the card just knows less
        log.debug("could not read GGUF metadata of %s: %s", files[0], e)
        return {}


def provenance(model_dir: str | Path | None, origin: str | None = None) -> Provenance:
    """License, language and hub id of a model from its card, its GGUF metadata, or its name."""
    p = Provenance()
    if origin and _HUB_ID.match(origin) and not Path(origin).expanduser().exists():
        p.hub_id = origin
    elif model_dir is not None and (m := _HUB_CACHE.search(str(Path(model_dir).resolve()) + "/")):
        p.hub_id = f"{m.group(1)}/{m.group(2)}"
    data = read_card_data(Path(model_dir)) if model_dir is not None else {}
    o = Path(origin).expanduser() if origin else None
    if o is not None and o.exists():
        if not data and o.is_dir():
            data = read_card_data(o)
        meta = _gguf_metadata(o)  # a GGUF source: its cache directory has no card, the file has metadata
        data["license"] = data.get("license") or meta.get("general.license")
        data["language"] = data.get("language") or meta.get("general.languages")
    p.license = str(data["license"]) if data.get("license") else None
    p.language = _as_list(data.get("language"))
    p.base_model = (_as_list(data.get("base_model")) or [None])[0]
    p.tags = _as_list(data.get("tags"))
    return p


def final_name(directory: Path) -> str:
    """The name the directory will have (``atomic_directory`` writes into ``.<name>.tmp-xxxxxxxx``)."""
    m = _TMP_NAME.match(directory.name)
    return m.group(1) if m else directory.name


def _render(data: dict[str, Any], body: str) -> str:
    """Front matter (validated by ``huggingface_hub``) + markdown body."""
    from huggingface_hub import ModelCard, ModelCardData

    card_data = ModelCardData(**{k: v for k, v in data.items() if v not in (None, [], "")})
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body.strip()}\n")
    return str(card.content)


def _fmt(x: Any, digits: int = 4) -> str:
    if isinstance(x, float):
        return "n/a" if math.isnan(x) else f"{x:.{digits}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def _size(n: int | float) -> str:
    """Bytes as MB (2**20) or KB, with enough digits to be non-zero."""
    return f"{n / 2**20:,.1f} MB" if n >= 2**20 else f"{n / 2**10:,.1f} KB"


def _loading(name: str) -> str:
    return (
        "## How to load it\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'path = "{name}"  # this directory, or its hub id once uploaded\n'
        "model = AutoModelForCausalLM.from_pretrained(path)\ntokenizer = AutoTokenizer.from_pretrained(path)\n```\n"
    )


def _license_note(license: str | None, whence: str, allowed_by: str = "the source's terms") -> str:
    if license:
        return f"License: `{license}`, {whence}."
    return (f"License: not recorded ({whence}), so the metadata has no `license`; "
            f"set one that {allowed_by} allow before publishing.")


def _language_note(language: list[str], how: str = "the helper's card names none") -> str:
    if language:
        return ""
    return (f"\nLanguage: not recorded ({how}), so the metadata has no `language`; add it (e.g. `language: [de]`) "
            "before publishing.\n")


def _table(rows: list[tuple[str, str]]) -> str:
    """A two-column markdown table without a header text."""
    return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def _for_language(language: list[str]) -> str:
    return f" (language: {', '.join(language)})" if language else ""


# ------------------------------------------------------------------------------------------------ the cards


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _transfer_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    src, hlp, m, tgt = r["source"], r["helper"], r["matching"], r["target"]
    rules = ", ".join(f"{k}: {_fmt(v)}" for k, v in m.items() if k not in ("shared", "missing") and v)
    params = ", ".join(f"`{k}={v}`" for k, v in sorted(r.get("params", {}).items())) or "defaults"
    head = "tied to the input embeddings" if tgt["tied"] else (
        "untied; its rows transferred by token with the same weights as the input side"
        if r.get("transfer_untied_head", True) else "untied, left in source positions (ablation)")
    matching = "canonical (bytes + word start)" if r.get("canonical_matching", True) else "exact strings"
    return [
        ("source", f"`{src['origin']}` ({src['kind']}; {_fmt(src['vocab_size'])} tokens, "
                   f"{src['tokenizer_style']} tokenizer)"),
        ("helper", f"`{hlp['origin']}` (its {hlp['tokenizer_style']} tokenizer is this model's tokenizer)"),
        ("method", f"`{r['method']}`, parameters {params}, seed {r.get('seed')}"),
        ("vocabulary", f"{_fmt(tgt['vocab_size'])} tokens: **{_fmt(m['shared'])} shared** with the source (rows "
                       f"copied), **{_fmt(m['missing'])} new** (rows from `{r['method']}`)"),
        ("matching", f"{matching}; {rules}"),
        ("calibration text", f"`{r['calibration_text']}`" if r.get("calibration_text") else "none"),
        ("embeddings", f"{_fmt(tgt['embedding_rows'])} rows ({tgt['dtype']}); output head {head}"),
        ("tool", f"clp-transfer {r.get('clp_transfer_version', '?')}; full record in `transfer_report.json`"),
    ]


def transfer_card(directory: Path, source_dir: str | Path | None = None,
                  helper_dir: str | Path | None = None) -> str:
    """The card of a ``transfer`` output, from its ``transfer_report.json``."""
    r = _read_json(directory / "transfer_report.json")
    src, hlp = r["source"], r["helper"]
    source = provenance(source_dir, src["origin"])
    helper = provenance(helper_dir, hlp["origin"])
    language = helper.language
    name = final_name(directory)
    whence = (f"the license of the source `{src['origin']}`, whose weights this model keeps" if source.license
              else f"the source `{src['origin']}` names none in its card or GGUF metadata")
    helper_license = f" The helper's license: `{helper.license}`." if helper.license else ""
    body = f"""
# {name}

A causal language model{_for_language(language)}, made with clp-transfer's `transfer` by **cross-lingual
vocabulary transfer** (CLP-Transfer, Ostendorff & Rehm 2023): the transformer body of the source model
`{src['origin']}` with the vocabulary of the helper model `{hlp['tokenizer']}`. Tokens both vocabularies share
keep their source embeddings; each new token's embedding is built from the source embeddings of shared tokens,
weighted by similarity in the helper's embedding space. It has not been trained after the transfer: continue
pretraining it on target-language text (`clp-transfer train`) before using it.

## What was done

{_table(_transfer_rows(r))}

## Measurements

Bits per byte: not measured by `transfer`. Measure them on held-out target-language text with
`clp-transfer perplexity --model {name} --text_files heldout.txt` (comparable across tokenizers).

## License and language

{_license_note(source.license, whence)}{helper_license}
{_language_note(language)}
{_loading(name)}"""
    tags = [TAG, "cross-lingual-transfer", "clp", f"transfer-method-{r['method']}"]
    return _render({"language": language, "license": source.license, "library_name": "transformers",
                    "pipeline_tag": "text-generation", "base_model": source.hub_id, "tags": tags}, body)


def _data_description(data_dir: str | None) -> tuple[str, list[str]]:
    """A line about the training data (from the prepare stage's stats.json) and hub dataset ids for metadata."""
    stats = _read_json(Path(data_dir) / "stats.json") if data_dir else {}
    src = stats.get("source") or {}
    train = (stats.get("splits") or {}).get("train") or {}
    size = (f"; train split {_size(train.get('bytes', 0))} of text, {_fmt(train.get('tokens', 0))} tokens"
            if train else "")
    if src.get("type") == "hub":
        name = src.get("dataset_name")
        what = f"hub dataset `{name}`" + (f" (config `{src['dataset_config_name']}`)"
                                          if src.get("dataset_config_name") else "")
        if src.get("revision"):
            what += f", read from its parquet conversion `{src['revision']}`"
        local = Path(str(name)).expanduser().exists()
        return f"{what}{size} (`{data_dir}`)", [] if local else [str(name)]
    if src.get("type") == "files":
        files = src.get("files") or []
        return f"{len(files)} local file(s), e.g. `{files[0] if files else '?'}`{size} (`{data_dir}`)", []
    return f"`{data_dir}`", []


def _phase_rows(phases: list[dict[str, Any]], cfg: dict[str, Any]) -> str:
    rows = []
    for ph in phases:
        tuning = ph.get("name") == "embedding-tuning"
        lr = cfg.get("embedding_learning_rate") if tuning else cfg.get("learning_rate")
        what = ("embeddings only" if cfg.get("embedding_freeze_body", True) else "all, body at the base rate") \
            if tuning else "all parameters"
        rows.append(f"| {ph.get('name')} | {_fmt(ph.get('steps'))} | {what} | {lr} | {ph.get('batch_size')} | "
                    f"{ph.get('schedule')}, warm-up {ph.get('warmup_steps')} |")
    return "\n".join(rows)


def _start_description(start: Any, scratch: bool, transfer: dict[str, Any]) -> str:
    """Where the training started: a (transferred) model, or an architecture trained from scratch."""
    if scratch:
        return f"the architecture of `{start}`, **trained from scratch** (random initialisation)"
    out = f"`{start}`"
    if transfer:
        out += (f", itself made by `transfer` (method `{transfer.get('method')}`) from the source "
                f"`{transfer['source']['origin']}` and the helper `{transfer['helper']['origin']}`: "
                f"{_fmt(transfer['matching']['shared'])} shared and {_fmt(transfer['matching']['missing'])} "
                "new tokens")
    return out


def _final_eval_text(fe: dict[str, Any]) -> str:
    if not fe:
        return "Not measured at the end of training (no validation split, or `--no-final_eval`)."
    return (f"On the whole validation split of the training data ({_fmt(fe.get('final_eval_tokens', 0))} "
            f"predicted tokens): loss {_fmt(fe.get('final_eval_loss'))} nats per token, token perplexity "
            f"{_fmt(fe.get('final_eval_ppl'), 2)}, **{_fmt(fe.get('final_eval_bpb'))} bits per byte** (bytes "
            "taken pro rata from the split; `clp-transfer perplexity` gives the exact document-level figure).")


def _train_rows(cfg: dict[str, Any], res: dict[str, Any], start: str, data_line: str) -> list[tuple[str, str]]:
    resumed = f"; resumed from step {res['resumed_from_step']}" if res.get("resumed_from_step") else ""
    return [
        ("start", start),
        ("data", data_line),
        ("budget", f"{_fmt(res.get('steps'))} optimizer steps, {_fmt(res.get('tokens_seen'))} tokens seen"),
        ("batch", f"{cfg.get('per_device_train_batch_size')} x {cfg.get('gradient_accumulation_steps', 1)} "
                  f"(accumulation) x {res.get('processes', 1)} process(es) of "
                  f"{cfg.get('block_size') or 'model-context'} tokens"),
        ("optimizer", f"AdamW, weight decay {cfg.get('weight_decay')}, gradient clipping "
                      f"{cfg.get('max_grad_norm')}, min lr {cfg.get('min_lr')}, precision "
                      f"{res.get('mixed_precision')}"),
        ("seed", f"{cfg.get('seed')}{resumed}"),
    ]


def train_card(final_dir: Path, run_dir: Path) -> str:
    """The card of ``train``'s ``final/``, from ``final/train_config.yaml`` and the run's ``results.json``."""
    cfg = yaml.safe_load((final_dir / "train_config.yaml").read_text(encoding="utf-8")) or {}
    res = _read_json(run_dir / "results.json")
    scratch = bool(cfg.get("from_scratch"))
    start = cfg.get("model_config") if scratch else cfg.get("model")
    start_dir = Path(str(start)).expanduser() if start else None
    local = start_dir is not None and start_dir.is_dir()
    inherited = provenance(start_dir if local else None, None if local else start)
    base = None if scratch else (inherited.base_model if local else inherited.hub_id)
    if scratch:  # only the architecture (and tokenizer) came from there, not the weights or their license
        inherited.license = None
    transfer = _read_json(start_dir / "transfer_report.json") if local and start_dir else {}
    data_line, datasets = _data_description(cfg.get("data"))
    name = run_dir.name
    origin = _start_description(start, scratch, transfer)
    whence = (f"inherited from the card of `{start}`" if inherited.license else
              "trained from scratch: only the architecture came from there" if scratch else
              f"the card of `{start}` names none" if local else f"the card of the hub model `{start}` was not read")
    body = f"""
# {name}

A causal language model{_for_language(inherited.language)}, trained with clp-transfer's
`train`{': ' if scratch else ' (continued pretraining) from '}{origin}.

## Training

{_table(_train_rows(cfg, res, origin, data_line))}

| phase | steps | trains | peak lr | batch | schedule |
|---|---:|---|---:|---:|---|
{_phase_rows(res.get('phases') or [], cfg)}

Full record: `train_config.yaml` here, `results.json` and `logs/train_log.jsonl` in the run directory.

## Measurements

{_final_eval_text(res.get('final_eval') or {})}

## License and language

{_license_note(inherited.license, whence)}
The training data's own terms may apply as well.
{_language_note(inherited.language, f"the card of `{start}` names none")}
{_loading(name + '/final')}"""
    tags = list(dict.fromkeys([TAG, "continued-pretraining", *inherited.tags]))
    return _render({"language": inherited.language, "license": inherited.license, "library_name": "transformers",
                    "pipeline_tag": "text-generation", "base_model": base, "datasets": datasets, "tags": tags},
                   body)


def helper_card(directory: Path) -> str:
    """The card of a ``helper`` output, from its ``helper_report.json``."""
    r = _read_json(directory / "helper_report.json")
    cfg, data, tok, model, t = r["config"], r["data"], r["tokenizer"], r["model"], r["training"]
    language = _as_list(cfg.get("language"))
    name = final_name(directory)
    bpb = t["final_loss"] / math.log(2) / data["bytes_per_token"] if data.get("bytes_per_token") else float("nan")
    rows = [
        ("data", f"{_fmt(data['documents'])} documents, {_size(data['bytes'])} of text from "
                 f"{len(data.get('files') or [])} file(s)"),
        ("tokenizer", f"{tok['kind']}, {_fmt(tok['vocab_size'])} tokens, trained on the same text "
                      f"({data['bytes_per_token']} bytes per token)"),
        ("model", f"{model['architecture']}, {_fmt(model['parameters'])} parameters "
                  f"({_fmt(model['non_embedding_parameters'])} outside the embeddings), hidden size "
                  f"{cfg.get('hidden_size')}, {cfg.get('num_layers')} layers, context {cfg.get('block_size')}"),
        ("training", f"{_fmt(t['steps'])} steps, {_fmt(t['tokens'])} tokens ({t['epochs']} epochs), batch "
                     f"{cfg.get('batch_size')}, lr {cfg.get('learning_rate')}, {t['seconds']} s, stopped by "
                     f"{t['stopped_by']}"),
    ]
    body = f"""
# {name}

A small causal language model{_for_language(language)}, trained from scratch with clp-transfer's `helper` to
serve as the **helper** of a cross-lingual transfer (`clp-transfer transfer --helper {name}`): its tokenizer
becomes the target vocabulary and its embeddings measure the similarity of target tokens. It is not meant to
be used as a language model on its own.

## What was done

{_table(rows)}

## Measurements

Final training loss {t['final_loss']} nats per token (mean of the last {t['final_loss_window_steps']} steps),
i.e. {_fmt(bpb)} bits per byte **of its training text** (not held out). Held-out bits per byte:
`clp-transfer perplexity --model {name} --text_files heldout.txt`.

## License and language

{_license_note(None, "a model trained from scratch on your text", "the text's terms")}
{_language_note(language, "`clp-transfer helper --language CODE` records it")}
{_loading(name)}"""
    return _render({"language": language, "library_name": "transformers", "pipeline_tag": "text-generation",
                    "tags": [TAG, "clp-transfer-helper"]}, body)


def write_model_card(directory: str | Path, kind: str, builder: Callable[..., str] | None = None,
                     **facts: Any) -> Path | None:
    """Write ``README.md`` (a hub model card) into a model directory the tool has written.

    ``kind`` is ``"transfer"`` (``facts``: ``source_dir``, ``helper_dir``), ``"train"`` (``run_dir``) or
    ``"helper"``; a stage with a card of its own passes its ``builder(directory, **facts) -> str`` (extend mode
    does, so this shared module never imports a stage). A card that cannot be built is logged and skipped: the model and its JSON records are
    what matters, and they are already written.
    """
    directory = Path(directory)
    builder = builder or {"transfer": transfer_card, "train": train_card, "helper": helper_card}[kind]
    try:
        text = builder(directory, **facts)
    except Exception as e:
        log.warning("could not write the model card of %s: %s: %s", directory, type(e).__name__, e)
        return None
    path = directory / CARD_NAME
    atomic_write_text(path, text)
    return path
