"""`tokentrain plot WORK_DIR`: a PNG of loss (and validation loss), lr and throughput."""

from __future__ import annotations

import json
from pathlib import Path

from tokentrain.errors import ConfigError


def register(sub, common) -> None:
    p = sub.add_parser("plot", help="plot loss, lr and throughput from WORK_DIR/metrics.jsonl", parents=[common])
    p.add_argument("work_dir", metavar="WORK_DIR")
    p.add_argument("-o", "--output", metavar="PNG", help="output file (default WORK_DIR/metrics.png)")
    p.set_defaults(func=cmd_plot)


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        raise ConfigError(f"{path}: no metrics file; is this a training work dir?")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            raise ConfigError(f"{path}:{n}: not a JSON line") from None
    if not rows:
        raise ConfigError(f"{path}: no records yet")
    return rows


def plot_metrics(rows: list[dict], out: Path) -> Path:
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("tokentrain plot needs matplotlib: pip install 'tokentrain[plot]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    x, y = series("loss")
    axes[0].plot(x, y, label="train loss")
    x, y = series("val_loss")
    if x:
        axes[0].plot(x, y, "o-", label="validation loss")
    axes[0].set_ylabel("loss")
    axes[0].legend()
    axes[1].plot(*series("lr"))
    axes[1].set_ylabel("learning rate")
    axes[2].plot(*series("tokens_per_s"))
    axes[2].set_ylabel("tokens / s")
    axes[2].set_xlabel("step")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def cmd_plot(args) -> int:
    work = Path(args.work_dir)
    out = Path(args.output) if args.output else work / "metrics.png"
    if not out.parent.is_dir():
        raise ConfigError(f"-o {out}: the folder {out.parent} does not exist; create it or give another path")
    print(plot_metrics(read_metrics(work / "metrics.jsonl"), out))
    return 0
