"""Metrics: process-local counters and gauges rendered in the Prometheus text format."""

from __future__ import annotations

from collections import Counter


class Metrics:
    def __init__(self):
        self._counters: Counter[tuple[str, tuple[tuple[str, str], ...]]] = Counter()
        self._gauges: Counter[str] = Counter()

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        self._counters[(name, tuple(sorted(labels.items())))] += amount

    def gauge_add(self, name: str, delta: float, **labels: str) -> None:
        """A level that goes up and down (open streams)."""
        self._gauges[name] += delta

    def gauge_set(self, name: str, value: float, **labels: str) -> None:
        self._gauges[name] = value

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        """One sample of a latency histogram (seconds)."""
        self.inc(name + "_count", 1, **labels)
        self.inc(name + "_sum", seconds, **labels)

    def value(self, name: str, **labels: str) -> float:
        return self._counters[(name, tuple(sorted(labels.items())))]

    def render(self) -> str:
        lines = []
        seen = set()
        for (name, labels), value in sorted(self._counters.items()):
            if name not in seen:
                lines.append(f"# TYPE mcpgw_{name} counter")
                seen.add(name)
            label_text = ",".join(f'{k}="{v}"' for k, v in labels)
            lines.append(f"mcpgw_{name}{{{label_text}}} {value:g}" if labels else f"mcpgw_{name} {value:g}")
        for name, value in sorted(self._gauges.items()):
            lines.append(f"# TYPE mcpgw_{name} gauge")
            lines.append(f"mcpgw_{name} {value:g}")
        return "\n".join(lines) + "\n"
