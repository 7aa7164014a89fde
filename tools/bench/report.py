"""The table and the plot of ``sm3-dist bench``, from :func:`sm3_dist.tools.bench.step.run`'s result or its
``--json`` file."""

from __future__ import annotations

__all__ = ["format_table", "plot"]


def format_table(result: dict) -> str:
    head = (
        f"{result['parameters'] / 1e6:.1f}M parameters in {result['tensors']} tensors on {result['device']} "
        f"({result['threads']} threads, torch {result['torch']}); copy bandwidth {result['bandwidth_gb_s']:.1f} GB/s "
        f"(read + write); {result['rounds']} rounds x {result['steps_per_round']} steps"
    )
    lines = [head]
    if result.get("cpu"):
        native = result.get("native")
        if native is None:
            kernel = ""
        elif native.get("isa") is None:
            kernel = f"; native SM3 kernel unavailable ({native.get('unavailable')})"
        else:
            kernel = (
                f"; native SM3 kernel: ISA {native['isa']}, {native['vector_width']} floats per vector, "
                f"{'OpenMP' if native.get('openmp') else 'no OpenMP'}"
            )
        lines.append(f"CPU: {result['cpu']}{kernel}")
    lines += [
        "",
        "| optimizer | ms/step (median) | IQR ms | min ms | vs Adam fused | state MiB | MB moved/step | bound ms "
        "| % of bound | launches/step | syncs/step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        ratio = "-" if r["ratio_to_adam_fused"] is None else f"{r['ratio_to_adam_fused']:.2f}x"
        launches = "-" if r.get("launches") is None else str(r["launches"])
        syncs = "-" if r.get("syncs") is None else str(r["syncs"])
        lines.append(
            f"| {r['name']} | {r['median_ms']:.2f} | {r['iqr_ms']:.2f} | {r['min_ms']:.2f} | {ratio} | {r['state_mib']:.1f} "
            f"| {r['moved_mb']:.0f} | {r['bound_ms']:.2f} | {r['pct_of_bound']:.0f}% | {launches} | {syncs} |"
        )
    errors = [(r["name"], r["sync_error"]) for r in result["rows"] if r.get("sync_error")]
    if errors:
        lines += ["", 'One more step of each SM3 row under torch.cuda.set_sync_debug_mode("error"):']
        lines += [f"- {name}: {error}" for name, error in errors]
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """Each optimizer's step time (median, bar; interquartile range, whisker) against the time its bytes take at
    the measured copy bandwidth (tick), from :func:`run`'s result or its ``--json`` file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"][::-1]
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(rows) + 1.6))
    ys = range(len(rows))
    colors = ["tab:blue" if r["name"].startswith("sm3") else "tab:gray" for r in rows]
    ax.barh(ys, [r["median_ms"] for r in rows], xerr=[r["iqr_ms"] / 2 for r in rows], color=colors, alpha=0.8)
    ax.scatter([r["bound_ms"] for r in rows], ys, marker="|", s=200, color="black", label="bandwidth bound", zorder=3)
    adam = next((r["median_ms"] for r in rows if r["name"] == "adam fused"), None)
    if adam is not None:
        ax.axvline(adam, color="tab:red", lw=1, ls="--", label="Adam(fused=True)")
    ax.set_yticks(list(ys), [r["name"] for r in rows], fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("ms per optimizer step (median; log scale)")
    ax.grid(True, axis="x", which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(
        f"{result['parameters'] / 1e6:.1f}M parameters on {result['device']}, {result['threads']} threads, "
        f"copy {result['bandwidth_gb_s']:.1f} GB/s",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
