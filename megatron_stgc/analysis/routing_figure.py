"""``routing_stability.png`` of ``megatron-stgc plot``: the routing-stability metrics
(training/routing_stability.py) per MoE layer over training, several runs overlaid.

Rows: step-to-step total variation of expert-load shares (``routing/layer{N}/load_tv_*``),
the fraction of probe tokens whose top-k set changed since the previous probe
(``topk_change_*``) and the routing entropy on the probe batch (``entropy_*``); one column
per MoE layer; image tokens solid, text tokens dashed (all tokens, solid, for a run without
a modality split).
"""

from __future__ import annotations

ROWS = (("load_tv", "load-share TV, step to step"),
        ("topk_change", "probe tokens with a new top-k set"),
        ("entropy", "routing entropy (nats), probe"))
GROUPS = (("_image", "-"), ("_text", "--"), ("", "-"))


def routing_layers(runs) -> list[int]:
    """Megatron layer numbers that have routing/layer{N}/... keys in any run."""
    layers = set()
    for _, records in runs:
        for record in records:
            for key in record:
                if key.startswith("routing/layer"):
                    layers.add(int(key.split("/")[1][len("layer"):]))
    return sorted(layers)


def _series(records, key):
    points = [(r["iteration"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def _groups_of(records, layer: int, metric: str):
    """The (suffix, line style) groups a run logged: image and text, or all tokens."""
    found = [(suffix, style) for suffix, style in GROUPS[:2]
             if any(f"routing/layer{layer}/{metric}{suffix}" in r for r in records)]
    return found or [GROUPS[2]]


def routing_figure(runs, path: str, pyplot) -> bool:
    layers = routing_layers(runs)
    if not layers:
        return False
    plt = pyplot()
    fig, axes = plt.subplots(len(ROWS), len(layers), figsize=(4.8 * len(layers), 3.2 * len(ROWS)),
                             squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, (metric, label) in enumerate(ROWS):
        for col, layer in enumerate(layers):
            ax = axes[row][col]
            for index, (name, records) in enumerate(runs):
                for suffix, style in _groups_of(records, layer, metric):
                    steps, values = _series(records, f"routing/layer{layer}/{metric}{suffix}")
                    if steps:
                        ax.plot(steps, values, style, color=colors[index % len(colors)],
                                linewidth=1.1, label=f"{name} {suffix.lstrip('_') or 'all'}")
            ax.set(title=f"MoE layer {layer}: {label}", xlabel="training step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle("Routing stability (image solid, text dashed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
