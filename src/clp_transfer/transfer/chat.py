"""Keeping an instruct model's chat through the transfer: its chat template and the control tokens it writes.

The target tokenizer is the helper's, which knows nothing of the source's chat format. When the source
tokenizer has a chat template, the transfer (unless told ``--no-chat``):

1. copies the template (every named template, when there are several) into the target tokenizer;
2. carries every control token the template writes literally (``<|im_start|>``, ``<|eot_id|>``, tool tags)
   and every end-of-sequence token of the source's ``config.json`` / ``generation_config.json``: each becomes
   a token of the target vocabulary (special when the source's is), with an id after the helper's
   vocabulary - inside the vocabulary padding when there is room - and the source's input row (and untied
   head row) copied exactly. A token the helper already has (same text) keeps its id and takes the row of
   the source's token of that text;
3. puts the carried end-of-sequence tokens into the ``eos_token_id`` lists of ``config.json`` and
   ``generation_config.json``, so ``generate`` stops at the end of a turn;
4. reports what was carried, from where, and warns about what cannot work: control-token-like strings the
   template writes that the source has no token for, template variables holding token ids (ids differ in
   the target vocabulary), role variables (``bos_token`` ...) that render a target token whose row is not
   the source's token of that role.

A source without a chat template is a base model: nothing here changes its transfer.
Planning (:func:`plan_chat`) is pure Python on vocabularies; the other functions apply a plan to the
embedding matrices, the tokenizer and the config files.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ClpError
from .tokens import SPECIAL_ROLES, TokenMatch, VocabInfo

log = logging.getLogger(__name__)

# Strings that look like control tokens in chat templates: <|im_start|>, <|eot_id|> (ChatML, Llama 3),
# <start_of_turn> / <tool_call_x> style tags with an underscore, [INST] / [AVAILABLE_TOOLS] (Mistral).
CONTROL_LIKE = re.compile(r"<\|[^\s<>|]{1,80}\|>|</?[A-Za-z]+(?:_[A-Za-z0-9]+)+>|\[/?[A-Z][A-Z_]{2,}\]")
_ID_NAME = re.compile(r"token_ids?$")
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
ROLE_VARIABLES = tuple(f"{role}_token" for role in SPECIAL_ROLES)


@dataclass
class CarriedToken:
    """A control token of the source that the target tokenizer gets, with the source's rows."""

    text: str
    """Its spelling (the same in source and target)."""
    source_id: int
    """Id in the source vocabulary: the rows copied."""
    target_id: int
    """Id in the target vocabulary."""
    new: bool
    """True when added to the helper's vocabulary; False when the helper already had a token of this text."""
    special: bool
    """Whether it is a special token (the source's flag; decoding with skip_special_tokens drops it)."""
    sources: list[str] = field(default_factory=list)
    """Why it is carried: 'chat_template', 'config.eos_token_id', 'generation_config.eos_token_id'."""
    end_of_turn: bool = False
    """Generation stops at it (it is one of the source's end-of-sequence ids)."""
    spelling: dict[str, bool] = field(default_factory=dict)
    """The source's added-token flags (lstrip, rstrip, single_word, normalized), kept in the target."""


@dataclass
class ChatPlan:
    """What the transfer does about the source's chat; empty for a base model or with ``--no-chat``."""

    template: str | dict[str, str] | None = None
    """The source's chat template (a name -> template mapping when it has several), or None."""
    tokens: list[CarriedToken] = field(default_factory=list)
    """Control tokens carried into the target vocabulary, in target-id order of the new ones."""
    eos_token_ids: list[int] = field(default_factory=list)
    """Target ids ``generate`` stops at: the target's own eos first, then the carried end-of-turn tokens."""
    template_variables: dict[str, Any] = field(default_factory=dict)
    """Role variables the template uses (bos_token, ...) -> what they render in the target."""
    warnings: list[str] = field(default_factory=list)
    """Problems the user should know about (also logged)."""
    dropped: bool = False
    """The source has a chat template but ``--no-chat`` dropped it."""

    @property
    def new_tokens(self) -> list[CarriedToken]:
        return [t for t in self.tokens if t.new]

    @property
    def row_sources(self) -> dict[int, int]:
        """Target id -> source id whose rows it takes, for every carried token."""
        return {t.target_id: t.source_id for t in self.tokens}

    def report(self) -> dict[str, Any]:
        """The ``chat`` section of ``transfer_report.json``."""
        names = sorted(self.template) if isinstance(self.template, dict) else (["default"] if self.template else [])
        return {
            "template_carried": self.template is not None,
            "templates": names,
            "dropped": self.dropped,
            "tokens": [{"token": t.text, "source_id": t.source_id, "target_id": t.target_id, "new": t.new,
                        "special": t.special, "from": t.sources, "end_of_turn": t.end_of_turn} for t in self.tokens],
            "eos_token_id": self.eos_token_ids,
            "template_variables": self.template_variables,
            "warnings": self.warnings,
        }


def template_texts(template: Any) -> dict[str, str]:
    """A tokenizer's ``chat_template`` (None, a string, a name -> string mapping, or the older list of
    ``{"name", "template"}`` entries) as a name -> template text mapping."""
    if not template:
        return {}
    if isinstance(template, str):
        return {"default": template}
    if isinstance(template, dict):
        return {str(k): str(v) for k, v in template.items()}
    if isinstance(template, list):
        return {str(t["name"]): str(t["template"]) for t in template if isinstance(t, dict) and "template" in t}
    raise ClpError(f"the source tokenizer's chat_template has an unknown form ({type(template).__name__})")


def _candidates(tokenizer: Any, vocab: VocabInfo) -> dict[str, int]:
    """Source tokens a template can write as one token: added tokens and special tokens, not byte pieces."""
    ids = set(vocab.special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return {vocab.tokens[i]: i for i in sorted(ids)
            if i < len(vocab) and vocab.tokens[i] and not _BYTE_TOKEN.match(vocab.tokens[i])}


def tokens_in_template(text: str, candidates: dict[str, int]) -> tuple[list[str], str]:
    """The candidate token strings that ``text`` contains, and ``text`` with them cut out.

    Longer tokens are looked for first and removed, so a token inside a longer one is not found twice.
    """
    found = []
    for tok in sorted(candidates, key=len, reverse=True):
        if tok in text:
            found.append(tok)
            text = text.replace(tok, "\x00")
    return found, text


def _template_names(text: str) -> tuple[set[str], set[str]]:
    """(undeclared variable names, every variable / attribute / key name) the template refers to."""
    import jinja2
    from jinja2 import meta, nodes

    try:
        ast = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(text)
    except jinja2.TemplateSyntaxError:  # extensions of transformers' own ({% generation %}): scan the text
        names = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text))
        return names, names
    every: set[str] = set()
    for node in ast.find_all((nodes.Name, nodes.Getattr, nodes.Getitem)):
        if isinstance(node, nodes.Name):
            every.add(node.name)
        elif isinstance(node, nodes.Getattr):
            every.add(node.attr)
        elif isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
            every.add(node.arg.value)
    return set(meta.find_undeclared_variables(ast)), every


def source_eos_ids(source_dir: Path) -> dict[int, list[str]]:
    """End-of-sequence ids of the source's ``config.json`` and ``generation_config.json`` -> where each is."""
    out: dict[int, list[str]] = {}
    for name in ("config.json", "generation_config.json"):
        path = source_dir / name
        if not path.is_file():
            continue
        value = json.loads(path.read_text()).get("eos_token_id")
        for i in value if isinstance(value, list) else ([] if value is None else [value]):
            out.setdefault(int(i), []).append(f"{path.stem}.eos_token_id")
    return out


def _template_warnings(name: str, text: str, rest: str, candidates: dict[str, int]) -> tuple[list[str], set[str]]:
    """Warnings about one template (``rest``: its text with the carried tokens cut out) and the role
    variables it uses."""
    label = "the chat template" if name == "default" else f"chat template {name!r}"
    warnings = []
    lacking = sorted({m for m in CONTROL_LIKE.findall(rest) if m not in candidates})
    if lacking:
        warnings.append(f"{label} writes {', '.join(map(repr, lacking))}, which the source tokenizer has no "
                        "token for: nothing to carry, source and target spell it with ordinary pieces")
    undeclared, every = _template_names(text)
    by_id = sorted(n for n in every if _ID_NAME.search(n))
    if by_id:
        warnings.append(f"{label} refers to token ids ({', '.join(by_id)}): the target vocabulary numbers "
                        "tokens differently, so check what it renders")
    return warnings, undeclared & set(ROLE_VARIABLES)


def _role_variables(used: set[str], source: VocabInfo, target: VocabInfo, rows_of: dict[int, int]
                    ) -> tuple[dict[str, Any], list[str]]:
    """What each role variable of the template (``bos_token`` ...) renders in the target, and warnings.

    ``rows_of`` maps target id -> source id whose rows it has (the matching, with carried tokens applied).
    """
    out: dict[str, Any] = {}
    warnings = []
    for var in sorted(used):
        role = var[: -len("_token")]
        tid = target.roles.get(role)
        if tid is None:
            out[var] = None
            warnings.append(f"the chat template uses {var} but the target tokenizer has no {role} token: it "
                            "renders as nothing")
            continue
        row = rows_of.get(tid, -1)
        expected = source.roles.get(role)
        out[var] = {"target_token": target.tokens[tid], "target_id": tid,
                    "rows_from_source_token": source.tokens[row] if row >= 0 else None}
        if expected is not None and row != expected:
            got = repr(source.tokens[row]) if row >= 0 else "a new row"
            warnings.append(f"the chat template uses {var}, which renders the target's {target.tokens[tid]!r}; "
                            f"its rows are those of the source's {got}, not of the source's {role} token "
                            f"{source.tokens[expected]!r}")
    return out, warnings


def plan_chat(source_tokenizer: Any, source: VocabInfo, target_tokenizer: Any, target: VocabInfo,
              match: TokenMatch, source_dir: Path, enabled: bool = True) -> ChatPlan:
    """Decide which template and control tokens the target gets, their target ids, and the warnings.

    New tokens get ids ``len(target)``, ``len(target) + 1``, ... in source-id order; a token the target
    vocabulary already spells the same keeps its id. Nothing is changed here.
    """
    texts = template_texts(getattr(source_tokenizer, "chat_template", None))
    if not texts:
        return ChatPlan()  # a base model: its transfer is what it always was
    if not enabled:
        return ChatPlan(dropped=True)
    template = next(iter(texts.values())) if isinstance(source_tokenizer.chat_template, str) else dict(texts)
    plan = ChatPlan(template=template)
    candidates = _candidates(source_tokenizer, source)
    wanted: dict[int, list[str]] = {}  # source id -> why it is carried
    used_roles: set[str] = set()
    for name, text in texts.items():
        found, rest = tokens_in_template(text, candidates)
        for tok in found:
            wanted.setdefault(candidates[tok], ["chat_template"])
        warnings, roles = _template_warnings(name, text, rest, candidates)
        plan.warnings += warnings
        used_roles |= roles
    end_of_turn: set[int] = set()
    for sid, where in source_eos_ids(source_dir).items():
        if not 0 <= sid < len(source) or source.tokens[sid] is None:
            plan.warnings.append(f"the source's {' and '.join(where)} names id {sid}, which no source token has")
        elif sid in wanted:
            wanted[sid] += where
            end_of_turn.add(sid)
        elif sid == source.roles.get("eos") and "eos" in target.roles:
            continue  # the target's own eos has this token's rows (matched by role) and stops generation
        elif source.tokens[sid] in candidates:
            wanted[sid] = list(where)
            end_of_turn.add(sid)
        else:
            plan.warnings.append(f"the source's {' and '.join(where)} names {source.tokens[sid]!r}, an ordinary "
                                 "token: not carried as a control token")
    plan.tokens = _assign_ids(wanted, end_of_turn, source_tokenizer, source, target_tokenizer, target)
    plan.eos_token_ids = list(dict.fromkeys(
        ([target.roles["eos"]] if "eos" in target.roles else []) + [t.target_id for t in plan.tokens if t.end_of_turn]))
    if plan.tokens and not end_of_turn and "eos_token" not in used_roles:
        plan.warnings.append("none of the control tokens the chat template writes is an end-of-sequence id of "
                             "the source's config or generation config: as with the source, generate does not "
                             "stop at the end of a turn, only at the eos")
    rows_of = {i: s for i, s in enumerate(match.source_id)} | plan.row_sources
    plan.template_variables, warnings = _role_variables(used_roles, source, target, rows_of)
    plan.warnings += warnings
    return plan


def _assign_ids(wanted: dict[int, list[str]], end_of_turn: set[int], source_tokenizer: Any, source: VocabInfo,
                target_tokenizer: Any, target: VocabInfo) -> list[CarriedToken]:
    """Target ids of the carried tokens: the target's own id for a token it already has, else the next free
    id after the target vocabulary."""
    target_ids = target_tokenizer.get_vocab()
    added = getattr(source_tokenizer, "added_tokens_decoder", {}) or {}
    next_id = len(target)
    out = []
    for sid in sorted(wanted):
        text = source.tokens[sid]
        assert text is not None
        a = added.get(sid)
        spelling = {k: bool(getattr(a, k)) for k in ("lstrip", "rstrip", "single_word", "normalized")
                    if a is not None and hasattr(a, k)}
        special = sid in source.special_ids or bool(getattr(a, "special", False))
        if text in target_ids:
            tid, new = int(target_ids[text]), False
        else:
            tid, new = next_id, True
            next_id += 1
        out.append(CarriedToken(text, sid, tid, new, special, wanted[sid], sid in end_of_turn, spelling))
    return out


# ------------------------------------------------------------------------------------- applying a plan


def set_chat_rows(plan: ChatPlan, input_rows: torch.Tensor, output_rows: torch.Tensor | None,
                  source_input: torch.Tensor, source_output: torch.Tensor | None) -> None:
    """Give every carried token the source's rows, in place: ``input_rows`` [R, d] from ``source_input``
    [V_s, d], and an untied head ``output_rows`` [R, d] from ``source_output`` [V_s, d]."""
    for t in plan.tokens:
        if t.target_id >= input_rows.shape[0]:
            raise ClpError(f"internal: carried token {t.text!r} has id {t.target_id} past the "
                           f"{input_rows.shape[0]} target rows")
        input_rows[t.target_id] = source_input[t.source_id].to(input_rows.dtype)
        if output_rows is not None and source_output is not None:
            output_rows[t.target_id] = source_output[t.source_id].to(output_rows.dtype)


def apply_chat_tokenizer(tokenizer: Any, plan: ChatPlan) -> None:
    """Add the carried tokens to the target tokenizer (in id order, so new ones get their planned ids) and
    set the chat template; fail if a token does not end up as exactly its planned id."""
    from tokenizers import AddedToken

    for t in sorted(plan.tokens, key=lambda t: t.target_id):
        flags = {k: v for k, v in t.spelling.items() if k in ("lstrip", "rstrip", "single_word")}
        token = AddedToken(t.text, special=t.special, normalized=t.spelling.get("normalized", False) and not t.special,
                           **flags)
        if t.special:
            tokenizer.add_special_tokens({"extra_special_tokens": [token]}, replace_extra_special_tokens=False)
        else:
            tokenizer.add_tokens([token])
    if plan.template is not None:
        tokenizer.chat_template = plan.template
    for t in plan.tokens:
        ids = tokenizer(t.text, add_special_tokens=False)["input_ids"]
        if ids != [t.target_id]:
            raise ClpError(f"internal: control token {t.text!r} encodes to {ids} in the target tokenizer, "
                           f"not to its planned id [{t.target_id}]; rerun with --no-chat to skip the chat part")
    if plan.template is not None:
        try:
            tokenizer.apply_chat_template([{"role": "user", "content": "Hallo"}], tokenize=False,
                                          add_generation_prompt=True)
        except Exception as e:  # a template that needs more than one user turn, or kwargs of its own
            plan.warnings.append(f"the carried chat template does not render a one-message conversation "
                                 f"({type(e).__name__}: {e})")


def update_chat_configs(out_dir: Path, plan: ChatPlan) -> None:
    """Write the end-of-turn ids into the ``eos_token_id`` of ``config.json`` and ``generation_config.json``
    (created from the config's bos/eos/pad ids when the source had none), so ``generate`` stops there."""
    if not any(t.end_of_turn for t in plan.tokens):
        return
    value: int | list[int] = plan.eos_token_ids[0] if len(plan.eos_token_ids) == 1 else list(plan.eos_token_ids)
    cfg_path, gen_path = out_dir / "config.json", out_dir / "generation_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["eos_token_id"] = value
    if isinstance(cfg.get("text_config"), dict) and "eos_token_id" in cfg["text_config"]:
        cfg["text_config"] = {**cfg["text_config"], "eos_token_id": value}
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {
        k: cfg.get(k) for k in ("bos_token_id", "pad_token_id") if cfg.get(k) is not None}
    gen["eos_token_id"] = value
    gen_path.write_text(json.dumps(gen, indent=2) + "\n")


def summary(report: dict[str, Any] | None) -> str:
    """One sentence on the report's ``chat`` section for the transfer's log summary ('' for a base model)."""
    if not report:
        return ""
    if report["dropped"]:
        return " Chat: the source's template was dropped (--no-chat)."
    if not report["template_carried"]:
        return ""
    toks = ", ".join(t["token"] for t in report["tokens"]) or "none"
    n_warn = len(report["warnings"])
    return (f" Chat: template carried with {len(report['tokens'])} control tokens ({toks}); generation stops at "
            f"ids {report['eos_token_id']}" + (f"; {n_warn} warnings in the report." if n_warn else "."))
