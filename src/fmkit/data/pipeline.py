"""Running the pipeline over units of work: filters, redaction and signatures per document, in worker processes.

Each unit writes `<uid>.kept.parquet` (surviving documents with their exact hash and MinHash signature),
`<uid>.rejected.parquet` (dropped documents with block and reason) and, last, `<uid>.json` (its counts), renamed
into place: a unit whose `.json` exists is done, so an interrupted run redoes only unfinished units.
"""
from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from .dedup import MinHashConfig, exact_hash, signatures
from .sources import PREVIEW, Doc, Rejected, SourceSpec, Unit, read_unit

_PRETOKENS = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?[^\s\w]+|\s+(?!\S)|\s+""")
_WORKER_STATE: dict = {}


class TokenCounter:
    """Tokens per text: with a tokenizer when one is named, else a GPT-2 pre-tokenizer count (a close estimate)."""

    def __init__(self, tokenizer: str = ""):
        self.tok = None
        if tokenizer:
            from tokenizers import Tokenizer

            p = Path(tokenizer)
            self.tok = Tokenizer.from_file(str(p / "tokenizer.json" if p.is_dir() else p))

    def __call__(self, texts: list[str]) -> list[int]:
        if self.tok is not None:
            return [len(e.ids) for e in self.tok.encode_batch(texts, add_special_tokens=False)]
        return [len(_PRETOKENS.findall(t)) for t in texts]


def _state(job: dict):
    """Blocks and helpers built once per worker process (a toxicity list or tokenizer is loaded once)."""
    key = job["fingerprint"]
    if _WORKER_STATE.get("key") != key:
        from .recipe import build_blocks

        _WORKER_STATE.update(key=key, blocks=build_blocks(job["pipeline"]),
                             counter=TokenCounter(job["tokenizer"]),
                             minhash=MinHashConfig(**job["minhash"]))
    return _WORKER_STATE


def _write_parquet(path: Path, rows: list[dict], schema) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=schema)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


def kept_schema(num_perm: int):
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("text", pa.string()), ("source", pa.string()), ("domain", pa.string()),
                      ("kind", pa.string()), ("location", pa.string()), ("chars", pa.int64()),
                      ("tokens", pa.int64()), ("exact_hash", pa.int64()),
                      ("minhash", pa.list_(pa.uint32(), num_perm))])


def rejected_schema():
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("source", pa.string()), ("domain", pa.string()), ("block", pa.string()),
                      ("reason", pa.string()), ("location", pa.string()), ("text", pa.string()),
                      ("duplicate_of", pa.string())])   # dedup: the id of the document kept instead


def run_unit(job: dict, spec_dict: dict, unit_dict: dict) -> dict:
    """Process one unit; returns its counts (also written as `<uid>.json`, the done marker)."""
    started = time.time()
    spec, unit = SourceSpec(**spec_dict), Unit(**unit_dict)
    st = _state(job)
    blocks, work = st["blocks"], Path(job["work"])
    domain = spec.domain or spec.name
    kept: list[Doc] = []
    rejected: list[dict] = []
    block_stats = {f"{i}:{b.name}": Counter() for i, b in enumerate(blocks)}
    counts: Counter = Counter()
    docs_in = 0
    for item in read_unit(spec, unit):
        docs_in += 1
        if isinstance(item, Rejected):
            rejected.append(dict(id=item.id, source=spec.name, domain=domain, block="read", reason=item.reason,
                                 location=item.location, text=item.text, duplicate_of=""))
            continue
        doc, reason, by = item, None, None
        for i, block in enumerate(blocks):
            if block.applies_to not in ("all", doc.kind):
                continue
            bs = block_stats[f"{i}:{block.name}"]
            bs["seen"] += 1
            before = doc.text
            reason = block(doc)
            if reason is None and not doc.text.strip():
                reason = "empty after this block"
            if reason is not None:
                by = block.name
                bs[f"dropped:{reason}"] += 1
                doc.text = before
                break
            if doc.text != before:
                bs["modified"] += 1
            bs["kept"] += 1
        counts.update(doc.counts)
        if reason is not None:
            rejected.append(dict(id=doc.id, source=spec.name, domain=domain, block=by, reason=reason,
                                 location=doc.location, text=doc.text[:PREVIEW], duplicate_of=""))
        else:
            kept.append(doc)
    texts = [d.text for d in kept]
    sigs = signatures(texts, st["minhash"]) if job["minhash_on"] else None
    tokens = st["counter"](texts)
    rows = [dict(id=d.id, text=d.text, source=spec.name, domain=domain, kind=d.kind, location=d.location,
                 chars=len(d.text), tokens=t, exact_hash=exact_hash(d.text),
                 minhash=sigs[i].tolist() if sigs is not None else [0] * st["minhash"].num_perm)
            for i, (d, t) in enumerate(zip(kept, tokens))]
    _write_parquet(work / f"{unit.uid}.kept.parquet", rows, kept_schema(st["minhash"].num_perm))
    _write_parquet(work / f"{unit.uid}.rejected.parquet", rejected, rejected_schema())
    stats = {"uid": unit.uid, "source": spec.name, "docs_in": docs_in, "kept": len(kept), "rejected": len(rejected),
             "blocks": {k: dict(v) for k, v in block_stats.items()}, "counts": dict(counts),
             "read_rejected": dict(Counter(r["reason"] for r in rejected if r["block"] == "read")),
             "seconds": time.time() - started, "pid": os.getpid()}
    tmp = work / f"{unit.uid}.json.tmp"
    tmp.write_text(json.dumps(stats))
    tmp.replace(work / f"{unit.uid}.json")
    return stats


def execute(job: dict, tasks: list[tuple[SourceSpec, Unit]], workers: int, executor: str, on_done) -> None:
    """Run `run_unit` over tasks with local processes (or Ray); `on_done(stats)` is called as each finishes."""
    args = [(job, asdict(spec), asdict(unit)) for spec, unit in tasks]
    if executor == "ray":
        return _execute_ray(args, workers, on_done)
    if workers <= 1 or len(args) <= 1:
        for a in args:
            on_done(run_unit(*a))
        return
    import multiprocessing as mp

    # spawn: workers start clean (no inherited threads or torch state), and behave the same on every OS.
    with mp.get_context("spawn").Pool(min(workers, len(args))) as pool:
        for stats in pool.imap_unordered(_run_unit_star, args):
            on_done(stats)


def _run_unit_star(a):
    return run_unit(*a)


def _execute_ray(args: list, workers: int, on_done) -> None:
    try:
        import ray
    except ImportError:
        from ..errors import FmkitError

        raise FmkitError("executor: ray needs Ray installed: pip install 'fmkit[ray]'") from None
    if not ray.is_initialized():
        # RAY_ADDRESS in the environment joins an existing cluster; otherwise a local instance is started.
        ray.init(num_cpus=workers or None, include_dashboard=False, log_to_driver=False,
                 address=os.environ.get("RAY_ADDRESS"))
    remote = ray.remote(run_unit)
    pending = [remote.remote(*a) for a in args]
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        for ref in done:
            on_done(ray.get(ref))
