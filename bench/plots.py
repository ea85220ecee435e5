"""PNG plots of the end-to-end prefill results (matplotlib, imported where used)."""
from __future__ import annotations

from typing import Any

COLORS = {"dwdp": "tab:blue", "replicated": "tab:green", "ep": "tab:red"}


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("plots need matplotlib (pip install matplotlib)") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_throughput(results: dict[str, Any], path: str) -> None:
    """Prefill tokens/s per GPU vs tokens per rank, one panel per imbalance: each mode's own
    rate (solid) and lockstep figure (dashed; the same line at equal load)."""
    plt = _pyplot()
    seen = {k.split("/")[0] for m in results["modes"].values() for k in m.get("points", {})}
    imbalances = [i for i in ("equal", "4x") if i in seen] + sorted(seen - {"equal", "4x"})
    fig, axes = plt.subplots(1, max(1, len(imbalances)), figsize=(6 * max(1, len(imbalances)), 4.5),
                             squeeze=False)
    for ax, imb in zip(axes[0], imbalances):
        for mode, m in results["modes"].items():
            for figure, style, label in (("tokens_per_s_per_gpu", "-", mode),
                                         ("lockstep_tokens_per_s_per_gpu", "--", f"{mode} lockstep")):
                pts = sorted((int(k.split("/")[1]), p[figure])
                             for k, p in m.get("points", {}).items()
                             if k.startswith(imb + "/") and figure in p)
                if pts and (imb != "equal" or figure == "tokens_per_s_per_gpu"):
                    ax.plot([x for x, _ in pts], [y for _, y in pts], style, marker="o",
                            label=label, color=COLORS.get(mode))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per step on the heavy rank" if imb != "equal" else "tokens per rank per step")
        ax.set_ylabel("prefill tokens/s per GPU")
        ax.set_title(f"{imb} load")
        ax.grid(True, alpha=0.3)
        ax.legend()
    meta = results["meta"]
    fig.suptitle(f"{meta['preset']} slice, {meta['num_moe_layers']} MoE layers, "
                 f"{meta['world_size']}x {meta['device_name']}, backend {meta['moe_backend']}")
    _save(plt, fig, path)


def plot_timeline(timeline: dict[str, Any], path: str, title: str) -> None:
    """Compute stream (attention+dense vs MoE per layer) over the copy stream (prefetches)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(12, 3.2))
    for seg in timeline["compute"]:
        color = "tab:orange" if seg["kind"] == "moe" else "tab:gray"
        ax.broken_barh([(seg["start"], max(seg["end"] - seg["start"], 1e-3))], (10, 8), color=color)
        if seg["kind"] == "moe":
            ax.text((seg["start"] + seg["end"]) / 2, 14, str(seg["layer"]), ha="center", va="center", fontsize=7)
    for seg in timeline["copy"]:
        color = "tab:purple" if seg["next_step"] else "tab:blue"
        ax.broken_barh([(seg["start"], max(seg["end"] - seg["start"], 1e-3))], (0, 8), color=color)
        ax.text((seg["start"] + seg["end"]) / 2, 4, str(seg["for_layer"]), ha="center", va="center",
                fontsize=7, color="white")
    ax.set_yticks([4, 14], ["copy stream\n(prefetch for layer)", "compute stream\n(MoE layer)"])
    ax.set_ylim(-1, 25)
    ax.set_xlabel("ms since step start")
    ax.set_title(title)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color="tab:gray", label="attention + dense"), Patch(color="tab:orange", label="MoE"),
                       Patch(color="tab:blue", label="prefetch (this step)"),
                       Patch(color="tab:purple", label="prefetch (next step)")],
              loc="upper right", fontsize=7, ncol=4)
    _save(plt, fig, path)


def plot_latency_vs_load(runs: list[dict[str, Any]], path: str) -> None:
    """TTFT and TPOT percentiles (ms) and achieved throughput against the offered load (the
    concurrency, or the request rate, of each ``bench/serve_load.py`` run)."""
    plt = _pyplot()
    by_conc = all(r.get("concurrency") for r in runs)
    key = (lambda r: r["concurrency"]) if by_conc else (lambda r: float(r["request_rate"]))
    runs = sorted((r for r in runs if r.get("ttft_ms")), key=key)
    x = [key(r) for r in runs]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, metric, title in ((axes[0], "ttft_ms", "time to first token"),
                              (axes[1], "tpot_ms", "time per output token")):
        for q, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
            pts = [(xi, r[metric][q]) for xi, r in zip(x, runs) if r.get(metric)]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=q)
        ax.set_ylabel(f"{title} (ms)")
        ax.set_yscale("log")
        ax.legend()
    axes[2].plot(x, [r["output_tokens_per_s"] for r in runs], "o-", label="output tokens/s")
    axes[2].plot(x, [r["requests_per_s"] for r in runs], "s--", label="requests/s")
    axes[2].set_ylabel("achieved throughput")
    axes[2].legend()
    for ax in axes:
        ax.set_xlabel("concurrent requests" if by_conc else "offered requests/s (Poisson)")
        ax.set_xscale("log", base=2)
        ax.grid(True, alpha=0.3)
    label = runs[0].get("label") if runs else ""
    fig.suptitle(f"latency against load{': ' + label if label else ''}")
    _save(plt, fig, path)


def plot_serve_compare(report: dict[str, Any], path: str) -> None:
    """bench/serve_compare.py: prefill tokens/s per GPU, TTFT p50/p99 and expert memory per
    rank, one bar group per mode (a missed mode shows no bar)."""
    plt = _pyplot()
    figs = report["comparison"]["modes"]
    modes = list(figs)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (("prefill tokens/s per GPU", lambda f: [f.get("prefill_tokens_per_s_per_gpu")], [""]),
              ("TTFT (ms)", lambda f: [f.get("ttft_p50_ms"), f.get("ttft_p99_ms")], ["p50", "p99"]),
              ("routed-expert memory per rank (GiB)",
               lambda f: [max([m for m in f.get("expert_memory_gib_per_rank") or [] if m is not None],
                              default=None)], [""]))
    for ax, (title, get, labels) in zip(axes, panels):
        width = 0.8 / len(labels)
        for j, label in enumerate(labels):
            xs, ys = [], []
            for i, mode in enumerate(modes):
                v = get(figs[mode])[j] if "completed" in figs[mode] else None
                if v is not None:
                    xs.append(i + j * width)
                    ys.append(v)
            ax.bar(xs, ys, width=width, label=label or None,
                   color=[COLORS.get(modes[int(round(x - j * width))]) for x in xs],
                   alpha=1.0 if j == 0 else 0.55)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(modes))], modes)
        ax.set_title(title)
        ax.grid(True, axis="y", alpha=0.3)
        if len(labels) > 1:
            ax.legend()
    meta = report["meta"]
    fig.suptitle(f"{meta['model_name']}: {meta['num_prompts']} requests (lognormal ~{meta['median_len']}, "
                 f"{meta['long_frac']:.0%} at {meta['long_len']}), {meta['ranks']} ranks on {meta['gpus_text']}")
    _save(plt, fig, path)
