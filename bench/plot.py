"""Plots for docs/bench/: ``python plot.py results.json OUT_DIR [SCENARIO ...]``.

Runs in the bench venv (matplotlib), separate from the project's venv.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"direct": "#888888", "go-httputil": "#00add8", "smart-proxy": "#d9480f", "litellm": "#7048e8",
          "smart-proxy ollama": "#f59f00", "llama-server": "#888888", "hypercorn-floor": "#2b8a3e",
          "trio-bare": "#94d82d"}


def color(name: str) -> str:
    return COLORS.get(name.split(" (")[0], "#444444")


def grouped_bars(ax, rows: list[dict], group: str, value: str, label: str) -> None:
    groups = sorted({r[group] for r in rows})
    names = list(dict.fromkeys(r["target"] for r in rows))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs, ys = [], []
        for j, g in enumerate(groups):
            row = next((r for r in rows if r["target"] == name and r[group] == g), None)
            if row is not None and row.get(value) is not None:
                xs.append(j + i * width)
                ys.append(row[value])
        bars = ax.bar(xs, ys, width, label=name, color=color(name))
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(groups))], [str(g) for g in groups])
    ax.set_xlabel(group)
    ax.set_ylabel(label)


def overhead(result: dict, out: Path) -> None:
    rows = result["plot"]["rows"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    grouped_bars(a, rows, "clients", "rps", "requests/s")
    a.set_title("throughput (higher is better)")
    a.legend(fontsize=8)
    grouped_bars(b, rows, "clients", "p50_ms", "p50 latency, ms")
    b.set_yscale("log")
    b.set_title("p50 latency (log scale, lower is better)")
    fig.suptitle(result["title"])
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def fanout(result: dict, out: Path) -> None:
    rows = result["plot"]["rows"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    grouped_bars(a, rows, "streams", "chunks_per_s", "chunks/s")
    a.set_title("chunks/s delivered (higher is better)")
    a.legend(fontsize=8)
    for key, cdf in result["plot"]["gap_cdfs"].items():
        if not cdf:
            continue
        name, streams = key.split("@")
        style = {"64": ":", "256": "--", "512": "-"}.get(streams, "-")
        b.plot(cdf, range(len(cdf)), style, color=color(name), label=f"{name}, {streams} streams")
    b.set_xlabel("gap between chunks, ms")
    b.set_ylabel("percentile")
    b.set_xlim(0, 60)
    b.set_title("gap between chunks (CDF; upstream sends every 20 ms)")
    b.legend(fontsize=7)
    fig.suptitle(result["title"])
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def bars(result: dict, out: Path, value: str, label: str, key: str = "target") -> None:
    rows = [r for r in result["plot"]["rows"] if r.get(value) is not None]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = [str(r[key]) for r in rows]
    bars_ = ax.bar(names, [r[value] for r in rows], color=[color(n) for n in names])
    ax.bar_label(bars_, fmt="%.4g", fontsize=8)
    ax.set_ylabel(label)
    ax.set_title(result["title"], fontsize=10)
    plt.setp(ax.get_xticklabels(), rotation=15, ha="right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> int:
    results = json.loads(Path(sys.argv[1]).read_text())
    out_dir = Path(sys.argv[2])
    names = sys.argv[3:] or list(results)
    plotters = {
        "overhead": overhead,
        "fanout": fanout,
        "throughput": lambda r, o: bars(r, o, "chunks_per_s", "chunks/s"),
        "aborts": lambda r, o: bars(r, o, "close_p99_ms", "ms from hang-up to upstream close (p99)", key="phase"),
        "coldload": lambda r, o: bars(r, o, "last_first_token_s", "seconds to the last first token", key="target"),
        "swap": lambda r, o: bars(r, o, "ttfb_p50_s", "time to first byte after a swap, p50 (s)", key="target"),
        "realmodel": lambda r, o: bars(r, o, "tokens_per_s", "tokens/s (one stream)", key="target"),
    }
    for name in names:
        kind = name.split("@")[0]
        if name in results and kind in plotters:
            plotters[kind](results[name], out_dir / f"{name.replace('@', '-')}.png")
            plt.close("all")
            print(f"plot: {out_dir / name.replace('@', '-')}.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
