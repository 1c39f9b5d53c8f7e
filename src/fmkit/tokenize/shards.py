"""Read token shards with np.memmap: random training windows and fixed validation windows, never loading a shard."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import FmkitError
from .pack import FORMAT


class TokenShards:
    """The shards folder written by `pack`, memory-mapped."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index_path = self.folder / "index.json"
        if not index_path.is_file():
            raise FmkitError(f"no index.json in {self.folder}; create token shards with `fmkit pack`")
        self.index = json.loads(index_path.read_text())
        if self.index.get("format") != FORMAT:
            raise FmkitError(f"{index_path} has format {self.index.get('format')!r}, expected {FORMAT!r}")
        dtype = np.dtype(self.index["dtype"])
        self.arrays = []
        for shard in self.index["shards"]:
            path = self.folder / shard["file"]
            if not path.is_file() or path.stat().st_size != shard["tokens"] * dtype.itemsize:
                raise FmkitError(f"shard {path} is missing or truncated; re-run `fmkit pack`")
            self.arrays.append(np.memmap(path, dtype=dtype, mode="r"))
        self.sizes = np.array([len(a) for a in self.arrays], dtype=np.int64)
        self.vocab_size = int(self.index["vocab_size"])
        self.tokens = int(self.sizes.sum())
        self.bytes_per_token = self.index["bytes"] / max(1, self.index["tokens"])

    def document_starts(self, shard: int) -> np.ndarray:
        """Offsets (within a shard) where each document begins."""
        return np.fromfile(self.folder / self.index["shards"][shard]["doc_starts"], dtype=np.int64)

    def documents(self):
        """Each document's tokens in turn (a memmap slice; documents are separated by EOS in the stream)."""
        for i, arr in enumerate(self.arrays):
            starts = self.document_starts(i)
            ends = np.append(starts[1:], len(arr))
            for a, b in zip(starts, ends):
                yield arr[a:b]

    def _check_window(self, window: int) -> np.ndarray:
        room = self.sizes - window
        if (room < 0).all():
            raise FmkitError(f"shards in {self.folder} hold {self.tokens} tokens, fewer than one window of "
                             f"{window}; lower train.seq_len or pack more text")
        return np.clip(room + 1, 0, None)

    def sample(self, rng: np.random.Generator, batch: int, window: int) -> np.ndarray:
        """`batch` random windows of `window` tokens (int64), drawn uniformly over all token positions."""
        room = self._check_window(window)
        shard_ids = rng.choice(len(self.arrays), size=batch, p=room / room.sum())
        out = np.empty((batch, window), dtype=np.int64)
        for row, s in enumerate(shard_ids):
            start = int(rng.integers(0, room[s]))
            out[row] = self.arrays[s][start:start + window]
        return out

    def sequential(self, batch: int, window: int, max_batches: int) -> list[np.ndarray]:
        """Non-overlapping windows from the start of the stream: the same every time (validation)."""
        self._check_window(window)
        rows = []
        for arr in self.arrays:
            for start in range(0, len(arr) - window + 1, window):
                rows.append(np.asarray(arr[start:start + window], dtype=np.int64))
                if len(rows) == batch * max_batches:
                    break
            if len(rows) == batch * max_batches:
                break
        return [np.stack(rows[i:i + batch]) for i in range(0, len(rows) - batch + 1, batch)] or [np.stack(rows)]
