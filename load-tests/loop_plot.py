"""The learning loop's plot: automatic share and accuracy per window, promotions marked."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot(result: dict[str, Any], path: Path) -> None:
    """Automatic share and automatic accuracy per window, promotions marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = result["windows"]
    x = [r["window"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(x, [r["automatic_share"] for r in rows], "o-", label="automatic share")
    accuracy = [r["automatic_accuracy"] for r in rows]
    ax.plot(x, accuracy, "s-", label="automatic accuracy")
    ax.fill_between(x, [(r["automatic_accuracy_ci"] or [None, None])[0] for r in rows],
                    [(r["automatic_accuracy_ci"] or [None, None])[1] for r in rows], alpha=0.2)
    for step in result["learning"]:  # after a window, or within one (learning_loop.py --shadow-checks)
        if step["promoted"]:
            at = (step["in_window"] - 0.5 + step["after_events"] / result["window"] if "in_window" in step
                  else step["after_window"] + 0.5)
            ax.axvline(at, color="grey", linestyle="--", linewidth=1)
    ax.axhline(0.95, color="green", linestyle=":", linewidth=1, label="0.95")
    ax.set_ylim(0, 1.02)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"window ({result['window']} events; dashed: a promotion)")
    ax.set_title(f"learning loop, {result['data']} (oracle LLM double, wrong {result['wrong']:.0%})")
    ax.legend(loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
