"""A small, real, download-free corpus built from this machine's Python stdlib.

Why the stdlib: the demo must run with no network, yet train on real text
rather than random tokens, so that a falling loss means something. Every Python
install ships some 10 MB of carefully written source code with English
docstrings, under a permissive licence. We turn it into two Pile subsets:

* ``StdlibCode``: one document per module, the source file verbatim;
* ``StdlibDocs``: one document per module, its docstrings (module, classes,
  functions) extracted with ``ast`` -- prose-like text;
* ``PythonDocsRst`` (optional, ``docs_dir``): one document per page of the
  Python documentation's reStructuredText sources, as Debian's
  ``python3.X-doc`` package installs them -- the replication's larger corpus.

Output is in the Pile's own format (zstd-compressed JSON lines), so the rest of
data preparation treats the demo exactly like the real dataset.

Determinism: module selection and the train/validation split depend only on
the module's path relative to the stdlib and on ``seed`` (via SHA-256, not
Python's salted ``hash``), and files are written in sorted order with a fixed
zstd level. The same Python install therefore gives byte-identical files.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass

from data_prep.errors import DataError
from data_prep.outputs.jsonl_zst import JsonlZstWriter, pile_record

CODE_SET = "StdlibCode"
DOCS_SET = "StdlibDocs"
#: The reStructuredText sources of the Python documentation (``docs_dir``).
REFERENCE_SET = "PythonDocsRst"
#: Where Debian's ``python3.X-doc`` package puts them.
DEBIAN_DOCS_DIR = f"/usr/share/doc/python{sysconfig.get_python_version()}/html/_sources"

TRAIN_FILE = "train.jsonl.zst"
VAL_FILE = "val.jsonl.zst"
#: Written last; its presence means the corpus directory is complete.
MANIFEST_FILE = "corpus.json"

#: ~7 MB of text: enough for a tiny model to learn something visible, small
#: enough that tokenizer training, tokenization and a few hundred training
#: steps all fit in minutes on 2 CPU cores.
DEFAULT_MAX_BYTES = 7_000_000
DEFAULT_VALID_FRACTION = 0.05
DEFAULT_SEED = 1234

#: Directories skipped anywhere in the tree. Test suites are huge, repetitive
#: and full of deliberately odd code; site-packages is not the stdlib (and
#: differs between machines, which would break determinism); the others are
#: applications, generated data or encoding tables rather than library code.
SKIP_DIRS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "site-packages",
        "dist-packages",
        "idlelib",
        "turtledemo",
        "lib2to3",  # deprecated; ships grammar fixtures and test data
        "pydoc_data",  # one generated 750 kB dict of help topics
        "encodings",  # mostly generated codec tables
        "ensurepip",
        "lib-dynload",
        "__pycache__",
    }
)
#: File name prefixes skipped: ``_sysconfigdata_*`` is generated per machine.
SKIP_FILE_PREFIXES = ("_sysconfigdata",)
#: Files above this size are generated tables or outliers; one of them would
#: otherwise take a large share of the small byte budget.
MAX_FILE_BYTES = 200_000
#: A docstring document shorter than this is mostly headings; not worth it.
MIN_DOCS_CHARS = 200


@dataclass(frozen=True)
class _Module:
    """One stdlib source file and the documents made from it."""

    relpath: str  # relative to the stdlib root, with "/" separators
    code: str
    docs: str | None

    @property
    def nbytes(self) -> int:
        return len(self.code.encode("utf-8")) + len(self.docs.encode("utf-8") if self.docs else b"")


def stdlib_root() -> str:
    """The directory of this interpreter's pure-Python standard library."""
    return sysconfig.get_paths()["stdlib"]


def _stable_unit(*parts: str) -> float:
    """A deterministic pseudo-random number in [0, 1) from strings.

    SHA-256 instead of ``hash()``: Python salts string hashes per process.
    """
    digest = hashlib.sha256("\0".join(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _is_skipped_dir(name: str) -> bool:
    # "config-3.11-x86_64-linux-gnu" holds build files, not library code.
    return name in SKIP_DIRS or name.startswith("config-")


def list_stdlib_sources(root: str | None = None) -> list[str]:
    """Sorted relative paths of the stdlib .py files the demo may use."""
    root = root or stdlib_root()
    if not os.path.isdir(root):
        raise DataError(f"Python standard library not found at {root!r}; is this a full Python install?")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning in place stops os.walk from descending into skipped trees.
        dirnames[:] = sorted(d for d in dirnames if not _is_skipped_dir(d))
        for name in filenames:
            if not name.endswith(".py") or name.startswith(SKIP_FILE_PREFIXES):
                continue
            full = os.path.join(dirpath, name)
            if os.path.getsize(full) > MAX_FILE_BYTES:
                continue
            found.append(os.path.relpath(full, root).replace(os.sep, "/"))
    return sorted(found)


def extract_docstrings(source: str, module_name: str) -> str | None:
    """The docstrings of a module, its classes and functions, as one text.

    Each docstring is introduced by the dotted name it documents, e.g.::

        json.decoder.JSONDecoder.decode

        Return the Python representation of ``s`` ...

    Returns None when the file does not parse (some stdlib files target other
    platforms or are templates) or the docstrings are too short to be prose.
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    sections = []

    def visit(node: ast.AST, qualname: str) -> None:
        doc = ast.get_docstring(node, clean=True)
        if doc:
            sections.append(f"{qualname}\n\n{doc}")
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, f"{qualname}.{child.name}")

    visit(tree, module_name)
    text = "\n\n\n".join(sections)
    return text if len(text) >= MIN_DOCS_CHARS else None


def list_doc_sources(docs_dir: str) -> list[str]:
    """Sorted relative paths of the documentation's ``.rst.txt`` / ``.rst`` / ``.txt`` sources."""
    if not os.path.isdir(docs_dir):
        raise DataError(
            f"documentation sources not found at {docs_dir!r}; on Debian install them with "
            f"`apt-get install python{sysconfig.get_python_version()}-doc`, or name another folder"
        )
    found = []
    for dirpath, dirnames, filenames in os.walk(docs_dir):
        dirnames.sort()
        for name in filenames:
            if name.endswith((".rst.txt", ".rst", ".txt")):
                found.append(os.path.relpath(os.path.join(dirpath, name), docs_dir).replace(os.sep, "/"))
    if not found:
        raise DataError(f"{docs_dir!r} holds no .rst.txt, .rst or .txt files; is it the documentation's _sources folder?")
    return sorted(found)


def _module_name(relpath: str) -> str:
    name = relpath[: -len(".py")].replace("/", ".")
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def _load_module(root: str, relpath: str) -> _Module | None:
    try:
        with open(os.path.join(root, relpath), encoding="utf-8") as f:
            code = f.read()
    except (UnicodeDecodeError, OSError):
        return None  # a handful of files use other encodings; not worth handling
    if not code.strip():
        return None  # empty __init__.py files
    return _Module(relpath, code, extract_docstrings(code, _module_name(relpath)))


def build_demo_corpus(
    out_dir: str | os.PathLike,
    max_bytes: int = DEFAULT_MAX_BYTES,
    valid_fraction: float = DEFAULT_VALID_FRACTION,
    seed: int = DEFAULT_SEED,
    stdlib_dir: str | None = None,
    docs_dir: str | None = None,
) -> dict:
    """Write ``train.jsonl.zst``, ``val.jsonl.zst`` and ``corpus.json`` to ``out_dir``.

    Modules are taken in a seeded pseudo-random order until ``max_bytes`` of
    text (code plus docstrings, UTF-8) is reached, so a small budget still
    samples the whole library instead of its alphabetical beginning. A module's
    code and docstring documents always land in the same split: the docstrings
    are verbatim substrings of the code, so splitting them would leak
    validation text into training.

    With ``docs_dir`` (the Python documentation's reStructuredText sources,
    e.g. Debian's ``python3.11-doc``: ``DEBIAN_DOCS_DIR``) every source file
    is added as one ``PythonDocsRst`` document, outside ``max_bytes``, split
    by its own path hash with the same ``valid_fraction``: whole documents are
    held out, never positions inside one.

    Returns the statistics also stored in ``corpus.json``.
    """
    if max_bytes <= 0:
        raise DataError(f"max_bytes must be positive, got {max_bytes}")
    if not 0.0 <= valid_fraction < 1.0:
        raise DataError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    root = stdlib_dir or stdlib_root()
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    seed_str = str(seed)

    # Select: seeded order, greedy fill of the byte budget.
    candidates = sorted(list_stdlib_sources(root), key=lambda p: _stable_unit(seed_str, "order", p))
    chosen: list[_Module] = []
    total = 0
    for relpath in candidates:
        # The file size equals the code's UTF-8 size, so modules that cannot
        # fit are skipped without being read and parsed (small budgets).
        if total + os.path.getsize(os.path.join(root, relpath)) > max_bytes:
            continue
        module = _load_module(root, relpath)
        if module is None or total + module.nbytes > max_bytes:
            continue  # keep trying smaller modules: fills the budget more exactly
        chosen.append(module)
        total += module.nbytes
    if not chosen:
        raise DataError(f"no stdlib module fits in max_bytes={max_bytes}; raise the budget")
    chosen.sort(key=lambda m: m.relpath)  # output order independent of the seed's shuffle

    def is_val(module: _Module) -> bool:
        return _stable_unit(seed_str, "split", module.relpath) < valid_fraction

    references: list[tuple[str, str]] = []  # (relpath, text) of the documentation sources
    if docs_dir is not None:
        for relpath in list_doc_sources(docs_dir):
            with open(os.path.join(docs_dir, relpath), encoding="utf-8", errors="replace") as f:
                text = f.read()
            if text.strip():
                references.append((relpath, text))

    stats = {
        "source": "python-stdlib",
        "python_version": sysconfig.get_python_version(),
        "seed": seed,
        "max_bytes": max_bytes,
        "valid_fraction": valid_fraction,
        "modules": len(chosen),
        "docs_dir": docs_dir,
        "docs_documents": len(references),
        "splits": {},
    }
    for file_name, want_val in ((TRAIN_FILE, False), (VAL_FILE, True)):
        per_set: dict[str, int] = {}
        with JsonlZstWriter(os.path.join(out_dir, file_name)) as out:
            for module in chosen:
                if is_val(module) != want_val:
                    continue
                source = f"stdlib/{module.relpath}"
                out.write(pile_record(module.code, CODE_SET, source=source))
                per_set[CODE_SET] = per_set.get(CODE_SET, 0) + 1
                if module.docs:
                    out.write(pile_record(module.docs, DOCS_SET, source=source))
                    per_set[DOCS_SET] = per_set.get(DOCS_SET, 0) + 1
            for relpath, text in references:
                if (_stable_unit(seed_str, "split", "docs/" + relpath) < valid_fraction) != want_val:
                    continue
                out.write(pile_record(text, REFERENCE_SET, source=f"python-docs/{relpath}"))
                per_set[REFERENCE_SET] = per_set.get(REFERENCE_SET, 0) + 1
        split = "train" if not want_val else "val"
        stats["splits"][split] = {
            "file": file_name,
            "documents": out.records,
            "text_bytes": out.text_bytes,
            "documents_per_set": per_set,
        }

    # The manifest goes last: prepare-demo treats its presence as "complete".
    tmp = os.path.join(out_dir, MANIFEST_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=2)
        f.write("\n")
    os.replace(tmp, os.path.join(out_dir, MANIFEST_FILE))
    return stats


def corpus_is_complete(out_dir: str | os.PathLike) -> bool:
    """True when ``out_dir`` holds a finished corpus (manifest and both splits)."""
    out_dir = os.fspath(out_dir)
    return all(
        os.path.isfile(os.path.join(out_dir, name)) for name in (MANIFEST_FILE, TRAIN_FILE, VAL_FILE)
    )
