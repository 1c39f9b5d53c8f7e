"""The embedded default corpus: the local Python standard library (.py sources plus the pydoc topic texts), with a
fixed train/val split by module, present wherever Python is."""
from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Iterator

from ..errors import FmkitError

SPLITS = ("all", "train", "val")
# Held-out stdlib modules for validation: a fixed list present in every CPython 3.10+ install.
STDLIB_VAL_MODULES = ("json", "csv", "textwrap", "difflib", "statistics", "fractions", "calendar", "zipfile",
                      "shlex", "heapq")
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3",
              "turtledemo", "ensurepip", "config-3"}
PYDOC_TOPICS = "pydoc_data/topics"   # stands for the pydoc topic texts in a list of stdlib files


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_split(source: str) -> str:
    """The split named by `stdlib`, `stdlib:train` or `stdlib:val` (all, train, val)."""
    split = source.partition(":")[2] or "all"
    if split not in SPLITS:
        raise FmkitError(f"unknown stdlib split '{split}' in '{source}'; use stdlib, stdlib:train or stdlib:val")
    return split


def _module(rel: Path) -> str:
    return rel.parts[0].removesuffix(".py")


def stdlib_files(split: str) -> list:
    """The stdlib's .py files of a split (train: all but the held-out modules; val: those; all), in a fixed order;
    train and all end with PYDOC_TOPICS, the text of `help('TOPIC')` (`pydoc_data`)."""
    if split not in SPLITS:
        raise FmkitError(f"unknown stdlib split '{split}'; use all, train or val")
    root = stdlib_root()
    files = sorted(p for p in root.rglob("*.py")
                   if not (_SKIP_DIRS & set(p.relative_to(root).parts[:-1]))
                   and not p.relative_to(root).parts[0].startswith(("config-", "site-packages")))
    out = [p for p in files if split == "all" or (split == "val") == (_module(p.relative_to(root))
                                                                        in STDLIB_VAL_MODULES)]
    return out + ([PYDOC_TOPICS] if split in ("train", "all") else [])


def stdlib_doc_id(path) -> str:
    return f"stdlib/{Path(path).relative_to(stdlib_root())}"


def pydoc_topics() -> Iterator[tuple[str, str]]:
    """(document id, text) of every pydoc topic."""
    from pydoc_data.topics import topics  # ships with CPython

    for name in sorted(topics):
        yield f"stdlib/pydoc_data/{name}", topics[name]
