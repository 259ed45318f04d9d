"""
Distillation curves as an SVG picture, from the results.json files train_cllm.py writes: tokens
per forward (plain and sliding window Jacobi) and quality on the val prompts against minutes of
distillation, one line per run. Plain Python, no plotting package.

    python scripts/plot_curves.py out-cllm-a/results.json out-cllm-b/results.json --out=curves.svg
"""

import json
import sys

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
W, H, LEFT, TOP, PANEL_W, PANEL_H, GAP = 900, 330, 60, 40, 340, 220, 110


def label_of(results):
    c = results["config"]
    return f"{c['recipe']}, lr {c['learning_rate']:g}, ar_weight {c['ar_weight']:g}"


def panel(x0, title, series, y_name, y_max):
    """One panel: axes, ticks, a title and a polyline per series [(label, colour, dash, points)]."""
    x_max = max((x for *_, pts in series for x, _ in pts), default=1) or 1
    sx = lambda x: x0 + x / x_max * PANEL_W
    sy = lambda y: TOP + PANEL_H - y / y_max * PANEL_H
    out = [f'<text x="{x0 + PANEL_W / 2}" y="{TOP - 14}" text-anchor="middle" font-weight="bold">{title}</text>',
           f'<rect x="{x0}" y="{TOP}" width="{PANEL_W}" height="{PANEL_H}" fill="none" stroke="#888"/>']
    for i in range(5):
        y, x = y_max * i / 4, x_max * i / 4
        out.append(f'<text x="{x0 - 6}" y="{sy(y) + 4}" text-anchor="end" font-size="11">{y:.2g}</text>')
        out.append(f'<line x1="{x0}" y1="{sy(y)}" x2="{x0 + PANEL_W}" y2="{sy(y)}" stroke="#eee"/>')
        out.append(f'<text x="{sx(x)}" y="{TOP + PANEL_H + 16}" text-anchor="middle" font-size="11">{x:.1f}</text>')
    out.append(f'<text x="{x0 + PANEL_W / 2}" y="{TOP + PANEL_H + 34}" text-anchor="middle" font-size="12">'
               'minutes of distillation</text>')
    out.append(f'<text x="{x0 - 42}" y="{TOP + PANEL_H / 2}" text-anchor="middle" font-size="12" '
               f'transform="rotate(-90 {x0 - 42} {TOP + PANEL_H / 2})">{y_name}</text>')
    for _, colour, dash, pts in series:
        line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        out.append(f'<polyline points="{line}" fill="none" stroke="{colour}" stroke-width="2" '
                   f'stroke-dasharray="{dash}"/>')
        out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{colour}"/>' for x, y in pts]
    return out


def svg(runs):
    """runs: [(label, results dict)] -> the SVG text."""
    speed, quality, legend = [], [], []
    for i, (label, results) in enumerate(runs):
        colour, curve = COLOURS[i % len(COLOURS)], results["curve"]
        speed.append((label, colour, "", [(c["train_minutes"], c["tokens_per_forward"]) for c in curve]))
        if curve[0].get("window_tokens_per_forward"):
            speed.append((label, colour, "5,3", [(c["train_minutes"], c["window_tokens_per_forward"])
                                                 for c in curve]))
        key = "quality" if curve[0]["quality"] is not None else "answer_loss"
        quality.append((label, colour, "", [(c["train_minutes"], c[key]) for c in curve]))
        legend.append((label, colour))
    metric = runs[0][1].get("metric", "accuracy")
    q_name = f"{metric} (val)" if runs[0][1]["curve"][0]["quality"] is not None else "answer loss (val)"
    y_speed = max(y for *_, pts in speed for _, y in pts) * 1.1 or 1.0
    y_quality = max(y for *_, pts in quality for _, y in pts) * 1.1 or 1.0
    body = panel(LEFT, "tokens per forward (dashed: sliding window)", speed, "tokens / forward", y_speed)
    body += panel(LEFT + PANEL_W + GAP, q_name, quality, q_name, y_quality)
    for i, (label, colour) in enumerate(legend):  # two to a line
        y = TOP + PANEL_H + 58 + 18 * (i // 2)
        x = LEFT + (i % 2) * (PANEL_W + GAP)
        body.append(f'<line x1="{x}" y1="{y}" x2="{x + 24}" y2="{y}" stroke="{colour}" stroke-width="3"/>')
        body.append(f'<text x="{x + 30}" y="{y + 4}" font-size="12">{label}</text>')
    height = H + 30 + 18 * ((len(legend) - 1) // 2)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" '
            f'font-family="sans-serif" font-size="13">\n<rect width="100%" height="100%" fill="white"/>\n'
            + "\n".join(body) + "\n</svg>\n")


def main(argv):
    paths = [a for a in argv if not a.startswith("--")]
    out = next((a.split("=", 1)[1] for a in argv if a.startswith("--out=")), "curves.svg")
    if not paths:
        sys.exit("usage: python scripts/plot_curves.py out-cllm-a/results.json [..] --out=curves.svg")
    runs = []
    for p in paths:
        with open(p) as f:
            results = json.load(f)
        runs.append((label_of(results), results))
    with open(out, "w") as f:
        f.write(svg(runs))
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
