"""The curated dataset artifact that `fmkit curate` writes: a folder with `manifest.json`, Parquet shards under
`data/` and `rejected/`. Everything that asks "is this a dataset?" or reads one's rows comes here."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from ..errors import FmkitError
from ..workspace import read_manifest

FORMAT = "fmkit.dataset/1"
MANIFEST = "manifest.json"


def is_dataset(path) -> bool:
    """Whether `path` is a curated dataset folder."""
    return (Path(str(path)) / MANIFEST).is_file()


def dataset_manifest(folder) -> dict:
    """A curated dataset's manifest.json (sources, blocks, dedup, mix, output shards)."""
    if not is_dataset(folder):
        raise FmkitError(f"{folder} is not a curated dataset (no {MANIFEST}); run fmkit curate first")
    return json.loads((Path(folder) / MANIFEST).read_text())


def read_dataset(folder, columns=("id", "text")) -> Iterator[dict]:
    """A curated dataset's rows (dicts with `columns`), shard by shard."""
    import pyarrow.parquet as pq

    folder = Path(folder)
    for shard in dataset_manifest(folder)["output"]["shards"]:
        for batch in pq.ParquetFile(folder / shard["file"]).iter_batches(columns=list(columns)):
            yield from batch.to_pylist()


def dataset_id(source) -> str:
    """The registry id of a curated dataset folder ('' for any other corpus): lineage for what is built on it."""
    return read_manifest(source).get("id", "") if is_dataset(source) else ""
