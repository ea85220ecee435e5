"""A plan for people: the table, the blog comparison, the plot."""
from __future__ import annotations

from tensorrt_llm_dwdp.plan.deploy import TERMS

SHORT = {"attention": "attn", "moe": "moe", "dense": "dense", "other": "other", "a2a": "a2a",
         "sync_wait": "wait", "copy_exposed": "copy", "interference": "intf"}


def table(plan: dict) -> str:
    """One line per deployment: memory, step terms (ms), tokens/s per GPU, TTFT percentiles and
    the stream's regime (busy: fraction of GPU time stepping; tok/stp: mean tokens per step)."""
    head = (f"{'deployment':<24}{'GiB/GPU':>8} " + "".join(f"{SHORT[t]:>8}" for t in TERMS)
            + f"{'step':>8}{'cp.tot':>8}{'tok/s/GPU':>10}{'lockstep':>9}"
            + f"{'TTFT p50':>9}{'p90':>8}{'p99':>8}{'busy':>6}{'tok/stp':>8}")
    lines = [head, "-" * len(head)]
    for r in plan["rows"]:
        mem = f"{r['memory_gib']['total']:8.1f} "
        if not r["fits"]:
            lines.append(f"{r['label']:<24}{mem} does not fit "
                         f"({r['memory_gib']['capacity']:.0f} GiB per GPU)")
            continue
        b, tps, st = r["breakdown_ms"], r["tokens_per_s_per_gpu"], r["stream"]["ttft_ms"]
        lines.append(f"{r['label']:<24}{mem}" + "".join(f"{b[t]:8.1f}" for t in TERMS)
                     + f"{b['step']:8.1f}{b['copy_total']:8.1f}{tps['own_rate']:10.0f}"
                     + f"{tps['lockstep']:9.0f}{st['p50']:9.0f}{st['p90']:8.0f}{st['p99']:8.0f}"
                     + f"{r['stream']['busy']:6.0%}{r['stream']['tokens_per_step']:8.0f}")
    return "\n".join(lines)


def blog_comparison(plan: dict, blog: dict) -> str:
    """Predicted DEP4 / DWDP4 beside blog 19's context iteration (same terms, same units)."""
    pick = {"DEP4": next((r for r in plan["rows"] if r["label"] == "DEP4" and r["fits"]), None),
            "DWDP4": next((r for r in plan["rows"] if r["kind"] == "dwdp" and r["size"] == 4
                           and r["prefetch"] == 64 and not r["contention_opt"] and r["fits"]), None)}
    pairs = [("attention", ("attention",)), ("grouped_gemm", ("moe",)),
             ("dense_gemm", ("dense",)), ("others", ("other", "interference")),
             ("communication", ("a2a",)), ("synchronization", ("sync_wait",)),
             ("p2p_copy", ("copy_total",)), ("iteration", ("step",))]
    pairs += [("grouped+others", ("moe", "other", "interference")),
              ("attn+dense", ("attention", "dense"))]
    blog_groups = {"grouped+others": ("grouped_gemm", "others"),
                   "attn+dense": ("attention", "dense_gemm")}
    lines = [f"{'term':<16}{'DEP4 pred':>11}{'blog':>10}{'DWDP4 pred':>12}{'blog':>10}"]
    for blog_key, ours in pairs:
        cells = []
        for name in ("DEP4", "DWDP4"):
            row = pick[name]
            pred = sum(row["breakdown_ms"][k] for k in ours) if row else float("nan")
            ref = sum(blog["iteration"][name][k] for k in blog_groups.get(blog_key, (blog_key,)))
            cells.append(f"{pred:{11 if name == 'DEP4' else 12}.1f}{ref:10.1f}")
        lines.append(f"{blog_key:<16}" + "".join(cells))
    lines.append("(ms per step; blog figures as printed, its us label read as ms: see "
                 "docs/PLANNING.md; p2p_copy is the copy in flight, hidden or not; the database "
                 "and the blog's profile split MoE/others and attention/dense differently, so "
                 "compare the sums; each term's cause: bench/results/plan_validation.json)")
    return "\n".join(lines)


def plot(plan: dict, path: str) -> None:
    """Stacked step terms per deployment, tokens/s per GPU and the stream's TTFT (p50, p90),
    saved to ``path``."""
    try:
        import matplotlib
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in plan["rows"] if r["fits"]]
    labels = [r["label"] for r in rows]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(18, 0.45 * len(rows) + 2.5),
                                        gridspec_kw={"width_ratios": [2, 1, 1]})
    left = [0.0] * len(rows)
    for t in TERMS:
        vals = [r["breakdown_ms"][t] for r in rows]
        ax1.barh(labels, vals, left=left, label=t)
        left = [a + b for a, b in zip(left, vals)]
    ax1.set_xlabel("ms per step (mean over sampled steps)")
    ax1.invert_yaxis()
    ax1.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=4)
    ax2.barh(labels, [r["tokens_per_s_per_gpu"]["own_rate"] for r in rows], color="tab:green")
    ax2.set_xlabel("prompt tokens/s per GPU (predicted)")
    ax2.invert_yaxis()
    ax2.set_yticklabels([])
    p50 = [r["stream"]["ttft_ms"]["p50"] for r in rows]
    p90 = [r["stream"]["ttft_ms"]["p90"] for r in rows]
    ax3.barh(labels, p90, color="tab:orange", alpha=0.4, label="p90")
    ax3.barh(labels, p50, color="tab:orange", label="p50")
    ax3.set_xlabel(f"TTFT ms in the stream ({plan.get('stream_rate_req_per_s', 0):.2f} req/s)")
    ax3.invert_yaxis()
    ax3.set_yticklabels([])
    ax3.legend(fontsize=7)
    fig.suptitle(f"PREDICTION: {plan.get('title', 'plan')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
