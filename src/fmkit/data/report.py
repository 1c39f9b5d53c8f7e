"""`fmkit curate report DATASET`: a table in the terminal, and report.png / report.html in the dataset folder."""
from __future__ import annotations

import base64
import html
from pathlib import Path

from rich.table import Table

from ..progress import report as console
from ..workspace import locate
from .dataset import dataset_manifest


def _tables(m: dict) -> list[tuple[str, list[str], list[list]]]:
    src = [[s["name"], s["domain"], s["documents_in"], s["kept"], s["rejected"],
            "yes" if s["balanced"] else "NO"] for s in m["sources"]]
    reasons = [[s["name"], why, n] for s in m["sources"] for why, n in s["rejected_by"].items()]
    blocks = [[b["block"], b["seen"], b["kept"], b["dropped"], b["modified"],
               ", ".join(f"{k} {v}" for k, v in list(b["dropped_by"].items())[:4])] for b in m["blocks"]]
    mh = m["dedup"]["minhash"]
    verified = f", exact Jaccard >= {mh['jaccard']}" if "jaccard" in mh else ""   # older datasets: LSH only
    dedup = [["exact", m["dedup"]["exact"]["removed"], "", ""],
             ["minhash", mh["removed"], mh["clusters"], f"{mh['ngram']}-grams, {mh['bands']}x{mh['rows']} LSH "
              f"(~{mh['threshold']} Jaccard){verified}"]]
    mix = m["mix"]
    domains = sorted(set(mix["tokens_before"]) | set(mix["tokens_after"]))
    mixes = [[d, mix["tokens_before"].get(d, 0), mix["weights"].get(d, ""), mix["rates"].get(d, ""),
              mix["tokens_after"].get(d, 0), f"{mix['share_after'].get(d, 0):.1%}"] for d in domains]
    pii = [[k, v] for k, v in m["redactions"].items()]
    return [
        ("sources (documents in = kept + rejected)", ["source", "domain", "in", "kept", "rejected", "balanced"], src),
        ("rejected by reason", ["source", "block: reason", "documents"], reasons),
        ("blocks", ["block", "seen", "kept", "dropped", "modified", "top reasons"], blocks),
        ("deduplication", ["method", "removed", "clusters", "settings"], dedup),
        (f"mix ({mix['token_counter']} tokens)", ["domain", "tokens before", "weight", "rate", "tokens after",
                                                   "share"], mixes),
        ("PII redactions", ["type", "count"], pii),
    ]


def _plot(m: dict, folder: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import pyarrow.parquet as pq

    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    reasons = {}
    for s in m["sources"]:
        for k, v in s["rejected_by"].items():
            reasons[k] = reasons.get(k, 0) + v
    top = sorted(reasons.items(), key=lambda kv: kv[1])[-15:]
    axes[0].barh([k for k, _ in top], [v for _, v in top], color="tab:red")
    axes[0].set_title("documents removed, by block: reason")
    axes[0].tick_params(axis="y", labelsize=7)
    kept = np.concatenate([pq.read_table(folder / s["file"], columns=["chars"]).column("chars").to_numpy()
                           for s in m["output"]["shards"]] or [np.zeros(0)])
    rej = np.concatenate([np.array([len(t) for t in pq.read_table(p, columns=["text"]).column("text").to_pylist()])
                          for p in sorted((folder / "rejected").glob("*.parquet"))] or [np.zeros(0)])
    bins = np.logspace(0, 7, 50)
    axes[1].hist([np.maximum(kept, 1), np.maximum(rej, 1)], bins=bins, label=["kept", "rejected (preview)"],
                 color=["tab:green", "tab:red"], alpha=0.8)
    axes[1].set_xscale("log")
    axes[1].set_xlabel("characters per document")
    axes[1].set_title("document lengths")
    axes[1].legend()
    mix = m["mix"]
    domains = sorted(set(mix["tokens_before"]) | set(mix["tokens_after"]))
    x = np.arange(len(domains))
    axes[2].bar(x - 0.2, [mix["tokens_before"].get(d, 0) for d in domains], 0.4, label="after dedup")
    axes[2].bar(x + 0.2, [mix["tokens_after"].get(d, 0) for d in domains], 0.4, label="after mixing")
    axes[2].set_xticks(x, domains, rotation=30, ha="right")
    axes[2].set_title("tokens per domain")
    axes[2].legend()
    fig.suptitle(f"{m['name']}: {m['documents_in']:,} documents in, {m['output']['documents']:,} kept")
    fig.tight_layout()
    png = folder / "report.png"
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png


def curate_report(dataset: str | Path, workspace: str | Path | None = None) -> tuple[Path, Path]:
    """Summarise a dataset: its accounting as tables, plus report.png and report.html next to its manifest.

    Args:
        dataset: A curated dataset folder, or its name in the workspace's datasets/.
        workspace: Workspace folder where a bare dataset name is looked up.
    """
    folder = locate(dataset, "datasets", workspace)
    m = dataset_manifest(folder)
    parts = [f"<h1>{html.escape(m['name'])}</h1><p>{m['documents_in']:,} documents in, "
             f"{m['output']['documents']:,} kept ({m['output']['tokens']:,} tokens), "
             f"{m['seconds']} s</p>"]
    for title, cols, rows in _tables(m):
        t = Table(title=title)
        for c in cols:
            t.add_column(c)
        for r in rows:
            t.add_row(*[f"{v:,}" if isinstance(v, int) else str(v) for v in r])
        console.print(t)
        parts.append(f"<h2>{html.escape(title)}</h2><table border=1 cellpadding=4><tr>"
                     + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>"
                     + "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r) + "</tr>"
                               for r in rows) + "</table>")
    png = _plot(m, folder)
    parts.insert(1, f'<img src="data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}" width="100%">')
    page = folder / "report.html"
    page.write_text("<!doctype html><meta charset=utf-8><title>fmkit curate report</title>"
                    "<body style='font-family:sans-serif'>" + "\n".join(parts) + "</body>")
    return png, page
