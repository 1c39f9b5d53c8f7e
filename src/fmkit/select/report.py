"""A compare run for people: the terminal table, and report.html, one self-contained file (inline CSS and SVG
plots, no scripts, nothing fetched) with the pick, every metric with its interval, cost and latency, the paired
tests, the Pareto plots and the side-by-side outputs of the items where candidates disagree.

Every number in the page carries `data-key`, naming where it is in results.json, so a test can read the rendered
page and check it against the file.
"""
from __future__ import annotations

import html
import json
import math
from pathlib import Path

from rich.table import Table

from ..progress import console

CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right;
vertical-align:top}th{background:#f4f4f4}td.l,th.l{text-align:left}.pick{background:#e8f5e9;font-weight:600}
.sig{color:#b00020;font-weight:600}.why li{margin:.2em 0}pre{white-space:pre-wrap;margin:0;max-width:34em;
font-size:12px}.pass{background:#e8f5e9}.fail{background:#fdecea}svg{background:#fff;border:1px solid #eee;
margin:.3em}.small{color:#666;font-size:12px}"""
COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]


def num(x, digits: int = 4) -> str:
    """How a number is written in the table and the page (the test reads it back the same way)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def pval(p: float) -> str:
    return f"{p:.3g}"


def headline(r: dict) -> list[str]:
    """Each suite's first metric: the columns of the terminal table (report.html shows them all)."""
    seen, out = set(), []
    for m in r["metrics"]:
        if m.split("/")[0] not in seen:
            seen.add(m.split("/")[0])
            out.append(m)
    return out


def print_table(r: dict) -> None:
    """The candidates table and the paired tests on its metrics, on stderr (stdout stays free for --json)."""
    pick = r["pick"]["candidate"]
    shown = headline(r)
    t = Table(title=f"fmkit compare: {len(r['candidates'])} candidates on {', '.join(r['suites'])} (95% intervals)")
    t.add_column("candidate", justify="left")
    for m in shown:
        t.add_column(m, justify="right")
    for col in ("USD/item", "p50 ms", "p95 ms", "failures"):
        t.add_column(col, justify="right")
    for name, s in r["candidates"].items():
        cells = []
        for m in shown:
            v = s["metrics"].get(m)
            cells.append(f"{num(v['value'], 3)} [{num(v['ci'][0], 3)}, {num(v['ci'][1], 3)}]" if v else "-")
        fails = ", ".join(f"{k} {n}" for k, n in s["failures"]["by_reason"].items()) or "0"
        t.add_row(("* " if name == pick else "") + name, *cells, f"{s['cost']['per_item']:.6f}",
                  num(s["latency_ms"]["p50"], 1), num(s["latency_ms"]["p95"], 1), fails)
    console.print(t)
    for test in (x for x in r["tests"] if x["metric"] in shown or x["test"] == "sign"):
        verdict = "significant" if test["significant"] else f"not significant (MDE {num(test['mde'], 3)})"
        console.print(f"  {test['metric']}: {test['b']} - {test['a']} = {test['diff']:+.3f} "
                      f"[{test['ci'][0]:+.3f}, {test['ci'][1]:+.3f}], {test['test']} p = {pval(test['p_value'])}, "
                      f"Holm p = {pval(test['p_holm'])}: {verdict}", highlight=False, soft_wrap=True)
    console.print("pick: " + (pick or "none") + " (" + "; ".join(r["pick"]["why"]) + ")", highlight=False,
                  soft_wrap=True)
    console.print(f"report: {Path(r['run']) / 'report.html'}, results: {Path(r['run']) / 'results.json'}",
                  highlight=False, soft_wrap=True)


def _cell(value, key: str, digits: int = 4, cls: str = "") -> str:
    text = num(value, digits) if not isinstance(value, str) else value
    return f'<td class="{cls}" data-key="{html.escape(key)}">{html.escape(text)}</td>'


def _bars(r: dict, metric: str) -> str:
    """Horizontal bars with 95% whiskers, one per candidate."""
    rows = [(c, s["metrics"][metric]) for c, s in r["candidates"].items() if metric in s["metrics"]]
    top = max([1.0] + [v["ci"][1] for _, v in rows if not math.isnan(v["ci"][1])]) if all(
        v["kind"] == "binary" for _, v in rows) else max(v["ci"][1] for _, v in rows) or 1.0
    w, left, h = 420, 120, 22
    x = lambda v: left + (w - left - 20) * (0 if math.isnan(v) else max(0.0, v) / top)
    parts = [f'<svg width="{w}" height="{h * len(rows) + 30}" role="img" aria-label="{html.escape(metric)}">',
             f'<text x="4" y="14" font-size="12" font-weight="600">{html.escape(metric)}</text>']
    for i, (c, v) in enumerate(rows):
        y = 22 + i * h
        colour = COLOURS[i % len(COLOURS)]
        parts += [f'<text x="4" y="{y + 13}" font-size="11">{html.escape(c[:16])}</text>',
                  f'<rect x="{left}" y="{y + 3}" width="{x(v["value"]) - left:.1f}" height="{h - 8}" '
                  f'fill="{colour}" opacity="0.75"/>',
                  f'<line x1="{x(v["ci"][0]):.1f}" x2="{x(v["ci"][1]):.1f}" y1="{y + h / 2 - 1}" '
                  f'y2="{y + h / 2 - 1}" stroke="#000"/>',
                  f'<text x="{min(x(v["ci"][1]) + 4, w - 40):.1f}" y="{y + 13}" font-size="10">'
                  f'{num(v["value"], 3)}</text>']
    return "".join(parts) + "</svg>"


def _scatter(rows: list[dict], xkey: str, xlabel: str) -> str:
    """Quality against cost or latency; Pareto candidates ringed."""
    pts = [p for p in rows if p.get(xkey) is not None and not math.isnan(p[xkey])]
    if not pts:
        return ""
    w, h, pad = 360, 240, 40
    xs, ys = [p[xkey] for p in pts], [p["quality"] for p in pts]
    span = lambda v: (min(v), max(v)) if max(v) > min(v) else (min(v) - 0.5, max(v) + 0.5)
    (x0, x1), (y0, y1) = span(xs), span(ys)
    sx = lambda v: pad + (w - 2 * pad) * (v - x0) / (x1 - x0)
    sy = lambda v: h - pad - (h - 2 * pad) * (v - y0) / (y1 - y0)
    parts = [f'<svg width="{w}" height="{h}" role="img" aria-label="quality vs {xlabel}">',
             f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#999"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="#999"/>',
             f'<text x="{w / 2}" y="{h - 8}" font-size="11" text-anchor="middle">{html.escape(xlabel)}</text>',
             f'<text x="10" y="{pad - 12}" font-size="11">quality</text>']
    for i, p in enumerate(pts):
        cx, cy = sx(p[xkey]), sy(p["quality"])
        parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="6" fill="{COLOURS[i % len(COLOURS)]}"'
                     + (' stroke="#000" stroke-width="2"' if p["pareto"] else "") + "/>")
        parts.append(f'<text x="{cx + 8:.1f}" y="{cy + 4:.1f}" font-size="11">{html.escape(p["candidate"])}</text>')
    return "".join(parts) + "</svg>"


def _disagreements(r: dict, samples: list[dict], limit: int = 60) -> str:
    """Items whose first metric differs between candidates, their outputs side by side."""
    names = list(r["candidates"])
    by_item: dict = {}
    for s in samples:
        by_item.setdefault((s["suite"], s["id"]), {})[s["candidate"]] = s
    first = {m.split("/")[0]: m.split("/", 1)[1] for m in reversed(r["metrics"])}
    rows, shown = [], 0
    for (suite, id_), per in by_item.items():
        metric = first.get(suite)
        vals = {c: per[c]["scores"].get(metric) for c in names if c in per}
        if metric is None or len({v for v in vals.values() if v is not None}) < 2:
            continue
        shown += 1
        if shown > limit:
            continue
        some = next(iter(per.values()))
        text = some["input"] if isinstance(some["input"], str) else json.dumps(some["input"], ensure_ascii=False)
        cells = "".join(f'<td class="l {"pass" if (vals.get(c) or 0) >= 1 else "fail"}"><pre>'
                        f'{html.escape(str(per[c].get("output") or per[c].get("failure") or ""))[:2000]}</pre>'
                        f'<span class="small">{metric} = {num(vals.get(c), 2)}</span></td>' for c in names)
        rows.append(f'<tr><td class="l">{html.escape(suite)}/{html.escape(id_)}</td><td class="l"><pre>'
                    f'{html.escape(text[:1500])}</pre></td>{cells}</tr>')
    if not rows:
        return "<p>The candidates agree on every item.</p>"
    more = f"<p class='small'>{shown - limit} more in samples.jsonl</p>" if shown > limit else ""
    head = "".join(f"<th class='l'>{html.escape(c)}</th>" for c in names)
    return (f"<p>{shown} item(s) where the candidates' scores differ.</p><table><tr><th class='l'>item</th>"
            f"<th class='l'>input</th>{head}</tr>{''.join(rows)}</table>{more}")


def write_html(r: dict, samples: list[dict], path: Path) -> Path:
    pick = r["pick"]
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>fmkit compare</title><style>{CSS}</style>"
           f"</head><body><h1>fmkit compare: {len(r['candidates'])} candidates on {html.escape(', '.join(r['suites']))}"
           "</h1>", f"<h2>Pick</h2><p id='pick' data-key='pick.candidate'>{html.escape(str(pick['candidate']))}</p>",
           "<ul class='why'>" + "".join(f"<li>{html.escape(w)}</li>" for w in pick["why"]) + "</ul>"]
    cols = "".join(f"<th>{html.escape(m)}</th>" for m in r["metrics"])
    out.append(f"<h2>Candidates</h2><table id='candidates'><tr><th class='l'>candidate</th>{cols}<th>cost/item USD"
               "</th><th>cost total</th><th>latency p50 ms</th><th>p95 ms</th><th>completion tokens/item</th>"
               "<th class='l'>failures</th></tr>")
    for c, s in r["candidates"].items():
        k = f"candidates.{c}"
        cells = "".join(
            (_cell(s["metrics"][m]["value"], f"{k}.metrics.{m}.value")[:-5]
             + f"<br><span class='small'>[<span data-key='{html.escape(k)}.metrics.{html.escape(m)}.ci.0'>"
             f"{num(s['metrics'][m]['ci'][0])}</span>, <span data-key='{html.escape(k)}.metrics.{html.escape(m)}"
             f".ci.1'>{num(s['metrics'][m]['ci'][1])}</span>]</span></td>") if m in s["metrics"] else "<td>-</td>"
            for m in r["metrics"])
        fails = ", ".join(f"{w} {n}" for w, n in s["failures"]["by_reason"].items()) or "none"
        out.append(f"<tr class='{'pick' if c == pick['candidate'] else ''}'><td class='l'>{html.escape(c)}</td>{cells}"
                   + _cell(s["cost"]["per_item"], f"{k}.cost.per_item", 6) + _cell(s["cost"]["total"],
                                                                                   f"{k}.cost.total", 6)
                   + _cell(s["latency_ms"]["p50"], f"{k}.latency_ms.p50", 1)
                   + _cell(s["latency_ms"]["p95"], f"{k}.latency_ms.p95", 1)
                   + _cell(s["tokens"]["completion_per_item"], f"{k}.tokens.completion_per_item", 1)
                   + f"<td class='l'>{html.escape(fails)}</td></tr>")
    out.append("</table>")
    out.append("<h2>Metrics (95% intervals)</h2>" + "".join(_bars(r, m) for m in r["metrics"]))
    out.append("<h2>Quality, cost and latency</h2><p class='small'>quality = "
               f"{html.escape(pick['metric'])}; ringed: the Pareto set</p>"
               + _scatter(r["pareto"], "cost_per_item", "cost per item (USD)")
               + _scatter(r["pareto"], "latency_p95_ms", "latency p95 (ms)"))
    out.append("<table id='pareto'><tr><th class='l'>candidate</th><th>quality</th><th>cost/item</th><th>p95 ms</th>"
               "<th>Pareto</th></tr>" + "".join(
                   f"<tr><td class='l'>{html.escape(p['candidate'])}</td>{_cell(p['quality'], f'pareto.{i}.quality')}"
                   f"{_cell(p['cost_per_item'], f'pareto.{i}.cost_per_item', 6)}"
                   f"{_cell(p['latency_p95_ms'], f'pareto.{i}.latency_p95_ms', 1)}<td>{'yes' if p['pareto'] else ''}"
                   "</td></tr>" for i, p in enumerate(r["pareto"])) + "</table>")
    out.append("<h2>Paired tests</h2><p class='small'>diff = B − A on the items both answered; McNemar (exact) for "
               "pass/fail metrics, paired bootstrap for continuous scores, sign test for judge preferences; Holm's "
               "correction over all rows; MDE = the smallest difference detectable with 80% power at alpha 0.05."
               "</p><table id='tests'><tr><th class='l'>metric</th><th class='l'>A</th><th class='l'>B</th><th>n</th>"
               "<th>A</th><th>B</th><th>diff</th><th>95% CI</th><th class='l'>test</th><th>p</th><th>Holm p</th>"
               "<th>MDE</th></tr>")
    for i, t in enumerate(r["tests"]):
        k = f"tests.{i}"
        out.append(f"<tr><td class='l'>{html.escape(t['metric'])}</td><td class='l'>{html.escape(t['a'])}</td>"
                   f"<td class='l'>{html.escape(t['b'])}</td>{_cell(t['n'], f'{k}.n')}"
                   f"{_cell(t['a_value'], f'{k}.a_value')}{_cell(t['b_value'], f'{k}.b_value')}"
                   f"{_cell(t['diff'], f'{k}.diff')}<td>[{num(t['ci'][0])}, {num(t['ci'][1])}]</td>"
                   f"<td class='l'>{t['test']}</td>{_cell(pval(t['p_value']), f'{k}.p_value')}"
                   f"{_cell(pval(t['p_holm']), f'{k}.p_holm', cls='sig' if t['significant'] else '')}"
                   f"{_cell(t['mde'], f'{k}.mde')}</tr>")
    out.append("</table><h2>Where the candidates disagree</h2>" + _disagreements(r, samples))
    out.append(f"<p class='small'>run {html.escape(r['run'])}; {r['created']}</p></body></html>")
    Path(path).write_text("".join(out), encoding="utf-8")
    return Path(path)
