"""The written report: a markdown summary of a results.json, and latency-vs-throughput plots per model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.compare import comparisons
from bench.results import Results, read_json, write_json


def _f(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _header(titles: str) -> list[str]:
    """A table's title row and separator, from "a | b | c"."""
    names = [t.strip() for t in titles.split("|")]
    return [_row(*names), _row(*["---"] * len(names))]


def write_markdown(results: Results, path: Path) -> None:
    m = results.meta["machine"]
    device = results.meta["settings"].get("device", "cpu")
    gpu = f" GPU: {m['gpu']}." if m.get("gpu") else ""
    reference = next((c["reference"] for c in results.comparisons), "pytorch-fp32")
    lines = [
        "# Polyglot Gateway benchmark",
        "",
        f"{m['date']} on `{m['host']}` ({device}): {m['cpu']}, {m['cores']} cores.{gpu} "
        f"Python {m['python']}, onnxruntime {m['onnxruntime']}, torch {m.get('torch')}, transformers "
        f"{m.get('transformers')}, ctranslate2 {m.get('ctranslate2')}. Models: "
        f"{results.meta['settings'].get('size')} demo models (random weights at the published sizes when "
        f"`full`). Suite time {results.meta.get('seconds')} s.",
        "",
        "## Gateway against the baselines (same inputs, same run)",
        "",
        "Gateway figures are end to end over gRPC (tokenization, batching, post-processing included); the",
        "baselines are model-only on the same token ids. Latency shapes compare the gateway's p50 at",
        "concurrency 1 with the baseline's median batch time; throughput shapes compare texts per second.",
        "`best other` excludes ONNX Runtime, which is the gateway's own engine (its column shows the",
        "gateway's overhead: 1.0 means none).",
        "",
        *_header(
            f"model | shape | variant | backend | conc. | metric | gateway | {reference} | "
            f"x {reference} | best other | x best other | x ORT direct"
        ),
    ]
    for c in results.comparisons:
        lines.append(
            _row(
                c["model"],
                c["scenario"],
                c["variant"],
                c.get("backend", "onnxruntime"),
                _f(c["concurrency"], 0),
                c["metric"],
                _f(c["gateway"], 4),
                _f(c["reference_value"], 4),
                _f(c["speedup_vs_reference"]),
                c["best_other"] or "-",
                _f(c["speedup_vs_best_other"]),
                _f(c["gateway_vs_onnxruntime_direct"]),
            )
        )
    lines += [
        "",
        "## Baselines (model-only, median of repeated runs)",
        "",
        *_header("model | shape | engine | seconds per batch | texts/s"),
    ]
    for s in results.shapes:
        lines.append(_row(s["model"], s["scenario"], s["engine"], _f(s["seconds"], 4), _f(s["texts_per_s"])))
    if results.agreement:
        lines += [
            "",
            "## Translation agreement with PyTorch fp32 (greedy tokens, position by position)",
            "",
            *_header("model | shape | engine | token agreement | new tokens per text"),
        ]
        for a in results.agreement:
            counts = sorted(set(a["new_tokens"]))
            lines.append(
                f"| {a['model']} | {a['scenario']} | {a['engine']} | {_f(a['token_agreement'], 3)} | "
                f"{', '.join(map(str, counts))} |"
            )
    lines += [
        "",
        "## Gateway load runs",
        "",
        "Closed loop: N callers, each sending its next request when the last returns. Open loop: Poisson",
        "arrivals at a fraction of the best closed-loop rate. `queue` is the server's mean wait per item,",
        "`inference` its mean batch run time, `batch` its mean batch size, all from its /metrics.",
        "",
        *_header(
            "model | variant | backend | scenario | mode | level | req/s | texts/s | tokens/s | "
            "p50 ms | p90 | p95 | p99 | errors | queue ms | inference ms | batch"
        ),
    ]
    for r in results.runs:
        errors = ", ".join(f"{k} {v}" for k, v in r["errors"].items()) or "0"
        lines.append(
            _row(
                r["model"],
                r["variant"],
                r.get("backend", "onnxruntime"),
                r["scenario"],
                r["mode"],
                _f(r["level"], 1),
                _f(r["requests_per_s"], 1),
                _f(r["texts_per_s"], 1),
                _f(r["tokens_per_s"], 0),
                _f(r["p50_ms"], 1),
                _f(r["p90_ms"], 1),
                _f(r["p95_ms"], 1),
                _f(r["p99_ms"], 1),
                errors,
                _f(r.get("server_queue_ms"), 1),
                _f(r.get("server_inference_ms"), 1),
                _f(r.get("server_batch_size"), 1),
            )
        )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_plots(results: Results, out: Path) -> list[Path]:
    """Per model: p50 and p99 latency against throughput along the closed-loop sweep, per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for model in dict.fromkeys(r["model"] for r in results.runs):
        rows = [
            r
            for r in results.runs
            if r["model"] == model and r["scenario"] == "mixed" and r["mode"] == "closed"
        ]
        if not rows:
            continue
        figure, axis = plt.subplots(figsize=(7, 4.5))
        for variant, backend in dict.fromkeys((r["variant"], r.get("backend", "onnxruntime")) for r in rows):
            label = variant if backend == "onnxruntime" else f"{variant} on {backend}"
            points = sorted(
                (r for r in rows if r["variant"] == variant and r.get("backend", "onnxruntime") == backend),
                key=lambda r: r["level"],
            )
            x = [p["requests_per_s"] for p in points]
            axis.plot(x, [p["p50_ms"] for p in points], marker="o", label=f"{label} p50")
            axis.plot(x, [p["p99_ms"] for p in points], marker="x", linestyle="--", label=f"{label} p99")
            for p in points:
                axis.annotate(f"c={int(p['level'])}", (p["requests_per_s"], p["p50_ms"]), fontsize=7)
        axis.set_xlabel("requests per second (mixed lengths and languages)")
        axis.set_ylabel("latency (ms)")
        axis.set_yscale("log")
        axis.set_title(f"{model}: latency vs throughput, closed loop")
        axis.grid(True, alpha=0.3)
        axis.legend()
        figure.tight_layout()
        path = out / f"{model}-latency-throughput.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written


def publish(results: Results, out: Path) -> None:
    """The comparisons, then results.json, report.md and the plots under `out`."""
    results.comparisons = comparisons(results)
    write_json(results, out)
    write_markdown(results, out / "report.md")
    write_plots(results, out)


def rewrite(out: Path) -> None:
    """Rewrite report.md and the plots of an existing results directory from its results.json."""
    publish(read_json(out), out)
