"""Models: finding, checking and loading them safely, and the facts about them every stage needs.

Every model a stage reads is turned into a local Hugging Face directory with safetensors weights (local
directory, hub id or ``.gguf`` file; a GGUF file is dequantised once and cached; a pickle checkpoint is
converted only when the user allows pickle). The transfer then reads the embedding matrices tensor by tensor,
without instantiating the model.

For scoring (``perplexity``, ``evaluate``, the demo and the trainer's evaluations) :func:`load_for_eval` adds a
clear error when the tokenizer is missing, the device and dtype rule (float32 on CPU, bfloat16 on CUDA GPUs
that support it), and the ids of the tokens a transfer created (``transfer_report.json``) so that losses can
be split by token class. Model facts: :func:`context_length`, :func:`is_tied`, :func:`find_embedding_keys`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from .atomic import atomic_directory
from .errors import ClpError

log = logging.getLogger(__name__)

WEIGHTS_INDEX = "model.safetensors.index.json"
WEIGHTS = "model.safetensors"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_dir() -> Path:
    """Where converted models are cached (``$CLP_TRANSFER_CACHE`` or ``~/.cache/clp-transfer``)."""
    return Path(os.environ.get("CLP_TRANSFER_CACHE", Path.home() / ".cache" / "clp-transfer"))


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that support it, fp32 elsewhere (bf16 autocast is slow on most CPUs)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


@dataclass
class ModelFiles:
    """A local HF model directory whose weights are safetensors."""

    path: Path
    """The directory (config.json, tokenizer files, *.safetensors)."""
    origin: str
    """What the user named (path, hub id or .gguf file)."""
    kind: str
    """'safetensors', 'gguf' (converted) or 'pickle' (converted, only with allow_pickle)."""


def _has_safetensors(d: Path) -> bool:
    return (d / WEIGHTS).is_file() or (d / WEIGHTS_INDEX).is_file()


def _pickle_files(d: Path) -> list[Path]:
    return sorted(list(d.glob("pytorch_model*.bin")) + list(d.glob("*.pt")) + list(d.glob("*.pth")))


def resolve_model(
    name_or_path: str | os.PathLike,
    what: str = "model",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> ModelFiles:
    """Turn what the user named into a local safetensors directory, or fail with a clear message."""
    name = str(name_or_path)
    p = Path(name).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return ModelFiles(gguf_to_hf(p, trust_remote_code=trust_remote_code), name, "gguf")
    if p.is_file():
        raise ClpError(f"{what} {name!r} is a file; give a model directory or a .gguf file")
    if p.is_dir():
        if not (p / "config.json").is_file():
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelFiles(gguf_to_hf(ggufs[0], trust_remote_code=trust_remote_code), name, "gguf")
            raise ClpError(f"{what} directory {name!r} has no config.json: not a Hugging Face model directory")
        if _has_safetensors(p):
            return ModelFiles(p, name, "safetensors")
        pickles = _pickle_files(p)
        if pickles:
            if not allow_pickle:
                raise ClpError(
                    f"{what} {name!r} only has pickle weights ({pickles[0].name}); loading pickle can run "
                    "arbitrary code. Convert it to safetensors, or pass --allow-pickle if you trust the file"
                )
            return ModelFiles(pickle_to_safetensors(p, trust_remote_code), name, "pickle")
        raise ClpError(f"{what} directory {name!r} holds no weights (no *.safetensors)")
    if _HUB_ID.match(name) and not name.startswith((".", "/", "~")):
        return ModelFiles(download_from_hub(name, what), name, "safetensors")
    raise ClpError(f"{what} {name!r} does not exist")


def download_from_hub(repo_id: str, what: str = "model") -> Path:
    """Fetch config, tokenizer and safetensors weights of a hub model (never pickle files)."""
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            repo_id,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "tokenizer*", "README.md"],
        )
    except Exception as e:  # offline, unknown repo, gated model, ...
        raise ClpError(
            f"{what} {repo_id!r} is not a local path and could not be fetched from the Hugging Face hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Download it first and pass "
            "the local directory"
        ) from None
    d = Path(local)
    if not _has_safetensors(d):
        raise ClpError(f"{what} {repo_id!r} has no safetensors weights on the hub; convert it first")
    return d


def _cache_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]


def gguf_to_hf(gguf_path: str | os.PathLike, output_dir: str | os.PathLike | None = None,
               trust_remote_code: bool = False) -> Path:
    """Dequantise a GGUF file into a float32 safetensors HF directory (cached; needs the ``gguf`` package)."""
    gguf_path = Path(gguf_path)
    out = Path(output_dir) if output_dir else cache_dir() / "gguf" / f"{gguf_path.stem}-{_cache_key(gguf_path)}"
    if _has_safetensors(out) and (out / "config.json").is_file():
        return out
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ClpError("reading .gguf files needs the 'gguf' package: pip install 'clp-transfer[gguf]'") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantising %s (once; cached in %s)", gguf_path, out)
    kw = dict(gguf_file=gguf_path.name, trust_remote_code=trust_remote_code)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kw)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
    except Exception as e:
        raise ClpError(f"could not read GGUF file {str(gguf_path)!r}: {e}") from e
    # The config of a GGUF load remembers the quantisation; rebuild a plain model so it saves as safetensors.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=False)
    plain.tie_weights()
    del loaded
    with atomic_directory(out, overwrite=True, wait=True) as tmp:  # a shared cache: wait for another writer
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def pickle_to_safetensors(model_dir: Path, trust_remote_code: bool = False) -> Path:
    """Convert a pickle checkpoint the user allowed into a cached safetensors directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = _cache_key(_pickle_files(model_dir)[0])
    out = cache_dir() / "converted" / f"{model_dir.name}-{key}"
    if _has_safetensors(out):
        return out
    log.warning("loading pickle weights from %s because --allow-pickle was given", model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, use_safetensors=False, trust_remote_code=trust_remote_code
    )
    with atomic_directory(out, overwrite=True, wait=True) as tmp:  # a shared cache: wait for another writer
        model.save_pretrained(tmp)
        with contextlib.suppress(Exception):
            AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code).save_pretrained(tmp)
        for f in ("generation_config.json",):
            if (model_dir / f).is_file() and not (tmp / f).is_file():
                (tmp / f).write_bytes((model_dir / f).read_bytes())
    return out


def remote_code_message(what: str, path: str | os.PathLike) -> str:
    """The one line for a model or tokenizer that only loads with code from its own repository."""
    return (f"{what} {str(path)!r} needs to run code from its own repository (custom architecture or "
            "tokenizer); pass --trust_remote_code if you trust that code")


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """Why a .safetensors file is unusable (truncated, corrupt header), or None when its structure is sound.

    Reads only the header: the file must be exactly 8 + header length + the end of the last tensor's data.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{size} bytes, shorter than a safetensors header"
            n = int.from_bytes(head, "little")
            if n <= 0 or 8 + n > size:
                return f"truncated: the header claims {n} bytes but the file has {size}"
            header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError):
        return "the header is not valid JSON (corrupt file)"
    ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        return f"truncated: {size} of {expected} bytes"
    if size > expected:
        return f"{size - expected} unexpected trailing bytes (corrupt file)"
    return None


def check_safetensors(path: str | os.PathLike, what: str = "weights file") -> None:
    """Raise :class:`ClpError` naming ``path`` when :func:`safetensors_problem` finds one."""
    problem = safetensors_problem(path)
    if problem:
        raise ClpError(f"{what} {str(path)!r} is unusable ({problem}); restore or re-create it")


class SafetensorsCheckpoint:
    """Tensor-by-tensor access to the safetensors weights of a model directory."""

    def __init__(self, path: str | os.PathLike) -> None:
        from safetensors import safe_open

        self._safe_open = safe_open
        self.path = Path(path)
        if (self.path / WEIGHTS_INDEX).is_file():
            try:
                index = json.loads((self.path / WEIGHTS_INDEX).read_text())
            except ValueError as e:
                raise ClpError(f"{str(self.path / WEIGHTS_INDEX)!r} is not valid JSON ({e}); restore it") from None
            self.weight_map: dict[str, str] = index["weight_map"]
            self.metadata = index.get("metadata", {})
        elif (self.path / WEIGHTS).is_file():
            check_safetensors(self.path / WEIGHTS)
            with safe_open(self.path / WEIGHTS, "pt") as f:
                self.weight_map = {k: WEIGHTS for k in f.keys()}
            self.metadata = {}
        else:
            raise ClpError(f"no safetensors weights in {str(self.path)!r}")
        for file in self.files:  # fail before any work on a truncated or corrupt shard (headers only)
            if not (self.path / file).is_file():
                raise ClpError(f"weights file {str(self.path / file)!r} listed in the index is missing")
            check_safetensors(self.path / file)

    def keys(self) -> list[str]:
        return list(self.weight_map)

    @property
    def files(self) -> list[str]:
        return list(dict.fromkeys(self.weight_map.values()))

    def get(self, key: str) -> torch.Tensor:
        with self._safe_open(self.path / self.weight_map[key], "pt") as f:
            return f.get_tensor(key)

    def shapes(self) -> dict[str, list[int]]:
        """Shape of every tensor, read from the file headers only."""
        out: dict[str, list[int]] = {}
        for file in self.files:
            with self._safe_open(self.path / file, "pt") as f:
                for k in f.keys():
                    out[k] = list(f.get_slice(k).get_shape())
        return out

    def iter_file(self, file: str) -> Iterator[tuple[str, torch.Tensor]]:
        with self._safe_open(self.path / file, "pt") as f:
            for k in f.keys():
                yield k, f.get_tensor(k)

    def file_metadata(self, file: str) -> dict[str, str]:
        with self._safe_open(self.path / file, "pt") as f:
            return f.metadata() or {}


@dataclass
class EmbeddingKeys:
    """Where a checkpoint keeps its vocabulary-sized tensors."""

    input: str
    """Key of the input embedding matrix."""
    output: str | None
    """Key of the output head when the checkpoint stores one apart from the input embeddings, else None.
    A tied model may still store a copy of it; that copy is rewritten too."""
    tied: bool
    """Whether the model ties its output head to the input embeddings."""
    output_bias: str | None = None
    """Key of the output head's bias, for the few models that have one."""


def _match_key(param_name: str, keys: list[str]) -> str | None:
    if param_name in keys:
        return param_name
    # Checkpoints may omit or add the base-model prefix (e.g. 'transformer.wte.weight' vs 'wte.weight').
    parts = param_name.split(".")
    for i in range(1, len(parts)):
        suffix = ".".join(parts[i:])
        hits = [k for k in keys if k == suffix or k.endswith("." + suffix)]
        if len(hits) == 1:
            return hits[0]
    return None


def is_tied(config: Any) -> bool:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False)))


# Families whose facts the transfer reads from config.json and the checkpoint's key names alone, without
# importing and building the model class (~1.5 s of a transfer's fixed cost): model_type -> (input embedding
# parameter, output head parameter, context-length key), as the model classes name them. A test checks the
# table against the classes; any other model, or a config these facts might not cover, takes the general path.
KNOWN_FAMILIES: dict[str, tuple[str, str, str]] = {
    "llama": ("model.embed_tokens.weight", "lm_head.weight", "max_position_embeddings"),
    "mistral": ("model.embed_tokens.weight", "lm_head.weight", "max_position_embeddings"),
    "qwen2": ("model.embed_tokens.weight", "lm_head.weight", "max_position_embeddings"),
    "qwen3": ("model.embed_tokens.weight", "lm_head.weight", "max_position_embeddings"),
    "gpt2": ("transformer.wte.weight", "lm_head.weight", "n_positions"),
    "gpt_neox": ("gpt_neox.embed_in.weight", "embed_out.weight", "max_position_embeddings"),
}


PLAIN_TOKENIZER_FAMILIES = ("llama", "mistral", "qwen3", "gpt2", "gpt_neox")
"""The :data:`KNOWN_FAMILIES` for which ``AutoTokenizer`` keeps a tokenizer_config.json's
``TokenizersBackend`` (not qwen2: transformers overrides its hub class); a test checks it against transformers."""


def plain_config(model_dir: str | os.PathLike) -> dict[str, Any] | None:
    """``config.json`` of ``model_dir`` as a dict when it is a :data:`KNOWN_FAMILIES` model whose facts it
    states outright (tie_word_embeddings given; no remote code, no nested text config), else None."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (not isinstance(cfg, dict) or cfg.get("model_type") not in KNOWN_FAMILIES or "auto_map" in cfg
            or "text_config" in cfg or not isinstance(cfg.get("tie_word_embeddings"), bool)):
        return None
    return cfg


def find_embedding_keys(model_dir: str | os.PathLike, checkpoint: SafetensorsCheckpoint | None = None,
                        trust_remote_code: bool = False) -> EmbeddingKeys:
    """Locate the embedding tensors: for :data:`KNOWN_FAMILIES` from the config and the parameter names
    alone, else by building the model on the meta device (costs no memory)."""
    ckpt = checkpoint or SafetensorsCheckpoint(model_dir)
    plain = plain_config(model_dir)
    if plain is not None:
        in_name, out_name, _ = KNOWN_FAMILIES[plain["model_type"]]
        return _embedding_keys(model_dir, ckpt, in_name, [out_name], None, plain["tie_word_embeddings"])
    in_name, out_names, bias_name, tied = _model_embedding_names(model_dir, trust_remote_code)
    return _embedding_keys(model_dir, ckpt, in_name, out_names, bias_name, tied)


def _model_embedding_names(model_dir: str | os.PathLike, trust_remote_code: bool):
    """(input embedding parameter, output head parameters, head bias parameter or None, tied) of the model
    class, built on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    try:
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ClpError(f"{str(model_dir)!r} is not a causal language model that transformers knows: {e}") from e
    named = list(model.named_parameters(remove_duplicate=False))
    in_weight = model.get_input_embeddings().weight
    in_name = next(n for n, p in named if p is in_weight)
    out_names, bias_name = None, None
    out_mod = model.get_output_embeddings()
    if out_mod is not None:
        out_names = [n for n, p in named if p is out_mod.weight and n != in_name]
        if getattr(out_mod, "bias", None) is not None:
            bias_name = next(n for n, p in named if p is out_mod.bias)
    return in_name, out_names, bias_name, is_tied(config)


def _embedding_keys(model_dir: str | os.PathLike, ckpt: SafetensorsCheckpoint, in_name: str,
                    out_names: list[str] | None, bias_name: str | None, tied: bool) -> EmbeddingKeys:
    """The checkpoint keys of the parameters ``in_name``, ``out_names`` (the head's names; the last one
    counts; None: the model has no output head module) and ``bias_name``."""
    keys = ckpt.keys()
    in_key = _match_key(in_name, keys)
    if in_key is None:
        raise ClpError(f"cannot find the input embeddings ({in_name}) in the checkpoint of {str(model_dir)!r}")
    out_key = bias_key = None
    if out_names is not None:
        out_key = _match_key(out_names[-1], keys) if out_names else None
        if out_key == in_key:
            out_key = None
        bias_key = _match_key(bias_name, keys) if bias_name else None
    if out_names is not None and out_key is None:
        # The checkpoint may spell the head differently from the module (transformers renames some
        # on load, e.g. GPT-NeoX 'embed_out' -> 'lm_head'): fall back to the one other matrix of the
        # embedding's shape.
        shapes = ckpt.shapes()
        same = [k for k, s in shapes.items() if k != in_key and s == shapes[in_key]]
        if len(same) == 1:
            out_key = same[0]
    if not tied and out_key is None:
        raise ClpError(f"untied model {str(model_dir)!r} has no output head in its checkpoint")
    return EmbeddingKeys(in_key, out_key, tied, bias_key)


def _plain_tokenizer_class(path: str | os.PathLike):
    """``TokenizersBackend`` when ``AutoTokenizer`` would pick it for the directory ``path`` anyway (its
    tokenizer_config.json names that class, with a tokenizer.json and no remote code, and config.json is a
    :data:`PLAIN_TOKENIZER_FAMILIES` model), else None. Loading it directly skips AutoTokenizer's config instantiation
    and its model-module imports (~1 s of a transfer's fixed cost); a test checks both give the same tokenizer."""
    p = Path(path)
    try:
        tok_cfg = json.loads((p / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (not isinstance(tok_cfg, dict) or tok_cfg.get("tokenizer_class") != "TokenizersBackend" or "auto_map" in tok_cfg
            or not (p / "tokenizer.json").is_file()):
        return None
    cfg = plain_config(p)
    if cfg is None or cfg["model_type"] not in PLAIN_TOKENIZER_FAMILIES:
        return None
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    return TokenizersBackend


def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False, what: str = "model"):
    try:
        plain = _plain_tokenizer_class(path)
        if plain is not None:
            return plain.from_pretrained(path)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:
        if "trust_remote_code" in str(e) and not trust_remote_code:
            raise ClpError(remote_code_message(what, path)) from e
        raise ClpError(f"cannot load a tokenizer for {what} from {str(path)!r}: {type(e).__name__}: {e}") from e


# ------------------------------------------------------------------------- loading for scoring

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
)
"""Any of these files in a directory means a tokenizer was saved there."""

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class LoadedModel:
    """A model ready for scoring, with the tokenizer that goes with it."""

    model: Any
    """The ``PreTrainedModel`` in eval mode."""
    tokenizer: Any
    """Its tokenizer."""
    name: str
    """What the user named (path, hub id, .gguf file)."""
    path: Path | None
    """Local safetensors directory the weights came from (None for a model passed in memory)."""


def parse_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None``/``"auto"`` -> float32 on CPU, bfloat16 on CUDA with bf16 support; else the named dtype."""
    if isinstance(name, torch.dtype):
        return name
    if name is None or name == "auto":
        return default_dtype(device)
    try:
        return _DTYPES[name]
    except KeyError:
        raise ClpError(f"unknown dtype {name!r}; use one of auto, {', '.join(_DTYPES)}") from None


def parse_device(name: str | torch.device | None) -> torch.device:
    if name is None or name == "auto":
        return default_device()
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise ClpError(f"unknown device {name!r}: {e}") from None


def has_tokenizer_files(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and any((p / f).is_file() for f in TOKENIZER_FILES)


def load_eval_tokenizer(model_dir: Path, tokenizer: str | None, name: str, trust_remote_code: bool = False):
    """The model's own tokenizer (or ``tokenizer`` when given); a missing one is a :class:`ClpError`."""
    where = Path(tokenizer) if tokenizer else model_dir
    if tokenizer is None and not has_tokenizer_files(model_dir):
        raise ClpError(
            f"model {name!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:3])}, ... in "
            f"{str(model_dir)!r}); save the tokenizer next to the model (tokenizer.save_pretrained(dir)) or "
            "pass --tokenizer DIR"
        )
    if tokenizer is not None and Path(tokenizer).exists() and not has_tokenizer_files(tokenizer):
        raise ClpError(f"--tokenizer {tokenizer!r} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)")
    return load_tokenizer(where, trust_remote_code, f"model {name!r}")


def load_for_eval(
    model: str | os.PathLike,
    tokenizer: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM for scoring: safetensors only (unless ``allow_pickle``), eval mode, on ``device``.

    The tokenizer is checked before the weights are read, so a directory without one fails fast.
    """
    from transformers import AutoModelForCausalLM

    name = str(model)
    files = resolve_model(name, "model", allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    tok = load_eval_tokenizer(files.path, tokenizer, name, trust_remote_code)
    dev = parse_device(device)
    dt = parse_dtype(dtype, dev)
    log.info("loading %s (%s) on %s as %s", name, files.kind, dev, str(dt).replace("torch.", ""))
    try:
        lm = AutoModelForCausalLM.from_pretrained(
            files.path, dtype=dt, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise ClpError(f"cannot load model {name!r} from {str(files.path)!r}: {e}") from e
    lm.to(dev).eval()
    return LoadedModel(lm, tok, name, files.path)


def model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        return torch.device("cpu")


_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def context_length(model: Any) -> int | None:
    """Longest input the model's position scheme allows, from its config (None when it does not say).

    ``model`` is a model or its config.
    """
    config = getattr(model, "config", model)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in _CONTEXT_KEYS:
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def plain_context_length(model_dir: str | os.PathLike) -> tuple[bool, int | None]:
    """(known, :func:`context_length` of the model's config) read from config.json alone when
    :func:`plain_config` accepts it and it states the family's context key and no other; (False, None)
    otherwise (then ask the config class: its defaults may fill in what the file leaves out)."""
    cfg = plain_config(model_dir)
    if cfg is None:
        return False, None
    key = KNOWN_FAMILIES[cfg["model_type"]][2]
    value = cfg.get(key)
    if [k for k in _CONTEXT_KEYS if k in cfg] != [key] or not isinstance(value, int) or isinstance(value, bool):
        return False, None
    return True, value if value > 0 else None


def read_new_token_ids(path: str | os.PathLike) -> list[int]:
    """Ids of the tokens a transfer created, from ``transfer_report.json`` or a JSON list of ids."""
    p = Path(path)
    if p.is_dir():
        p = p / "transfer_report.json"
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ClpError(f"new-token file {str(p)!r} does not exist") from None
    except json.JSONDecodeError as e:
        raise ClpError(f"new-token file {str(p)!r} is not JSON: {e}") from None
    ids = data.get("new_token_ids") if isinstance(data, dict) else data
    if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
        raise ClpError(
            f"{str(p)!r} must hold a JSON list of token ids or an object with 'new_token_ids' "
            "(as transfer_report.json does)"
        )
    return ids


def new_token_mask_from_ids(ids: list[int], vocab_rows: int) -> torch.Tensor:
    """Boolean mask over ``vocab_rows`` logits that is True at ``ids``."""
    mask = torch.zeros(vocab_rows, dtype=torch.bool)
    bad = [i for i in ids if not 0 <= i < vocab_rows]
    if bad:
        raise ClpError(f"new token ids {bad[:5]} are outside the model's {vocab_rows} vocabulary rows")
    if ids:
        mask[torch.tensor(ids, dtype=torch.long)] = True
    return mask


def prefix_rule(tokenizer: Any) -> tuple[int | None, bool]:
    """``(prefix_id, bos_every_window)`` for a tokenizer (see :mod:`clp_transfer.evaluate.perplexity`).

    The prefix is BOS, else EOS, else None (then each document's first token is context only). Windows all
    start with BOS when the tokenizer's own encoding prepends BOS, i.e. the model was trained that way.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    adds_bos = False
    if bos is not None:
        try:
            with_special = tokenizer("Hallo Welt", add_special_tokens=True)["input_ids"]
            plain = tokenizer("Hallo Welt", add_special_tokens=False)["input_ids"]
            adds_bos = bool(with_special) and with_special[0] == bos and plain[:1] != [bos]
        except Exception:  # pragma: no cover - exotic tokenizers
            adds_bos = bool(getattr(tokenizer, "add_bos_token", False))
    prefix = bos if bos is not None else eos
    return prefix, adds_bos and prefix is not None
