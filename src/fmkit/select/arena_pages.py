"""The arena's two pages, each one self-contained HTML file (its CSS and script inline; nothing fetched from
elsewhere, so they work on a machine without a network). The API they call is described in arena_app.py."""
from __future__ import annotations

STYLE = """
:root { font-family: system-ui, sans-serif; color: #1d2330; background: #f6f7f9; }
body { margin: 0 auto; max-width: 1100px; padding: 0 16px 32px; }
header { display: flex; gap: 16px; align-items: center; padding: 12px 0; border-bottom: 1px solid #d8dce3; }
header h1 { font-size: 20px; margin: 0; flex: 1; }
a { color: #2456c7; }
textarea { width: 100%; box-sizing: border-box; min-height: 70px; font: inherit; padding: 8px; }
input { font: inherit; padding: 4px 8px; }
button { font: inherit; padding: 6px 14px; border: 1px solid #9aa4b5; border-radius: 6px; background: #fff;
         cursor: pointer; }
button:disabled { opacity: .45; cursor: default; }
button.primary { background: #2456c7; color: #fff; border-color: #2456c7; }
.row { display: flex; gap: 8px; align-items: center; margin: 8px 0; flex-wrap: wrap; }
.answers { display: grid; grid-template-columns: 1fr 1fr; gap: 16px; margin: 16px 0; }
.answer { background: #fff; border: 1px solid #d8dce3; border-radius: 8px; padding: 12px; min-height: 160px; }
.answer h2 { font-size: 15px; margin: 0 0 8px; }
.answer pre { white-space: pre-wrap; word-wrap: break-word; font: 14px/1.45 ui-monospace, monospace; margin: 0; }
.identity { font-weight: 600; color: #0b7a3e; min-height: 1.4em; margin: 8px 0 0; }
.error { color: #b3261e; }
#status { min-height: 1.4em; }
table { border-collapse: collapse; margin: 8px 0 20px; background: #fff; }
th, td { border: 1px solid #d8dce3; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.muted { color: #667085; }
"""

ARENA_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fmkit arena</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>""" + STYLE + """</style></head>
<body>
<header><h1>fmkit arena</h1><a href="/ratings">ratings</a>
  <label>voter <input id="voter" autocomplete="username" placeholder="your name or key"></label></header>
<p class="muted">Two anonymous models answer the same prompt. Vote for the better answer; their names are shown
after the vote.</p>
<textarea id="prompt" placeholder="Type a prompt"></textarea>
<div class="row"><button id="ask" class="primary">Ask both</button><button id="draw" hidden>Draw a prompt</button>
</div>
<div class="answers">
  <div class="answer"><h2>Model A</h2><pre id="answer-a"></pre><p class="identity" id="who-a"></p></div>
  <div class="answer"><h2>Model B</h2><pre id="answer-b"></pre><p class="identity" id="who-b"></p></div>
</div>
<div class="row" id="votes">
  <button data-winner="a" disabled>A is better</button><button data-winner="b" disabled>B is better</button>
  <button data-winner="tie" disabled>Tie</button><button data-winner="both_bad" disabled>Both are bad</button>
  <button id="next" hidden>Next round</button>
</div>
<p id="status" role="status"></p>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const voteButtons = [...document.querySelectorAll("#votes [data-winner]")];
let round = null, finished = {a: false, b: false}, streams = [];
$("voter").value = localStorage.getItem("fmkit-arena-voter") || "";
$("voter").addEventListener("change", () => localStorage.setItem("fmkit-arena-voter", $("voter").value.trim()));

function say(text, isError) { $("status").textContent = text; $("status").className = isError ? "error" : ""; }

async function api(path, body) {
  const init = body === undefined ? {} :
    {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  const r = await fetch(path, init);
  const doc = await r.json();
  if (!r.ok) throw new Error(doc.error ? doc.error.message : r.statusText);
  return doc;
}

function canVote(on) { voteButtons.forEach((b) => { b.disabled = !on; }); }

function stream(side, id) {
  const el = $("answer-" + side);
  el.textContent = "";
  el.classList.remove("error");
  const es = new EventSource("/api/rounds/" + encodeURIComponent(id) + "/" + side);
  streams.push(es);
  es.onmessage = (e) => { if (id === round) el.textContent += JSON.parse(e.data).text; };
  es.addEventListener("done", (e) => {
    es.close();
    if (id !== round) return;
    const d = JSON.parse(e.data);
    el.textContent = d.answer;
    if (d.error) {
      el.textContent += (d.answer ? "\\n" : "") + "[no answer: " + d.error + "]";
      el.classList.add("error");
    }
    finished[side] = true;
    if (finished.a && finished.b) { canVote(true); say("Both answers are in: which is better?"); }
  });
  es.onerror = () => { es.close(); if (id === round && !finished[side]) say("the answer stream broke off", true); };
}

async function ask() {
  const voter = $("voter").value.trim();
  if (!voter) { say("Enter your name (or voter key) first.", true); $("voter").focus(); return; }
  localStorage.setItem("fmkit-arena-voter", voter);
  $("ask").disabled = true;
  try {
    const r = await api("/api/rounds", {prompt: $("prompt").value, voter: voter});
    round = r.round;
    finished = {a: false, b: false};
    $("prompt").value = r.prompt;
    $("who-a").textContent = ""; $("who-b").textContent = "";
    canVote(false);
    $("next").hidden = true;
    say("Answering...");
    stream("a", r.round); stream("b", r.round);
  } catch (e) { say(e.message, true); $("ask").disabled = false; }
}

async function vote(winner) {
  canVote(false);
  try {
    const r = await api("/api/votes", {round: round, winner: winner, voter: $("voter").value.trim()});
    $("who-a").textContent = r.model_a; $("who-b").textContent = r.model_b;
    say("Vote " + r.vote + " recorded (" + r.votes + " in all). A was " + r.model_a + ", B was " + r.model_b + ".");
    $("next").hidden = false;
  } catch (e) { say(e.message, true); canVote(true); }
}

async function next() {
  streams.forEach((es) => es.close()); streams = [];
  round = null;
  ["a", "b"].forEach((s) => { $("answer-" + s).textContent = ""; $("who-" + s).textContent = ""; });
  $("next").hidden = true; $("ask").disabled = false; $("prompt").value = "";
  say("");
  if (!$("draw").hidden) await draw();
  $("prompt").focus();
}

async function draw() {
  try { $("prompt").value = (await api("/api/prompt")).prompt; } catch (e) { say(e.message, true); }
}

$("ask").addEventListener("click", ask);
$("draw").addEventListener("click", draw);
$("next").addEventListener("click", next);
voteButtons.forEach((b) => b.addEventListener("click", () => vote(b.dataset.winner)));
api("/api/config").then((c) => {
  $("draw").hidden = !c.prompts;
  if (c.voter_keys) $("voter").placeholder = "your voter key";
  document.body.dataset.ready = "1";
});
</script>
</body></html>
"""

RATINGS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fmkit arena: ratings</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>""" + STYLE + """</style></head>
<body>
<header><h1>fmkit arena: ratings</h1><a href="/">vote</a>
  <label><input type="checkbox" id="length"> length control</label><button id="refresh">Refresh</button></header>
<p class="muted">Bradley–Terry ratings from the votes (ties and "both bad" are half a win each), on the Elo scale:
a 400-point gap is 10:1 odds. Intervals: 95% bootstrap over votes. With length control, the answers' length
difference is fitted beside the ratings, so that no model is rated up only for longer answers.</p>
<div id="summary"></div>
<h2>Ratings</h2><table id="ratings"></table>
<h2>Win rates (row beat column)</h2><table id="winrates"></table>
<h2>Position bias</h2><table id="position"></table>
<h2>Rejected votes</h2><table id="rejected"></table>
<h2>Model as judge</h2><div id="judges"></div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const fmt = (x, d) => (x === null || x === undefined) ? "–" : Number(x).toFixed(d);
function table(el, head, rows) {
  el.replaceChildren();
  const tr = (cells, tag) => {
    const r = document.createElement("tr");
    cells.forEach((c) => { const td = document.createElement(tag); td.textContent = c; r.appendChild(td); });
    return r;
  };
  el.appendChild(tr(head, "th"));
  rows.forEach((row) => el.appendChild(tr(row, "td")));
}
async function load() {
  const r = await fetch("/api/ratings?length_control=" + $("length").checked);
  const d = await r.json();
  const o = d.outcomes;
  $("summary").textContent = d.votes + " votes: A " + o.a + ", B " + o.b + ", tie " + o.tie + ", both bad " +
    o.both_bad + "; voters: " + Object.entries(d.voters).map(([k, v]) => k + " " + v).join(", ") +
    (d.length_coefficient === null ? "" : "; length coefficient " + fmt(d.length_coefficient, 3));
  table($("ratings"), ["rank", "model", "rating", "95% interval", "votes"],
        d.ratings.map((x, i) => [i + 1, x.model, fmt(x.rating, 0), fmt(x.ci[0], 0) + " – " + fmt(x.ci[1], 0),
                                 x.votes]));
  const models = d.ratings.map((x) => x.model);
  table($("winrates"), ["", ...models], models.map((a) => [a, ...models.map((b) =>
        a === b ? "" : fmt(d.win_rates[a][b], 2))]));
  const p = d.position_bias;
  table($("position"), ["left (A) wins", "right (B) wins", "left share", "p-value"],
        [[p.left_wins, p.right_wins, fmt(p.left_share, 3), fmt(p.p_value, 4)]]);
  table($("rejected"), ["reason", "count"], Object.entries(d.rejected));
  $("judges").replaceChildren();
  Object.entries(d.judges).forEach(([name, j]) => {
    const h = document.createElement("h3"); h.textContent = name; $("judges").appendChild(h);
    const t = document.createElement("table"); $("judges").appendChild(t);
    table(t, ["judged", "agreement", "decisive votes", "agreement on them", "kappa"],
          [[j.judged, fmt(j.agreement, 3), j.decisive, fmt(j.decisive_agreement, 3), fmt(j.kappa, 3)]]);
    const t2 = document.createElement("table"); $("judges").appendChild(t2);
    table(t2, ["judge's rating", "rating", "95% interval"],
          j.ratings.map((x) => [x.model, fmt(x.rating, 0), fmt(x.ci[0], 0) + " – " + fmt(x.ci[1], 0)]));
  });
  document.body.dataset.votes = d.votes;
}
$("refresh").addEventListener("click", load);
$("length").addEventListener("change", load);
load();
setInterval(load, 10000);
</script>
</body></html>
"""
