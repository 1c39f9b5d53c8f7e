"""datatrove peer of bench/curate_throughput.py: Gopher quality + repetition filters, then MinHash dedup.

Runs with the interpreter of the environment built by bench/peers/datatrove_env.sh (never the project's .venv):

    python datatrove_pipeline.py --input CORPUS.jsonl --work WORKDIR --workers N --out RESULT.json

CORPUS.jsonl holds one {"id": str, "text": str} per line. The pipeline is datatrove's standard 4-stage MinHash
recipe (examples/minhash_deduplication.py) run by LocalPipelineExecutor, with the Gopher filters in front:

  split    the input is cut into N contiguous, size-balanced files so that N tasks all have work
  stage A  JsonlReader -> GopherQualityFilter() -> GopherRepetitionFilter() -> JsonlWriter(survivors)
           -> MinhashDedupSignature                                              (tasks = workers = N)
  stage B  MinhashDedupBuckets                                  (tasks = num_buckets = 14, workers = N)
  stage C  MinhashDedupCluster(save_cluster_id=True)                                       (1 task)
  stage D  JsonlReader(survivors) -> MinhashDedupFilter(load_cluster_ids=True, exclusion_writer)
           -> JsonlWriter(kept)                                                  (tasks = workers = N)

Filters use their defaults (language "eng": spaCy's rule-based English tokenizer, spacy.blank("en"), no model
download). MinHash uses datatrove's defaults, spelled out in MINHASH below: 5-word shingles, 14 buckets x 8 hashes,
seed 1, 64-bit xxhash (xxh64), TextNormConfig() (lowercase, numbers -> "0", punctuation -> space, whitespace
collapsed, diacritics stripped; weekday/month names untouched). Dropped documents go to exclusion writers (plain
JSONL, no compression) so that ids and reasons are known.

RESULT.json: {"seconds", "docs_in", "dropped": {"gopher_quality": {reason: n}, "gopher_repetition": {reason: n}},
"dedup_removed": [ids], "cluster_of": {id: cluster_id}, "kept", "stage_seconds": {...}} plus "dropped_ids",
"reader_skipped" (lines JsonlReader skips because their text is empty), "config" and "versions". "seconds" is
wall time from the start of the split to the end of stage D; reading the outputs back afterwards is not timed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections import Counter, defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the hub; never try to reach it

from datatrove.executor import LocalPipelineExecutor  # noqa: E402
from datatrove.pipeline.dedup.minhash import (  # noqa: E402
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter  # noqa: E402
from datatrove.pipeline.readers import JsonlReader  # noqa: E402
from datatrove.pipeline.writers import JsonlWriter  # noqa: E402
from datatrove.utils.hashing import HashConfig  # noqa: E402
from datatrove.utils.text import TextNormConfig  # noqa: E402

MINHASH = MinhashConfig(
    n_grams=5,
    num_buckets=14,
    hashes_per_bucket=8,
    seed=1,
    norm_config=TextNormConfig(),  # lowercase, norm_numbers, remove_punctuation, norm_whitespace, diacritics
    hash_config=HashConfig(precision=64, hash_fc="xxhash"),
)
MARKER = ".datatrove-peer-workdir"


def jsonl(name: str) -> JsonlWriter:
    return JsonlWriter(name, output_filename="${rank}.jsonl", compression=None)


def prepare_workdir(work: Path) -> None:
    """Start from an empty work dir: LocalPipelineExecutor skips tasks it finds completed there."""
    if work.exists() and any(work.iterdir()):
        if not (work / MARKER).exists():
            raise SystemExit(f"{work} is not empty and was not made by this script; refusing to clear it")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).touch()


def split_input(src: Path, dst: Path, parts: int) -> int:
    """Contiguous chunks of about equal bytes, one file per task (task r reads file r)."""
    lines = [ln for ln in src.read_bytes().splitlines(keepends=True) if ln.strip()]
    total = sum(len(ln) for ln in lines)
    dst.mkdir(parents=True)
    outs = [open(dst / f"{r:05d}.jsonl", "wb") for r in range(parts)]
    done = 0
    for ln in lines:
        r = min(parts - 1, done * parts // max(total, 1))
        outs[r].write(ln)
        done += len(ln)
    for f in outs:
        f.close()
    return len(lines)


def read_docs(folder: Path):
    for path in sorted(folder.glob("*.jsonl")):
        with open(path) as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)


def run_stage(name: str, executor: LocalPipelineExecutor, stage_seconds: dict) -> None:
    t = time.perf_counter()
    executor.run()
    stage_seconds[name] = time.perf_counter() - t
    incomplete = executor.get_incomplete_ranks()
    if incomplete:
        raise SystemExit(f"{name}: tasks {incomplete} did not complete; see {executor.logging_dir.path}/logs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--input", required=True, type=Path)
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--no-filters", action="store_true", help="MinHash dedup only (no Gopher filters)")
    args = ap.parse_args()
    n = max(1, args.workers)
    work = args.work.resolve()
    prepare_workdir(work)
    d = {k: str(work / k) for k in ("split", "filtered", "signatures", "buckets", "remove_ids", "kept", "logs")}
    d["drop_q"], d["drop_r"], d["removed"] = (str(work / "dropped" / k) for k in ("quality", "repetition", "dedup"))

    stage_seconds: dict[str, float] = {}
    t0 = time.perf_counter()

    t = time.perf_counter()
    docs_in = split_input(args.input, Path(d["split"]), n)
    stage_seconds["split"] = time.perf_counter() - t

    stage_a = LocalPipelineExecutor(
        pipeline=[
            JsonlReader(d["split"], id_key="id", text_key="text"),
            *([] if args.no_filters else [GopherQualityFilter(exclusion_writer=jsonl(d["drop_q"])),
                                          GopherRepetitionFilter(exclusion_writer=jsonl(d["drop_r"]))]),
            jsonl(d["filtered"]),
            MinhashDedupSignature(output_folder=d["signatures"], config=MINHASH),
        ],
        tasks=n, workers=n, logging_dir=f"{d['logs']}/a_filter_signature",
    )
    run_stage("a_filter_signature", stage_a, stage_seconds)
    # stage D's task r must read exactly what stage A's task r signed; a task whose docs were all dropped
    # writes no survivor file, which would shift the file -> task assignment
    for r in range(n):
        (Path(d["filtered"]) / f"{r:05d}.jsonl").touch()

    stage_b = LocalPipelineExecutor(
        pipeline=[MinhashDedupBuckets(input_folder=d["signatures"], output_folder=d["buckets"], config=MINHASH)],
        tasks=MINHASH.num_buckets, workers=n, logging_dir=f"{d['logs']}/b_buckets",
    )
    run_stage("b_buckets", stage_b, stage_seconds)

    stage_c = LocalPipelineExecutor(
        pipeline=[MinhashDedupCluster(input_folder=d["buckets"], output_folder=d["remove_ids"], config=MINHASH,
                                      save_cluster_id=True)],
        tasks=1, workers=1, logging_dir=f"{d['logs']}/c_cluster",
    )
    run_stage("c_cluster", stage_c, stage_seconds)

    stage_d = LocalPipelineExecutor(
        pipeline=[
            JsonlReader(d["filtered"], id_key="id", text_key="text"),
            MinhashDedupFilter(input_folder=d["remove_ids"], exclusion_writer=jsonl(d["removed"]),
                               load_cluster_ids=True),
            jsonl(d["kept"]),
        ],
        tasks=n, workers=n, logging_dir=f"{d['logs']}/d_dedup_filter",
    )
    run_stage("d_dedup_filter", stage_d, stage_seconds)
    seconds = time.perf_counter() - t0

    dropped: dict[str, Counter] = {"gopher_quality": Counter(), "gopher_repetition": Counter()}
    dropped_ids: dict[str, dict[str, list]] = {"gopher_quality": defaultdict(list),
                                               "gopher_repetition": defaultdict(list)}
    for key, folder in (("gopher_quality", d["drop_q"]), ("gopher_repetition", d["drop_r"])):
        for doc in read_docs(Path(folder)):
            reason = doc["metadata"].get("filter_reason", "unknown")
            dropped[key][reason] += 1
            dropped_ids[key][reason].append(doc["id"])
    cluster_of: dict[str, int] = {}
    removed = []
    for doc in read_docs(Path(d["removed"])):
        removed.append(doc["id"])
        cluster_of[doc["id"]] = doc["metadata"]["minhash_cluster_id"]
    kept = 0
    for doc in read_docs(Path(d["kept"])):
        kept += 1
        if doc["metadata"].get("minhash_cluster_id", -1) != -1:
            cluster_of[doc["id"]] = doc["metadata"]["minhash_cluster_id"]

    from importlib.metadata import version

    result = {
        "seconds": seconds,
        "docs_in": docs_in,
        "dropped": {k: dict(v) for k, v in dropped.items()},
        "dedup_removed": sorted(removed),
        "cluster_of": dict(sorted(cluster_of.items())),
        "kept": kept,
        "stage_seconds": stage_seconds,
        "dropped_ids": {k: {r: sorted(ids) for r, ids in v.items()} for k, v in dropped_ids.items()},
        "config": {
            "workers": n,
            "minhash": {"n_grams": MINHASH.n_grams, "num_buckets": MINHASH.num_buckets,
                        "hashes_per_bucket": MINHASH.hashes_per_bucket, "seed": MINHASH.seed,
                        "hash_precision": MINHASH.hash_config.precision, "hash_fc": MINHASH.hash_config.hash_fc,
                        "norm": vars(MINHASH.norm_config)},
            "gopher": "GopherQualityFilter() and GopherRepetitionFilter() defaults, language eng",
            "word_tokenizer": "datatrove SpaCyTokenizer('en') = spacy.blank('en')",
        },
        "versions": {p: version(p) for p in ("datatrove", "spacy", "xxhash", "numpy")},
    }
    # JsonlReader silently skips lines whose text is empty; they reach no filter and no output
    result["reader_skipped"] = docs_in - sum(sum(c.values()) for c in dropped.values()) - len(removed) - kept
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"seconds": seconds, "docs_in": docs_in, "kept": kept, "dedup_removed": len(removed),
                      "reader_skipped": result["reader_skipped"],
                      "dropped": result["dropped"], "stage_seconds": stage_seconds}))


if __name__ == "__main__":
    main()
