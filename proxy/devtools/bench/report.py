"""`--report PATH.html`: one self-contained page with the run's settings, a summary per target and three charts.

The charts are the latency CDF, the TTFT histogram and throughput over time, drawn by plotly, an optional
extra: the core command works without it. plotly.js is embedded in the page, so the file opens offline and
alone. Every string that comes from the result (URLs, labels, the model) is HTML-escaped, in the tables and
in the charts' legends alike.
"""

from __future__ import annotations

import html
import importlib.util
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

INSTALL_HINT = "pip install 'sluicegate[bench]'"
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")  # one per run, the same in every chart
CHART_HEIGHT_PX = 460
PLOT_CONFIG = {"displaylogo": False, "responsive": True}
STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1320px; padding: 0 16px; color: #222; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 20px 0 6px; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; } td.n { text-align: right; }
th { background: #f3f3f3; } .pass { color: #1a7f37; } .fail { color: #c62828; font-weight: bold; }
.settings td:nth-child(odd) { background: #f7f7f7; } .note { color: #8a5a00; }
.chart { margin-top: 18px; border-top: 1px solid #ddd; }
"""


class ReportUnavailable(RuntimeError):
    """--report was asked for, but plotly, which draws its charts, is not installed."""


def report_available() -> bool:
    """Whether --report can work here; the CLI asks before the run, not after it."""
    return importlib.util.find_spec("plotly") is not None


def write_report(result: dict[str, Any], path: Path) -> None:
    """Write the result of a run (the --json shape) as one HTML file at `path`."""
    try:
        import plotly.io as pio  # lazily: plotly is the optional extra `bench`
    except ImportError as exc:
        raise ReportUnavailable(f"--report draws its charts with plotly, which is missing: "
                                f"install it with {INSTALL_HINT}") from exc  # fmt: skip
    runs = result["runs"]
    figures = {"chart-cdf": latency_cdf(runs), "chart-ttft": ttft_histogram(runs), "chart-throughput": throughput(runs)}
    # plotly.js goes inline once, with the first chart.
    charts = [
        pio.to_html(figure, full_html=False, include_plotlyjs=i == 0, div_id=div_id, config=PLOT_CONFIG)
        for i, (div_id, figure) in enumerate(figures.items())
    ]
    path.write_text(page(result, charts), encoding="utf-8")


# The page around the charts.


def page(result: dict[str, Any], charts: list[str]) -> str:
    targets = " vs ".join(f"{run['label']}: {run['url']}" for run in result["runs"])
    body = [
        f"<h1>sluicegate bench: {esc(targets)}</h1>",
        verdict(result),
        "<h2>Settings</h2>",
        settings_table(result["settings"]),
        "<h2>Summary</h2>",
        summary_table(result),
        *(f'<div class="chart">{chart}</div>' for chart in charts),
    ]
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>sluicegate bench: {esc(targets)}</title><style>{STYLE}</style></head>\n"
            "<body>\n" + "\n".join(body) + "\n</body></html>\n")  # fmt: skip


def verdict(result: dict[str, Any]) -> str:
    lines = []
    if result.get("interrupted"):
        lines.append('<p class="note">Interrupted: these are the numbers measured until Ctrl-C.</p>')
    if result["slo"]:
        ok = result["passed"]
        lines.append(f'<p class="{"pass" if ok else "fail"}">SLOs {"passed" if ok else "FAILED"}</p>')
    return "\n".join(lines)


def settings_table(settings: dict[str, Any]) -> str:
    items = [(key, "-" if value is None else str(value)) for key, value in settings.items()]
    rows = ["<tr>" + "".join(f"<td>{esc(k)}</td><td>{esc(v)}</td>" for k, v in items[i : i + 4]) + "</tr>"
            for i in range(0, len(items), 4)]  # fmt: skip
    return f'<table class="settings">{"".join(rows)}</table>'


# One row of the summary: its title, the cell for a run, and the --compare ratio keys shown beside them.
Row = tuple[str, Callable[[dict[str, Any]], str], tuple[str, ...]]
SUMMARY_ROWS: list[Row] = [
    ("requests", lambda r: num(r["requests"]), ()),
    ("ok / failed", lambda r: f"{num(r['ok'])} / {num(r['failed'])}", ()),
    ("req/s", lambda r: num(r["req_per_s"]), ("req_per_s",)),
    ("end to end p50 / p99, ms", lambda r: percentiles(r, "e2e"), ("e2e_p50", "e2e_p99")),
    ("TTFT p50 / p99, ms", lambda r: percentiles(r, "ttft"), ("ttft_p50", "ttft_p99")),
    ("output tokens/s", lambda r: num(r["output_tokens_per_s"]), ("output_tokens_per_s",)),
    ("status", lambda r: ", ".join(f"{k}: {num(v)}" for k, v in r["status"].items()) or "-", ()),
]


def summary_table(result: dict[str, Any]) -> str:
    runs, ratios = result["runs"], result.get("compare")
    head = "<tr><th></th>" + "".join(f"<th>{esc(r['label'])}: {esc(r['url'])}</th>" for r in runs)
    head += "<th>B/A</th></tr>" if ratios else "</tr>"
    rows = []
    for title, cell, keys in [*SUMMARY_ROWS, ("SLOs (p99)", lambda r: slo_cell(result["slo"], r["label"]), ())]:
        cells = "".join(f'<td class="n">{esc(cell(run))}</td>' for run in runs)
        if ratios:
            cells += f'<td class="n">{esc(" / ".join(ratio(ratios.get(k)) for k in keys))}</td>'
        rows.append(f"<tr><th>{esc(title)}</th>{cells}</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def percentiles(run: dict[str, Any], name: str) -> str:
    stats = run["latency_ms"].get(name)
    return f"{num(stats.get('p50'))} / {num(stats.get('p99'))}" if stats else "-"


def slo_cell(slos: list[dict[str, Any]], label: str) -> str:
    cells = [f"{s['name']} {num(s['p99_ms'])} <= {s['bound_ms']:g} ms: {'pass' if s['passed'] else 'FAIL'}"
             for s in slos if s["label"] == label]  # fmt: skip
    return "; ".join(cells) or "-"


def num(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,}" if isinstance(value, int) else f"{value:,.{digits}f}"


def ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def esc(text: str) -> str:
    return html.escape(text, quote=True)


# The charts, as plain plotly figure dicts.


def run_name(run: dict[str, Any]) -> str:
    return esc(f"{run['label']}: {run['url']}")  # plotly renders legend text as HTML


def colour(index: int) -> str:
    return COLOURS[index % len(COLOURS)]


def layout(title: str, note: str | None, **axes: Any) -> dict[str, Any]:
    """A chart's layout; an empty chart shows `note`, saying why it is empty, in place of its axes."""
    annotations = []
    if note:
        annotations = [{"text": note, "showarrow": False, "xref": "paper", "yref": "paper", "x": 0.5, "y": 0.5,
                        "font": {"size": 16, "color": "#8a5a00"}}]  # fmt: skip
        axes.update({name: {**value, "visible": False} for name, value in axes.items() if "axis" in name})
    return {
        "title": {"text": title},
        "height": CHART_HEIGHT_PX,
        "template": "plotly_white",
        "annotations": annotations,
        "showlegend": True,
        "legend": {"orientation": "h", "y": -0.18},
        "margin": {"t": 60, "b": 110},
        **axes,
    }


def log_axis(title: str, values: list[float]) -> dict[str, Any]:
    """A log axis labelled in full ms: over more than a decade plotly's own labels read "100 2 3 4" for 100-400."""
    axis = {"title": {"text": title}, "type": "log"}
    positive = [v for v in values if v > 0]
    decades = math.log10(max(positive) / min(positive)) if positive else 0.0
    if decades > 1:
        ticks = [step * 10**power for power in range(-2, 8) for step in ((1, 2, 5) if decades > 3 else (1, 2, 3, 5))]
        axis.update(tickvals=ticks, ticktext=[f"{v:,.7g}" for v in ticks])
    return axis


def latency_cdf(runs: list[dict[str, Any]]) -> dict[str, Any]:
    traces = [
        {
            "type": "scatter",
            "mode": "lines",
            "x": [p[0] for p in points],
            "y": [p[1] for p in points],
            "name": f"{run_name(run)} · {title}",
            "legendgroup": run["label"],
            "line": {"color": colour(i), "dash": dash, "width": 2},
            "hovertemplate": "%{x:.2f} ms: %{y:.1%}",
        }
        for i, run in enumerate(runs)
        for name, title, dash in (("e2e", "end to end", "solid"), ("ttft", "TTFT", "dash"))
        if (points := run["cdf"].get(name))
    ]
    latencies = [point[0] for run in runs for points in run["cdf"].values() for point in points]
    return {"data": traces, "layout": layout(
        "Latency CDF: share of successful requests at or below a latency", None if traces else "no successful requests",
        xaxis=log_axis("latency, ms (log scale)", latencies),
        yaxis={"title": {"text": "share of requests"}, "tickformat": ".0%", "range": [0, 1.02]})}  # fmt: skip


def ttft_histogram(runs: list[dict[str, Any]]) -> dict[str, Any]:
    # The buckets are log-spaced, so on a log axis the bars have equal widths; each bar spans its bucket exactly.
    traces = [
        {
            "type": "bar",
            "x": [b[0] for b in buckets],
            "width": [b[1] - b[0] for b in buckets],
            "offset": 0,
            "y": [b[2] for b in buckets],
            "name": run_name(run),
            "marker": {"color": colour(i), "line": {"width": 0}},
            "opacity": 0.6 if len(runs) > 1 else 0.9,
            "customdata": [b[1] for b in buckets],
            "hovertemplate": "%{x:.2f}-%{customdata:.2f} ms: %{y} requests",
        }
        for i, run in enumerate(runs)
        if (buckets := run["histogram"].get("ttft"))
    ]
    note = None if traces else "no TTFT: only streamed requests have one, and none succeeded"
    edges = [edge for run in runs for bucket in run["histogram"].get("ttft", []) for edge in bucket[:2]]
    return {"data": traces, "layout": layout(
        "Time to first token: histogram", note, barmode="overlay",
        xaxis=log_axis("time to first token, ms (log scale)", edges),
        yaxis={"title": {"text": "requests per bucket"}})}  # fmt: skip


def throughput(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Two panels on one time axis: successful requests/s above, output tokens/s below."""
    traces = []
    for i, run in enumerate(runs):
        seconds = [point["t_s"] for point in run["timeline"]]
        for key, axis, unit in (("ok", "y", "ok req/s"), ("output_tokens", "y2", "output tokens/s")):
            traces.append({"type": "scatter", "mode": "lines+markers", "x": seconds,
                           "y": [point[key] for point in run["timeline"]], "yaxis": axis, "legendgroup": run["label"],
                           "name": f"{run_name(run)} · {unit}", "line": {"color": colour(i), "width": 2},
                           "marker": {"size": 5, "symbol": "circle" if axis == "y" else "diamond"},
                           "hovertemplate": f"second %{{x}}: %{{y:,}} {unit}"})  # fmt: skip
    note = None if any(run["timeline"] for run in runs) else "no requests finished"
    seconds_long = max((point["t_s"] for run in runs for point in run["timeline"]), default=0)
    return {"data": traces, "layout": layout(
        "Throughput over time, per second of the run", note, height=CHART_HEIGHT_PX + 140,
        xaxis={"title": {"text": "time into the run, s"}, "anchor": "y2", "dtick": 1 if seconds_long <= 15 else None},
        yaxis={"title": {"text": "successful req/s"}, "domain": [0.56, 1], "rangemode": "tozero"},
        yaxis2={"title": {"text": "output tokens/s"}, "domain": [0, 0.44], "rangemode": "tozero"})}  # fmt: skip
