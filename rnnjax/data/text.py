"""Text: a character vocabulary, reading UTF-8 files safely, and an offline default corpus."""

from __future__ import annotations

import ast
import json
import sysconfig
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """Input data that cannot be used, with a message that says why and what to do."""


UNKNOWN = "\ufffd"  # U+FFFD REPLACEMENT CHARACTER stands for characters outside the vocabulary


@dataclass(frozen=True)
class CharVocab:
    """A character vocabulary; id 0 is the unknown symbol.

    >>> vocab = CharVocab.build("hello")
    >>> vocab.size, vocab.encode("hex").tolist(), vocab.decode(vocab.encode("hex"))
    (5, [2, 1, 0], 'he\ufffd')
    """

    chars: tuple[str, ...]

    @classmethod
    def build(cls, text: str, *, max_size: int | None = None) -> CharVocab:
        """The characters of ``text``, most frequent first (ties by code point), capped at
        ``max_size`` including the unknown symbol."""
        counts = Counter(text)
        counts.pop(UNKNOWN, None)
        ranked = sorted(counts, key=lambda c: (-counts[c], c))
        if max_size is not None:
            ranked = ranked[: max(max_size - 1, 0)]
        return cls((UNKNOWN, *sorted(ranked)))

    def __post_init__(self):
        object.__setattr__(self, "_index", {c: i for i, c in enumerate(self.chars)})

    @property
    def size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        index = self._index  # type: ignore[attr-defined]
        return np.fromiter((index.get(c, 0) for c in text), dtype=np.int32, count=len(text))

    def decode(self, ids) -> str:
        chars = self.chars
        return "".join(
            chars[i] if 0 <= i < len(chars) else UNKNOWN for i in np.asarray(ids).tolist()
        )

    def to_json(self) -> str:
        return json.dumps({"chars": "".join(self.chars)}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> CharVocab:
        return cls(tuple(json.loads(text)["chars"]))


def read_text(path: str | Path, *, min_chars: int = 2) -> str:
    """Read a UTF-8 text file, refusing what is not one with a :class:`DataError`: a missing
    path, a directory, an empty file, a binary file (NUL bytes) or invalid UTF-8."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if not path.is_file():
        raise DataError(f"data path {path} is not a file")
    raw = path.read_bytes()
    if b"\x00" in raw[:65536]:
        raise DataError(f"data file {path} looks binary (it holds NUL bytes); expected UTF-8 text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"data file {path} is not valid UTF-8 (byte {e.start}: "
            f"{raw[e.start : e.start + 1]!r}); convert it, e.g. iconv -f latin1 -t utf-8"
        ) from None
    if len(text.strip()) < min_chars:
        raise DataError(f"data file {path} is empty; expected at least {min_chars} characters")
    return text


# Pure-Python standard-library modules with plenty of prose in their docstrings.
CORPUS_MODULES = tuple(
    """
    argparse ast asyncio/events base64 bisect calendar cmd codecs collections/__init__
    configparser contextlib copy csv dataclasses datetime decimal difflib doctest
    email/message enum fileinput fnmatch fractions ftplib functools getopt gettext glob gzip
    heapq hmac html/parser http/client http/cookiejar imaplib inspect ipaddress json/__init__
    json/decoder locale logging/__init__ mailbox mimetypes netrc nntplib numbers optparse os
    pathlib pdb pickle pkgutil platform plistlib poplib pprint pydoc queue random re/__init__
    sched secrets selectors shlex shutil smtplib socket socketserver statistics string
    subprocess tarfile tempfile textwrap threading timeit tokenize trace traceback typing
    unittest/case urllib/parse urllib/request uuid warnings weakref xml/dom/minidom zipfile
    zipimport
    """.split()
)


def stdlib_corpus(max_chars: int = 1_500_000) -> str:
    """English prose found offline on any machine with Python: the docstrings of the installed
    standard library (modules, classes, functions), read with ``ast`` (nothing is imported).
    Deterministic for a given Python version."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[str] = []
    seen: set[str] = set()
    for name in CORPUS_MODULES:
        path = root / f"{name}.py"
        if not path.is_file():
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40 and doc not in seen:
                    seen.add(doc)
                    docs.append(doc)
    text = "\n\n".join(docs)
    if len(text) < 10_000:
        raise DataError(
            f"found only {len(text)} characters of docstrings under {root}; pass --data PATH"
        )
    return text[:max_chars]
