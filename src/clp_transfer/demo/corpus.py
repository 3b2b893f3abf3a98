"""Real German and English text, fetched reproducibly from Debian documentation packages.

The demo needs text in the target language on a machine with no dataset hub. Debian ships prose in its
documentation packages; this module downloads them with the ordinary package client (``apt-get download``,
no root needed once the package lists exist), unpacks them with ``dpkg-deb``, keeps prose-like paragraphs,
deduplicates them and caches one document per line under the user's cache directory.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..atomic import atomic_write_text
from ..errors import ClpError
from ..models import cache_dir

log = logging.getLogger(__name__)


def fortune_documents(root: Path) -> Iterator[str]:
    """Fortune cookie files: entries separated by lines holding a single ``%``."""
    for f in sorted(root.rglob("*")):
        if not f.is_file() or f.suffix in (".dat", ".u8") or "asciiart" in f.name or f.is_symlink():
            continue
        if "off" in f.relative_to(root).parts:  # the offensive collection stays out
            continue
        text = f.read_bytes().decode("utf-8", errors="replace")
        for entry in re.split(r"^%\s*$", text, flags=re.M):
            yield " ".join(entry.split())


def paragraph_documents(root: Path, pattern: str) -> Iterator[str]:
    """Plain-text books (optionally gzipped): paragraphs separated by blank lines."""
    for f in sorted(root.rglob(pattern)):
        raw = gzip.decompress(f.read_bytes()) if f.suffix == ".gz" else f.read_bytes()
        for para in re.split(r"\n\s*\n", raw.decode("utf-8", errors="replace")):
            yield " ".join(para.split())


@dataclass(frozen=True)
class DebianSource:
    package: str
    """Debian package name."""
    extract: Callable[[Path], Iterable[str]]
    """Documents from the unpacked package tree."""


SOURCES: dict[str, list[DebianSource]] = {
    "de": [
        DebianSource("fortunes-de", lambda d: fortune_documents(d / "usr/share/games/fortunes")),
        DebianSource("debian-reference-de", lambda d: paragraph_documents(d / "usr/share/debian-reference", "*.txt.gz")),
    ],
    "en": [
        DebianSource("fortunes", lambda d: fortune_documents(d / "usr/share/games/fortunes")),
        DebianSource("debian-reference-en", lambda d: paragraph_documents(d / "usr/share/debian-reference", "*.txt.gz")),
    ],
}

_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)


def is_prose(doc: str, min_words: int = 4, min_letter_ratio: float = 0.7) -> bool:
    """At least ``min_words`` words and mostly letters (drops tables, code, command lines, ASCII art)."""
    words = doc.split()
    if len(words) < min_words:
        return False
    letters = sum(len(m) for m in _WORD.findall(doc))
    return letters / max(1, len(doc.replace(" ", ""))) >= min_letter_ratio


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise ClpError(
            f"corpus: '{cmd[0]}' is not installed, so Debian packages cannot be fetched; "
            "pass --corpus_dir with your own text files instead"
        ) from None


def download_package(package: str, dest: Path) -> Path:
    """``apt-get download`` one package into ``dest`` (updates the package lists once if they are empty)."""
    dest.mkdir(parents=True, exist_ok=True)
    existing = sorted(dest.glob(f"{package}_*.deb"))
    if existing:
        return existing[-1]
    run = _run(["apt-get", "download", package], dest)
    if run.returncode != 0 and "Unable to locate package" in run.stderr:
        log.info("package lists look empty; running apt-get update")
        _run(["apt-get", "update"], dest)
        run = _run(["apt-get", "download", package], dest)
    found = sorted(dest.glob(f"{package}_*.deb"))
    if run.returncode != 0 or not found:
        raise ClpError(
            f"corpus: could not download Debian package {package!r} ({run.stderr.strip().splitlines()[-1:]}); "
            "check the package registry is reachable (apt-get update), or pass --corpus_dir with your own text"
        )
    return found[-1]


def fetch_debian_text(lang: str, root: Path | None = None, overwrite: bool = False) -> Path:
    """Text of ``lang`` ('de' or 'en') as ``<root>/<lang>.txt``, one document per line; cached."""
    if lang not in SOURCES:
        raise ClpError(f"no Debian text sources for language {lang!r} (known: {', '.join(SOURCES)})")
    root = root or cache_dir() / "corpus"
    out = root / f"{lang}.txt"
    manifest_path = root / f"{lang}.manifest.json"
    if out.is_file() and manifest_path.is_file() and not overwrite:
        return out
    seen: set[str] = set()
    docs: list[str] = []
    manifest = {"language": lang, "packages": []}
    for source in SOURCES[lang]:
        deb = download_package(source.package, root / "debs")
        with tempfile.TemporaryDirectory() as tmp:
            unpack = _run(["dpkg-deb", "-x", str(deb), tmp], root)
            if unpack.returncode != 0:
                raise ClpError(f"corpus: could not unpack {deb.name}: {unpack.stderr.strip()}")
            n = 0
            for doc in source.extract(Path(tmp)):
                if is_prose(doc) and doc not in seen:
                    seen.add(doc)
                    docs.append(doc)
                    n += 1
        manifest["packages"].append({"package": source.package, "file": deb.name, "documents": n,
                                     "sha256": hashlib.sha256(deb.read_bytes()).hexdigest()})
        log.info("corpus: %d %s documents from %s", n, lang, deb.name)
    if not docs:
        raise ClpError(f"corpus: no {lang} prose found in {[s.package for s in SOURCES[lang]]}")
    text = "\n".join(docs) + "\n"
    manifest.update(documents=len(docs), bytes=len(text.encode("utf-8")))
    atomic_write_text(out, text)
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")
    return out


def split_documents(docs: list[str], heldout_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic document-level split by a hash of (seed, document): order-independent and stable."""
    train, heldout = [], []
    for doc in docs:
        h = int.from_bytes(hashlib.sha256(f"{seed}\0{doc}".encode()).digest()[:8], "big") / 2**64
        (heldout if h < heldout_fraction else train).append(doc)
    return train, heldout

