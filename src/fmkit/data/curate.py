"""`fmkit curate`: raw sources in, a curated dataset out, with a manifest that accounts for every document.

Stages: (1) per unit of work, in parallel: read, filter, redact, hash and sign each document (pipeline.py);
(2) once over all units: exact and MinHash dedup (dedup.py); (3) mix domains to target token shares (mix.py);
(4) write Parquet shards, `rejected/` and `manifest.json`. Units finished before an interruption are reused.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..errors import FmkitError
from ..progress import progress_bar, status
from ..workspace import Workspace, write_manifest
from .dataset import FORMAT, MANIFEST
from .dedup import MinHashConfig, exact_clusters, minhash_clusters
from .mix import mix_rates, repeats
from .pipeline import execute, rejected_schema
from .recipe import CurateRecipe, build_blocks, build_sources, load_curate_recipe
from .sources import PREVIEW, plan_units


def curate(recipe: str | Path | CurateRecipe | None = None, overrides: list[str] | dict | None = None,
           workers: int | None = None, resume: bool = True, workspace: str | Path | None = None) -> Path:
    """Curate raw sources into a dataset: filter, deduplicate, redact PII, score toxicity, balance domains.

    Writes Parquet shards, manifest.json (every filter's kept/dropped counts by reason, dedup stats) and rejected/
    (each dropped document with its reason); returns the dataset folder. An interrupted run continues from its
    finished units when run again with the same recipe.

    Args:
        recipe: The curation recipe YAML (sources, pipeline, dedup, mix).
        overrides: Recipe overrides such as --dedup.jaccard=0.8 or --out=PATH.
        workers: Worker processes (default: the recipe's; 0 = one per core).
        resume: Reuse the finished units of an interrupted run (--no-resume starts over).
        workspace: Workspace folder (default: the recipe's, else $FMKIT_WORKSPACE or ./fmkit-workspace).
    """
    rec = recipe if isinstance(recipe, CurateRecipe) else load_curate_recipe(recipe, overrides)
    where = str(recipe) if isinstance(recipe, (str, Path)) else "the recipe"
    if workers is not None:
        rec.workers = workers
    if workspace is not None:
        rec.workspace = str(workspace)
    specs = build_sources(rec.sources, where)
    blocks = build_blocks(rec.pipeline, where)
    ws = Workspace(rec.workspace or None)
    out = Path(rec.out) if rec.out else ws.path("datasets", rec.name)
    work = out / "_work"
    mh = MinHashConfig(rec.dedup.ngram, rec.dedup.bands, rec.dedup.rows, rec.dedup.seed, rec.dedup.jaccard)
    job = {"pipeline": rec.pipeline, "tokenizer": rec.mix.tokenizer, "minhash": asdict(mh),
           "minhash_on": rec.dedup.minhash, "work": str(work), "files_per_unit": rec.files_per_unit,
           "sources": [asdict(s) for s in specs]}
    job["fingerprint"] = hashlib.sha256(json.dumps(job, sort_keys=True, default=str).encode()).hexdigest()[:16]
    started = time.time()
    units = [u for i, s in enumerate(specs) for u in plan_units(i, s, rec.files_per_unit)]
    _prepare(out, work, job, resume)
    run_id = ws.start_run("curate", {"recipe": asdict(rec), "out": str(out)})
    try:
        stats, reused = _run_units(job, specs, units, rec)
        _check_usable(specs, stats)
        result = _finish(rec, specs, blocks, units, stats, out, work, mh)
        result["units"] = {"total": len(units), "reused_from_interrupted_run": reused}
    except BaseException as e:
        ws.finish_run(run_id, "interrupted" if isinstance(e, KeyboardInterrupt) else "failed", error=str(e)[:500])
        raise
    result["seconds"] = round(time.time() - started, 2)
    (out / MANIFEST).write_text(json.dumps(result, indent=2))
    art = ws.add_artifact("dataset", out, {"documents": result["output"]["documents"],
                                           "tokens": result["output"]["tokens"]})
    write_manifest(out, {"kind": "dataset", "id": art, "format": FORMAT, "name": rec.name,
                         "documents": result["output"]["documents"], "tokens": result["output"]["tokens"],
                         "recipe": asdict(rec), "run": run_id})
    ws.finish_run(run_id, outputs=[art])
    shutil.rmtree(work, ignore_errors=True)
    return out


def _prepare(out: Path, work: Path, job: dict, resume: bool) -> None:
    """Reuse finished units of an interrupted run of the same recipe; otherwise start clean."""
    stamp = work / "job.json"
    same = stamp.is_file() and json.loads(stamp.read_text()).get("fingerprint") == job["fingerprint"]
    if not (resume and same):
        if work.exists() and resume:
            status(f"curate: {out} holds work from a different recipe; starting over")
        shutil.rmtree(work, ignore_errors=True)
    for stale in ("data", "rejected", MANIFEST):
        p = out / stale
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(job, indent=1, default=str))


def _run_units(job, specs, units, rec) -> dict:
    work = Path(job["work"])
    stats = {}
    for u in units:
        done = work / f"{u.uid}.json"
        if done.is_file():
            stats[u.uid] = json.loads(done.read_text())
    todo = [(specs[u.source], u) for u in units if u.uid not in stats]
    if stats:
        status(f"curate: resuming, {len(stats)} of {len(units)} units already done")
    workers = rec.workers or os.cpu_count() or 1
    docs = sum(s["docs_in"] for s in stats.values())
    with progress_bar("curate", "units", "{task.fields[docs]:,} docs, {task.fields[rate]:,.0f} docs/s") as bar:
        task = bar.add_task("reading, filtering, signing", total=len(units), completed=len(stats), docs=docs,
                            rate=0.0)
        t0, last, fresh = time.time(), 0.0, 0

        def on_done(s):
            nonlocal docs, last, fresh
            stats[s["uid"]] = s
            docs += s["docs_in"]
            fresh += s["docs_in"]
            rate = fresh / max(time.time() - t0, 1e-9)
            bar.update(task, completed=len(stats), docs=docs, rate=rate)
            if time.time() - last > 10 or len(stats) == len(units):
                last = time.time()
                status(f"curate: {len(stats)}/{len(units)} units, {docs:,} documents, {rate:,.0f} docs/s")

        reused = len(stats)
        execute(job, todo, workers, rec.executor, on_done)
    return stats, reused


def _check_usable(specs, stats) -> None:
    """A source none of whose inputs could be read at all fails with one sentence naming it."""
    for spec in specs:
        mine = [s for s in stats.values() if s["source"] == spec.name]
        read_bad = Counter()
        for s in mine:
            read_bad.update(s["read_rejected"])
        docs_in = sum(s["docs_in"] for s in mine)
        if sum(read_bad.values()) == docs_in:
            why = ", ".join(f"{v} {k}" for k, v in read_bad.most_common()) or "no documents at all"
            raise FmkitError(f"source '{spec.name}' ({spec.path or spec.dataset}) has no usable documents: {why}")


def _read_columns(work: Path, units, columns) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [pq.read_table(work / f"{u.uid}.kept.parquet", columns=columns) for u in units]
    table = pa.concat_tables(tables) if tables else None
    return {c: (table.column(c) if table is not None else pa.array([])) for c in columns}


def _read_texts(work: Path, units, wanted: np.ndarray) -> list[str]:
    """The texts of the documents at `wanted` (indices into all units' kept rows, ascending), in that order."""
    import pyarrow.parquet as pq

    out, offset = [], 0
    for u in units:
        path = work / f"{u.uid}.kept.parquet"
        rows = pq.read_metadata(path).num_rows
        here = wanted[(wanted >= offset) & (wanted < offset + rows)] - offset
        if len(here):
            out += pq.read_table(path, columns=["text"]).column("text").take(here).to_pylist()
        offset += rows
    return out


def _finish(rec: CurateRecipe, specs, blocks, units, stats, out: Path, work: Path, mh: MinHashConfig) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = _read_columns(work, units, ["id", "source", "domain", "tokens", "exact_hash"]
                         + (["minhash"] if rec.dedup.minhash else []))
    ids = cols["id"].to_pylist()
    n = len(ids)
    # Stage 2: dedup. Roots are indices into the concatenation of all units in input order.
    exact_root = exact_clusters(cols["exact_hash"].to_numpy()) if rec.dedup.exact else np.arange(n)
    root = exact_root
    if rec.dedup.minhash and n:
        sigs = np.asarray(cols["minhash"].combine_chunks().flatten().to_numpy(), dtype=np.uint32).reshape(n, -1)
        near_root = minhash_clusters(sigs, mh, lambda wanted: _read_texts(work, units, wanted),
                                     skip=exact_root != np.arange(n))
        root = near_root[exact_root]
    removed = root != np.arange(n)
    cluster_size = np.bincount(root, minlength=n)
    in_cluster = cluster_size[root] > 1
    # Stage 3: mixing over the survivors' tokens per domain.
    domains = np.array(cols["domain"].to_pylist(), dtype=object)
    tokens = cols["tokens"].to_numpy()
    keep = ~removed
    before = {d: int(tokens[keep & (domains == d)].sum()) for d in sorted(set(domains[keep]))}
    rates = mix_rates(before, rec.mix.weights)
    copies = np.where(keep, repeats(ids, [rates.get(d, 1.0) for d in domains], rec.mix.seed), 0)
    # Stage 4: write output shards and rejected/.
    (out / "data").mkdir(parents=True, exist_ok=True)
    (out / "rejected").mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(out / "data", rec.shard_docs)
    dedup_rej, mix_rej = [], []
    offset = 0
    for u in units:
        table = pq.read_table(work / f"{u.uid}.kept.parquet")
        m = len(table)
        sl = slice(offset, offset + m)
        cid = [ids[r] if c else "" for r, c in zip(root[sl], in_cluster[sl])]
        table = table.drop_columns(["minhash", "exact_hash"]).append_column("cluster_id", pa.array(cid, pa.string()))
        rows_copies = copies[sl]
        pick = np.repeat(np.arange(m), rows_copies)
        if len(pick):
            writer.write(table.take(pick))
        for j in np.flatnonzero(removed[sl]):
            i = offset + j
            r = table.slice(int(j), 1).to_pylist()[0]
            dedup_rej.append(dict(id=r["id"], source=r["source"], domain=r["domain"],
                                  block="dedup_exact" if exact_root[i] != i else "dedup_minhash",
                                  reason="exact_duplicate" if exact_root[i] != i else "near_duplicate",
                                  location=r["location"], text=r["text"][:PREVIEW], duplicate_of=ids[root[i]]))
        for j in np.flatnonzero(~removed[sl] & (rows_copies == 0)):
            r = table.slice(int(j), 1).to_pylist()[0]
            mix_rej.append(dict(id=r["id"], source=r["source"], domain=r["domain"], block="mix",
                                reason="downsampled", location=r["location"], text=r["text"][:PREVIEW],
                                duplicate_of=""))
        (work / f"{u.uid}.rejected.parquet").replace(out / "rejected" / f"unit-{u.uid}.parquet")
        offset += m
    shards = writer.close()
    for name, rows in (("dedup", dedup_rej), ("mix", mix_rej)):
        pq.write_table(pa.Table.from_pylist(rows, schema=rejected_schema()), out / "rejected" / f"{name}.parquet")
    return _manifest(rec, specs, blocks, stats, domains, tokens, removed, exact_root, root, in_cluster, copies,
                     dedup_rej, mix_rej, before, rates, shards, cols, mh)


class _ShardWriter:
    def __init__(self, folder: Path, per_shard: int):
        self.folder, self.per_shard, self.shards, self.buf, self.count = folder, per_shard, [], [], 0

    def write(self, table) -> None:
        while len(table):
            room = self.per_shard - self.count
            self.buf.append(table.slice(0, room))
            self.count += min(room, len(table))
            table = table.slice(room)
            if self.count >= self.per_shard:
                self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.count:
            return
        name = f"part-{len(self.shards):05d}.parquet"
        pq.write_table(pa.concat_tables(self.buf), self.folder / name)
        self.shards.append({"file": f"data/{name}", "documents": self.count})
        self.buf, self.count = [], 0

    def close(self) -> list:
        self._flush()
        return self.shards


def _manifest(rec, specs, blocks, stats, domains, tokens, removed, exact_root, root, in_cluster, copies,
              dedup_rej, mix_rej, before, rates, shards, cols, mh) -> dict:
    n = len(domains)
    sources_col = np.array(cols["source"].to_pylist(), dtype=object)
    per_source = []
    for spec in specs:
        mine = [s for s in stats.values() if s["source"] == spec.name]
        rejected = Counter()
        for s in mine:
            for key, bs in s["blocks"].items():
                for k, v in bs.items():
                    if k.startswith("dropped:"):
                        rejected[f"{key.split(':', 1)[1]}: {k[8:]}"] += v
            for reason, v in s["read_rejected"].items():
                rejected[f"read: {reason}"] += v
        sel = sources_col == spec.name
        exact = int((removed & sel & (exact_root != np.arange(n))).sum())
        near = int((removed & sel).sum()) - exact
        down = int((~removed & sel & (copies == 0)).sum())
        if exact:
            rejected["dedup_exact: exact_duplicate"] += exact
        if near:
            rejected["dedup_minhash: near_duplicate"] += near
        if down:
            rejected["mix: downsampled"] += down
        docs_in = sum(s["docs_in"] for s in mine)
        kept = int((~removed & sel & (copies > 0)).sum())
        per_source.append({"name": spec.name, "type": spec.type, "path": spec.path or spec.dataset,
                           "domain": spec.domain or spec.name, "units": len(mine), "documents_in": docs_in,
                           "kept": kept, "rejected": sum(rejected.values()), "rejected_by": dict(rejected.most_common()),
                           "balanced": docs_in == kept + sum(rejected.values())})
    bad = [s["name"] for s in per_source if not s["balanced"]]
    if bad:  # an internal error, not a user mistake: every document must be accounted for
        raise RuntimeError(f"accounting mismatch for sources {bad}")
    block_list = []
    for i, b in enumerate(blocks):
        agg = Counter()
        for s in stats.values():
            agg.update(s["blocks"].get(f"{i}:{b.name}", {}))
        dropped = {k[8:]: v for k, v in sorted(agg.items(), key=lambda kv: -kv[1]) if k.startswith("dropped:")}
        block_list.append({"block": b.name, "params": b.params(), "seen": agg["seen"], "kept": agg["kept"],
                           "dropped": sum(dropped.values()), "dropped_by": dropped, "modified": agg["modified"]})
    counts = Counter()
    for s in stats.values():
        counts.update(s["counts"])
    sizes = np.bincount(root, minlength=n)
    exact_removed = int((removed & (exact_root != np.arange(n))).sum())
    after = Counter()
    for d, t, c in zip(domains, tokens, copies):
        after[d] += int(t) * int(c)
    total_after = sum(after.values()) or 1
    out_docs = int((copies > 0).sum())
    return {
        "format": FORMAT, "name": rec.name, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "documents_in": sum(s["documents_in"] for s in per_source), "sources": per_source, "blocks": block_list,
        "redactions": {k[4:]: v for k, v in sorted(counts.items()) if k.startswith("pii_")},
        "line_edits": {k: v for k, v in sorted(counts.items()) if k.startswith("c4_")},
        "dedup": {"exact": {"enabled": rec.dedup.exact, "removed": exact_removed},
                  "minhash": {"enabled": rec.dedup.minhash, **asdict(mh), "threshold": round(mh.threshold, 3),
                              "verified": "exact Jaccard with the survivor >= jaccard",
                              "removed": int(removed.sum()) - exact_removed,
                              "clusters": int((sizes > 1).sum()), "documents_in_clusters": int(in_cluster.sum()),
                              "largest_cluster": int(sizes.max()) if n else 0},
                  "survivor": "first document in input order; cluster_id is its id, and duplicate_of in "
                              "rejected/dedup.parquet"},
        "mix": {"weights": rec.mix.weights, "token_counter": rec.mix.tokenizer or "pre-tokenizer estimate",
                "tokens_before": before, "rates": {d: round(r, 4) for d, r in rates.items()},
                "tokens_after": dict(after), "share_after": {d: round(v / total_after, 4) for d, v in after.items()},
                "downsampled_documents": len(mix_rej), "repeated_rows": int(np.maximum(copies - 1, 0).sum())},
        "output": {"documents": out_docs, "rows": int(copies.sum()), "tokens": int(sum(after.values())),
                   "shards": shards, "rejected": "rejected/*.parquet"},
        "recipe": asdict(rec),
    }
