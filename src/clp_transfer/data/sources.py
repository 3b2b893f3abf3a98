"""Where ``prepare`` reads documents from: local files or a dataset hub, streamed one document at a time.

Local files (one format per file, chosen by suffix; an outer ``.gz``, ``.bz2``, ``.xz`` or ``.zst`` suffix is
decompressed on the fly):

- ``.txt`` / ``.text``: ``txt_format="lines"`` (default) makes every line a document; ``"paragraphs"`` makes
  every run of non-blank lines a document (documents separated by one or more blank lines, inner newlines
  kept). A UTF-8 byte order mark at the start of a file is dropped.
- ``.jsonl`` / ``.ndjson``: one JSON object per line, text in ``text_column``.
- ``.json``: a JSON array of objects (read whole: use JSON lines for big files) or JSON lines.
- ``.parquet``: read in record batches, only ``text_column``.

Directories are searched recursively for these suffixes (hidden names skipped); directories and glob patterns
expand in sorted path order; explicit files keep the order given. A file named twice is read once.

Hub datasets go through ``datasets.load_dataset(name, config, split=..., streaming=True)``: nothing is
downloaded in full, and reading stops as soon as the subsample is complete.

Every source yields ``(text, utf8_byte_count)``. Documents that are empty or whitespace only are skipped and
counted; so are documents that are not valid UTF-8 (or hold lone surrogates) and JSON lines that do not parse,
unless ``strict``, which turns them into errors.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import io
import json
import logging
import lzma
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator
from urllib.parse import urlparse

from ..errors import ClpError

log = logging.getLogger(__name__)

FORMATS: dict[str, str] = {
    ".txt": "txt", ".text": "txt",
    ".jsonl": "jsonl", ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".zstd")
READ_BUFFER = 1 << 20

Doc = tuple[str, int]


@dataclass
class SkipCounts:
    """Documents read from the source but not used."""

    empty: int = 0
    """Empty or whitespace-only documents (and blank lines in line-per-document text)."""
    invalid_utf8: int = 0
    """Documents whose bytes are not valid UTF-8 (or whose JSON holds lone surrogates)."""
    malformed: int = 0
    """JSON lines that do not parse or are not objects."""

    def as_dict(self) -> dict[str, int]:
        return {"empty": self.empty, "invalid_utf8": self.invalid_utf8, "malformed": self.malformed}


def file_format(path: str | os.PathLike) -> tuple[str, str | None] | None:
    """``(format, compression)`` from the file name, or None when the suffix is not supported."""
    name = Path(path).name.lower()
    compression = None
    for c in COMPRESSIONS:
        if name.endswith(c):
            compression, name = c, name[: -len(c)]
            break
    fmt = FORMATS.get(Path(name).suffix)
    return (fmt, compression) if fmt else None


def _supported_list() -> str:
    return ", ".join(sorted(FORMATS)) + f" (optionally {'/'.join(COMPRESSIONS[:4])})"


def _walk(directory: Path) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(directory, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in files:
            if not f.startswith(".") and file_format(f):
                found.append(Path(root) / f)
    return sorted(found)


def resolve_files(specs: list[str]) -> list[Path]:
    """Expand files, directories and glob patterns into an ordered list of supported files (no duplicates)."""
    if not specs:
        raise ClpError("no input: pass --files PATH... or --dataset_name NAME")
    out: list[Path] = []
    seen: set[Path] = set()
    for spec in specs:
        p = Path(spec).expanduser()
        if p.is_dir():
            files = _walk(p)
            if not files:
                raise ClpError(f"directory {spec!r} holds no supported files ({_supported_list()})")
        elif p.is_file():
            if not file_format(p):
                raise ClpError(f"unsupported file type {spec!r}; supported: {_supported_list()}")
            files = [p]
        elif glob.has_magic(spec):
            matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(spec), recursive=True))
            files = []
            for m in matches:
                files.extend(_walk(m) if m.is_dir() else [m] if m.is_file() and file_format(m) else [])
            if not files:
                raise ClpError(f"no supported files match {spec!r} ({_supported_list()})")
        else:
            raise ClpError(f"input file {spec!r} does not exist")
        for f in files:
            key = f.resolve()
            if key in seen:
                log.warning("%s is named more than once; reading it once", f)
                continue
            seen.add(key)
            out.append(f)
    return out


def open_binary(path: Path) -> BinaryIO:
    """A buffered binary reader of ``path``, decompressed according to its suffix."""
    _, compression = file_format(path) or (None, None)
    if compression == ".gz":
        return io.BufferedReader(gzip.GzipFile(path, "rb"), READ_BUFFER)  # type: ignore[arg-type]
    if compression == ".bz2":
        return io.BufferedReader(bz2.BZ2File(path, "rb"), READ_BUFFER)  # type: ignore[arg-type]
    if compression == ".xz":
        return io.BufferedReader(lzma.LZMAFile(path, "rb"), READ_BUFFER)  # type: ignore[arg-type]
    if compression in (".zst", ".zstd"):
        import zstandard

        raw = open(path, "rb")
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
        return io.BufferedReader(reader, READ_BUFFER)  # type: ignore[arg-type]
    return open(path, "rb", buffering=READ_BUFFER)


class _Skipper:
    """Counts skipped documents; raises instead under ``strict``."""

    def __init__(self, counts: SkipCounts, strict: bool) -> None:
        self.counts = counts
        self.strict = strict
        self._warned: set[str] = set()

    def invalid(self, where: str, detail: str = "") -> None:
        if self.strict:
            raise ClpError(f"{where}: document is not valid UTF-8{detail} (--strict); remove --strict to skip "
                           "and count such documents")
        self.counts.invalid_utf8 += 1
        self._warn_once("invalid", f"{where}: skipping a document that is not valid UTF-8{detail} "
                                   "(further ones are counted in stats.json, not logged)")

    def malformed(self, where: str, detail: str) -> None:
        if self.strict:
            raise ClpError(f"{where}: {detail} (--strict); remove --strict to skip and count such lines")
        self.counts.malformed += 1
        self._warn_once("malformed", f"{where}: skipping a line: {detail} (further ones are counted in "
                                     "stats.json, not logged)")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)


def _missing_column(column: str, where: str, available: list[str]) -> ClpError:
    return ClpError(
        f"{where}: no column {column!r} (columns: {', '.join(map(repr, available)) or 'none'}); "
        "pass --text_column with the column that holds the text"
    )


def _text_value(value: Any, column: str, where: str, counts: SkipCounts, skip: _Skipper) -> Doc | None:
    if value is None:
        counts.empty += 1
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            skip.invalid(where, f" ({e.reason} at byte {e.start})")
            return None
    if not isinstance(value, str):
        raise ClpError(f"{where}: column {column!r} holds {type(value).__name__}, not text; "
                       "pass --text_column with the column that holds the text")
    if not value or value.isspace():
        counts.empty += 1
        return None
    try:
        n = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        skip.invalid(where, " (lone surrogate)")
        return None
    return value, n


def _raw_lines(f: BinaryIO) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of each line, without a leading UTF-8 BOM and without the line ending."""
    for lineno, raw in enumerate(f, 1):
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        if raw.endswith(b"\n"):
            raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
        yield lineno, raw


_BLOCK_BYTES = 1 << 22


def _txt_lines(f: BinaryIO, path: Path, counts: SkipCounts, skip: _Skipper) -> Iterator[Doc]:
    """One document per line. Reads blocks of whole lines and decodes each block in one call (UTF-8 never
    has a newline byte inside a character, so splitting the bytes and the text at newlines pairs them up);
    a block that does not decode is redone line by line to name the bad lines."""
    lineno = 0  # lines before the current block
    rest = b""
    first = True
    while True:
        data = f.read(_BLOCK_BYTES)
        if data:
            data = rest + data
            cut = data.rfind(b"\n")
            if cut < 0:
                rest = data
                continue
            block, rest = data[:cut], data[cut + 1 :]
        elif rest:
            block, rest = rest, b""  # the last line has no newline
        else:
            return
        if first:
            first = False
            if block.startswith(b"\xef\xbb\xbf"):
                block = block[3:]
                if not data and not block:
                    return  # the file holds a BOM and nothing else
        raws = block.split(b"\n")
        try:
            texts = block.decode("utf-8").split("\n")
        except UnicodeDecodeError:
            texts = None
        for i, raw in enumerate(raws):
            if raw.endswith(b"\r"):
                raw = raw[:-1]
                text = texts[i][:-1] if texts is not None else None
            else:
                text = texts[i] if texts is not None else None
            if text is None:
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    skip.invalid(f"{path}:{lineno + i + 1}", f" ({e.reason} at byte {e.start})")
                    continue
            if not text or text.isspace():
                counts.empty += 1
                continue
            yield text, len(raw)
        lineno += len(raws)


def _txt_paragraphs(f: BinaryIO, path: Path, counts: SkipCounts, skip: _Skipper) -> Iterator[Doc]:
    lines: list[bytes] = []
    start = 1

    def emit() -> Iterator[Doc]:
        raw = b"\n".join(lines)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            skip.invalid(f"{path}:{start}", f" ({e.reason} at byte {e.start} of the paragraph)")
            return
        yield text, len(raw)

    for lineno, raw in _raw_lines(f):
        if not raw.strip():  # blank (or whitespace-only) line: ends a document
            if lines:
                yield from emit()
                lines = []
            continue
        if not lines:
            start = lineno
        lines.append(raw)
    if lines:
        yield from emit()


def _jsonl(f: BinaryIO, path: Path, column: str, counts: SkipCounts, skip: _Skipper) -> Iterator[Doc]:
    for lineno, raw in enumerate(f, 1):
        if not raw.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(raw)
        except UnicodeDecodeError as e:
            skip.invalid(where, f" ({e.reason} at byte {e.start})")
            continue
        except ValueError as e:
            skip.malformed(where, f"not valid JSON ({e})")
            continue
        doc = _record_doc(record, column, where, counts, skip)
        if doc is not None:
            yield doc


def _record_doc(record: Any, column: str, where: str, counts: SkipCounts, skip: _Skipper) -> Doc | None:
    """The document in one JSON record; skips (and counts) records that are not objects."""
    if not isinstance(record, dict):
        skip.malformed(where, f"a JSON {type(record).__name__}, not an object")
        return None
    if column not in record:
        raise _missing_column(column, where, list(record))
    return _text_value(record[column], column, where, counts, skip)


def _json(f: BinaryIO, path: Path, column: str, counts: SkipCounts, skip: _Skipper) -> Iterator[Doc]:
    head = f.peek(4096)[:4096].lstrip()  # type: ignore[attr-defined]
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:].lstrip()
    if not head.startswith(b"["):
        yield from _jsonl(f, path, column, counts, skip)
        return
    try:
        records = json.loads(f.read())
    except UnicodeDecodeError as e:
        raise ClpError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except ValueError as e:
        raise ClpError(f"{path}: not valid JSON ({e})") from None
    for i, record in enumerate(records):
        where = f"{path}[{i}]"
        doc = _record_doc(record, column, where, counts, skip)
        if doc is not None:
            yield doc


def _parquet(path: Path, column: str, counts: SkipCounts, skip: _Skipper) -> Iterator[Doc]:
    import pyarrow.parquet as pq

    _, compression = file_format(path) or (None, None)
    tmpdir = None
    try:
        source: Path = path
        if compression:  # parquet needs random access: decompress to a temporary file first
            tmpdir = tempfile.mkdtemp(prefix="clp-prepare-")
            source = Path(tmpdir) / "data.parquet"
            with open_binary(path) as src, open(source, "wb") as dst:
                shutil.copyfileobj(src, dst, READ_BUFFER)
        try:
            pf = pq.ParquetFile(source)
        except Exception as e:
            raise ClpError(f"{path}: not a readable parquet file ({e})") from None
        names = pf.schema_arrow.names
        if column not in names:
            raise _missing_column(column, str(path), names)
        row = 0
        for batch in pf.iter_batches(batch_size=4096, columns=[column]):
            for value in batch.column(0).to_pylist():
                row += 1
                doc = _text_value(value, column, f"{path} row {row}", counts, skip)
                if doc is not None:
                    yield doc
    finally:
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)


_READ_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, lzma.LZMAError)


def file_documents(
    path: Path, text_column: str, txt_format: str, counts: SkipCounts, strict: bool
) -> Iterator[Doc]:
    """Documents of one local file, in file order."""
    fmt, _ = file_format(path) or (None, None)
    skip = _Skipper(counts, strict)
    try:
        if fmt == "parquet":
            yield from _parquet(path, text_column, counts, skip)
            return
        with open_binary(path) as f:
            if fmt == "txt":
                reader = _txt_paragraphs if txt_format == "paragraphs" else _txt_lines
                yield from reader(f, path, counts, skip)
            elif fmt == "jsonl":
                yield from _jsonl(f, path, text_column, counts, skip)
            elif fmt == "json":
                yield from _json(f, path, text_column, counts, skip)
            else:  # pragma: no cover - resolve_files only lets supported formats through
                raise ClpError(f"unsupported file type {str(path)!r}")
    except ClpError:
        raise
    except _READ_ERRORS as e:
        raise ClpError(f"cannot read {str(path)!r}: {type(e).__name__}: {e}") from e
    except Exception as e:  # zstandard.ZstdError and friends
        if type(e).__module__.startswith("zstandard") or "zstd" in type(e).__name__.lower():
            raise ClpError(f"cannot read {str(path)!r}: {type(e).__name__}: {e}") from e
        raise


# ---------------------------------------------------------------------------------------------- hub datasets


def hub_offline() -> bool:
    truthy = {"1", "ON", "YES", "TRUE"}
    return any(os.environ.get(v, "").upper() in truthy for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_unreachable(timeout: float = 5.0) -> str | None:
    """None when a TCP connection to the hub endpoint opens, else the reason (behind a proxy: assume yes)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(_hub_endpoint())
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return f"{type(e).__name__}: {e}"


def _hub_error(name: str, config: str | None, reason: str) -> ClpError:
    what = f"{name!r}" + (f" (config {config!r})" if config else "")
    return ClpError(
        f"cannot stream dataset {what} from the Hugging Face Hub ({_hub_endpoint()}): {reason}. "
        "Hub datasets are streamed and need network access; offline, pass local files with "
        "--files PATH... (txt, jsonl, json, parquet; directories and globs work too)"
    )


PARQUET_REVISION = "refs/convert/parquet"
"""The branch on which the hub's dataset viewer publishes parquet conversions of hub datasets."""
SCRIPT_REFUSAL = "Dataset scripts are no longer supported"
"""What ``datasets`` >= 3 raises for a dataset that is a loading script (e.g. the seed's ``oscar``)."""


def _parquet_fallback_error(name: str, config: str | None, reason: str) -> ClpError:
    return ClpError(
        f"dataset {name!r} is a loading script, which the installed datasets refuses (datasets >= 3 runs no "
        f"dataset scripts), and its parquet conversion (revision {PARQUET_REVISION}, directory "
        f"{config or 'default'!r}) could not be read either: {reason}. What you can do: download the parquet "
        f"files of https://huggingface.co/datasets/{name}/tree/{PARQUET_REVISION.replace('/', '%2F')}"
        f"/{config or 'default'} (or the dataset's original files) and pass them with --files PATH... "
        f"(same split rule); or run the script in an environment with datasets<3 and save the text as "
        f".jsonl/.parquet first; or pick a dataset that is stored as data files on the hub"
    )


@dataclass
class HubSource:
    """A dataset streamed with ``datasets.load_dataset(..., streaming=True)``.

    A dataset that is a loading script (which ``datasets`` >= 3 refuses) is read from the hub's parquet
    conversion instead: ``load_dataset(name, data_dir=config or "default", revision="refs/convert/parquet")``,
    whose files ``<config>/<split>/NNNN.parquet`` (or ``<config>/partial-<split>/...`` for the first part of a
    large split) hold the same documents in the same order, so the first-N / next-M split is the same.
    """

    name: str
    config: str | None
    split: str
    text_column: str
    dataset: Any = field(default=None, repr=False)
    revision: str | None = None
    """None, or :data:`PARQUET_REVISION` once the parquet conversion is used."""

    def open(self) -> None:
        """Open the stream (fails early with a clear message when the hub cannot be reached)."""
        local = Path(self.name).expanduser().exists()
        if not local:
            if hub_offline():
                raise _hub_error(self.name, self.config, "offline mode is on (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE)")
            reason = hub_unreachable()
            if reason:
                raise _hub_error(self.name, self.config, f"the hub is not reachable ({reason})")
        import datasets

        path = str(Path(self.name).expanduser()) if local else self.name
        try:
            self.dataset = datasets.load_dataset(path, self.config, split=self.split, streaming=True)
        except (ConnectionError, TimeoutError) as e:
            raise _hub_error(self.name, self.config, f"{type(e).__name__}: {e}") from e
        except Exception as e:
            if SCRIPT_REFUSAL not in str(e) or local:
                raise ClpError(
                    f"cannot open dataset {self.name!r} (config {self.config!r}, split {self.split!r}) for "
                    f"streaming: {type(e).__name__}: {e}"
                ) from e
            self._open_parquet_conversion(path)

    def _open_parquet_conversion(self, path: str) -> None:
        """Stream the hub's parquet conversion of a script dataset (``refs/convert/parquet``)."""
        import datasets

        log.warning("dataset %r is a loading script, which datasets %s refuses; reading its parquet conversion "
                    "(revision %s) instead. For large splits that conversion holds only the first part (about "
                    "5 GB) of each split: see docs/prepare.md", self.name, datasets.__version__, PARQUET_REVISION)
        try:
            # The conversion has no dataset card, so its configurations are plain directories: data_dir picks
            # one, and datasets maps "<split>/" and "partial-<split>/" to the split by its name.
            self.dataset = datasets.load_dataset(path, data_dir=self.config or "default", split=self.split,
                                                 revision=PARQUET_REVISION, streaming=True)
        except (ConnectionError, TimeoutError) as e:
            raise _hub_error(self.name, self.config, f"{type(e).__name__}: {e}") from e
        except Exception as e:
            raise _parquet_fallback_error(self.name, self.config, f"{type(e).__name__}: {e}") from e
        self.revision = PARQUET_REVISION

    def documents(self, counts: SkipCounts, strict: bool) -> Iterator[Doc]:
        if self.dataset is None:
            self.open()
        skip = _Skipper(counts, strict)
        where = f"dataset {self.name}"
        it = iter(self.dataset)
        i = 0
        while True:
            try:
                example = next(it)
            except StopIteration:
                return
            except (ConnectionError, TimeoutError, OSError) as e:
                raise ClpError(f"{where}: streaming failed after {i} examples: {type(e).__name__}: {e}") from e
            i += 1
            if self.text_column not in example:
                raise _missing_column(self.text_column, f"{where} example {i}", list(example))
            doc = _text_value(example[self.text_column], self.text_column, f"{where} example {i}", counts, skip)
            if doc is not None:
                yield doc


@dataclass
class FileSource:
    """Local files in order."""

    files: list[Path]
    text_column: str
    txt_format: str

    def documents(self, counts: SkipCounts, strict: bool) -> Iterator[Doc]:
        for path in self.files:
            yield from file_documents(path, self.text_column, self.txt_format, counts, strict)
