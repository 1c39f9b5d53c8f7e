"""Prometheus text exposition of the server's counters, gauges and histograms (format 0.0.4), without a client
library: a few dictionaries, rendered on each scrape of /metrics."""
from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def _escaped(value: str) -> str:
    """A label value as the text format wants it: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escaped(str(v))}"' for k, v in sorted(labels.items()))
    return "{" + inner + "}"


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.help: dict[str, tuple[str, str]] = {}
        self.values: dict[str, dict[tuple, float]] = defaultdict(lambda: defaultdict(float))
        self.hists: dict[str, dict[tuple, list]] = defaultdict(dict)
        self.buckets: dict[str, tuple] = {}
        self.gauges: dict[str, callable] = {}

    def counter(self, name: str, help: str) -> None:
        self.help[name] = ("counter", help)

    def histogram(self, name: str, help: str, buckets=LATENCY_BUCKETS) -> None:
        self.help[name], self.buckets[name] = ("histogram", help), buckets

    def gauge(self, name: str, help: str, read) -> None:
        """A gauge read at scrape time: `read()` returns {labels tuple: value} or a number."""
        self.help[name], self.gauges[name] = ("gauge", help), read

    def inc(self, name: str, amount: float = 1.0, **labels) -> None:
        with self.lock:
            self.values[name][tuple(sorted(labels.items()))] += amount

    def observe(self, name: str, value: float, **labels) -> None:
        key = tuple(sorted(labels.items()))
        with self.lock:
            h = self.hists[name].setdefault(key, [[0] * len(self.buckets[name]), 0.0, 0])
            for i, edge in enumerate(self.buckets[name]):
                if value <= edge:
                    h[0][i] += 1
            h[1] += value
            h[2] += 1

    def render(self) -> str:
        out = []
        with self.lock:
            for name, (kind, help) in self.help.items():
                out += [f"# HELP {name} {help}", f"# TYPE {name} {kind}"]
                if kind == "counter":
                    for key, v in self.values[name].items():
                        out.append(f"{name}{_labels(dict(key))} {v:g}")
                elif kind == "histogram":
                    for key, (counts, total, n) in self.hists[name].items():
                        labels = dict(key)
                        for edge, c in zip(self.buckets[name], counts):
                            out.append(f"{name}_bucket{_labels({**labels, 'le': f'{edge:g}'})} {c}")
                        out.append(f"{name}_bucket{_labels({**labels, 'le': '+Inf'})} {n}")
                        out.append(f"{name}_sum{_labels(labels)} {total:g}")
                        out.append(f"{name}_count{_labels(labels)} {n}")
                else:
                    read = self.gauges[name]()
                    for key, v in (read.items() if isinstance(read, dict) else [((), read)]):
                        out.append(f"{name}{_labels(dict(key))} {v:g}")
        return "\n".join(out) + "\n"
