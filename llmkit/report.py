"""Compare the runs of a multirun (`llmkit report dir=MULTIRUN_DIR [out=DIR] [title=T] [wandb_project=P ...]`).

Reads every run directory below MULTIRUN_DIR (`summary.json`, `csv/metrics.csv`, `.hydra/overrides.yaml`),
finds the swept keys (overrides whose value differs between runs; `seed` is the replicate key), and writes
to out= (default: MULTIRUN_DIR/report):

  report.md     the table (one row per point: mean +- std over seeds), the pairwise differences judged against
                the seed-to-seed spread, failed runs, and the val-loss curves (val_loss.png)
  report.html   the same with the plot embedded
  report.csv    one row per point (means and stds); runs.csv: one row per run, exactly its summary.json
  val_loss.png  val loss against tokens seen, one colour per point, one line per seed, the mean thick

A difference between two points counts as larger than the seed spread when |mean_a - mean_b| exceeds
2 * s * sqrt(1/n_a + 1/n_b), with s the seed-to-seed standard deviation pooled over all points (about a
two-sided t-test at 5%). With one seed per point there is no spread and the report says so.

With wandb_project= (and WANDB_MODE not offline, an API key configured, `pip install wandb-workspaces`),
the comparison is also published as a W&B Report whose run set is the sweep's group, grouped by the swept keys.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmkit.bench.reporting import downstream_lines

SEED_KEY = "seed"
# (column, summary key, format)
METRICS = [
    ("params", "params", "{:,.0f}"),
    ("final val loss", "final_val_loss", "{:.4f}"),
    ("best val loss", "best_val_loss", "{:.4f}"),
    ("val ppl", "final_val_ppl", "{:.2f}"),
    ("tokens/s", "tokens_per_s", "{:,.0f}"),
    ("MFU", "mfu", "{:.4f}"),
    ("wall time (s)", "wall_time_s", "{:.1f}"),
    ("peak memory (MiB)", "peak_memory_mib", "{:,.0f}"),
]
COMPARED = "final_val_loss"
# config groups whose choice (model=tiny) is logged to wandb as choices.<group>, not as a config value
CONFIG_GROUPS = ("model", "data", "optim", "scheduler", "trainer", "callbacks", "logger", "experiment", "ablation", "launcher")


@dataclass
class Run:
    path: Path
    overrides: dict[str, str]
    summary: dict[str, Any]
    curve: list[tuple[float, float]] = field(default_factory=list)  # (tokens seen, val loss)

    @property
    def status(self) -> str:
        return self.summary.get("status", "completed" if self.summary else "missing")

    def value(self, key: str) -> float | None:
        if key == "peak_memory_mib":
            v = self.summary.get("peak_memory_bytes")
            return None if v is None else v / 2**20
        v = self.summary.get(key)
        return None if v is None else float(v)


@dataclass
class Point:
    choices: dict[str, str]  # swept key -> value (seed excluded)
    runs: list[Run]

    @property
    def label(self) -> str:
        return ", ".join(f"{k.split('/')[-1]}={v}" for k, v in self.choices.items()) or "all"

    @property
    def completed(self) -> list[Run]:
        return [r for r in self.runs if r.status == "completed"]

    def stat(self, key: str) -> tuple[float | None, float | None, int]:
        values = [v for r in self.completed if (v := r.value(key)) is not None]
        if not values:
            return None, None, 0
        return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None), len(values)


# ---- reading --------------------------------------------------------------------------------------
def find_runs(root: Path) -> list[Run]:
    """Every run directory below root: one that Hydra wrote (.hydra/) or that holds a summary.json."""
    dirs = {p.parent.parent for p in root.rglob(".hydra/config.yaml")} | {p.parent for p in root.rglob("summary.json")}
    runs = [load_run(d) for d in sorted(dirs) if d != root or not (root / "multirun.yaml").exists()]
    return sorted(runs, key=lambda r: _job_num(r.path))


def _job_num(path: Path) -> tuple[int, str]:
    head = path.name.split("_", 1)[0]
    return (int(head), path.name) if head.isdigit() else (1 << 30, path.name)


def load_run(path: Path) -> Run:
    summary_file = path / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    run = Run(path, _overrides(path), summary)
    run.curve = val_curve(path, summary)
    return run


def _overrides(path: Path) -> dict[str, str]:
    file = path / ".hydra" / "overrides.yaml"
    if not file.exists():
        return {}
    import yaml

    out = {}
    for item in yaml.safe_load(file.read_text()) or []:
        key, _, value = str(item).partition("=")
        out[key.lstrip("+~")] = value
    return out


def val_curve(path: Path, summary: dict[str, Any]) -> list[tuple[float, float]]:
    """(tokens seen, val loss) from csv/metrics.csv; `step` is the 0-based index of the last optimizer step."""
    file = path / "csv" / "metrics.csv"
    steps, tokens = summary.get("steps"), summary.get("tokens_seen")
    if not file.exists() or not steps or not tokens:
        return []
    tokens_per_step = tokens / steps
    with open(file) as f:
        rows = [(int(r["step"]), float(r["val/loss"])) for r in csv.DictReader(f) if r.get("val/loss")]
    return [((step + 1) * tokens_per_step, loss) for step, loss in rows]


# ---- analysis -------------------------------------------------------------------------------------
def swept_keys(runs: list[Run]) -> list[str]:
    """Override keys whose value differs between runs, in the order they first appear."""
    keys: list[str] = []
    for run in runs:
        keys += [k for k in run.overrides if k not in keys]
    return [k for k in keys if len({r.overrides.get(k) for r in runs}) > 1]


def group_points(runs: list[Run], keys: list[str]) -> list[Point]:
    points: dict[tuple, Point] = {}
    for run in runs:
        choices = {k: run.overrides.get(k, "") for k in keys if k != SEED_KEY}
        points.setdefault(tuple(choices.values()), Point(choices, [])).runs.append(run)
    return list(points.values())


def pooled_std(points: list[Point], key: str = COMPARED) -> tuple[float | None, int]:
    """Seed-to-seed standard deviation pooled over points, and its degrees of freedom."""
    ss, dof = 0.0, 0
    for point in points:
        values = [v for r in point.completed if (v := r.value(key)) is not None]
        if len(values) > 1:
            mean = statistics.fmean(values)
            ss += sum((v - mean) ** 2 for v in values)
            dof += len(values) - 1
    return (math.sqrt(ss / dof), dof) if dof else (None, 0)


def differences(points: list[Point], key: str = COMPARED) -> list[dict[str, Any]]:
    """Every pair of points: the difference of means, the threshold from the seed spread, and the verdict."""
    s, _ = pooled_std(points, key)
    out = []
    ok = [p for p in points if p.stat(key)[2] > 0]
    for i, a in enumerate(ok):
        for b in ok[i + 1 :]:
            (ma, _, na), (mb, _, nb) = a.stat(key), b.stat(key)
            threshold = 2 * s * math.sqrt(1 / na + 1 / nb) if s is not None else None
            out.append({
                "a": a.label, "b": b.label, "diff": ma - mb, "threshold": threshold,
                "larger": None if threshold is None else abs(ma - mb) > threshold,
            })
    return out


# ---- writing --------------------------------------------------------------------------------------
def _fmt(fmt: str, mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return fmt.format(mean) + (f" ± {fmt.format(std)}" if std is not None else "")


def table_rows(points: list[Point]) -> tuple[list[str], list[list[str]]]:
    keys = list(points[0].choices) if points else []
    header = [k.split("/")[-1] for k in keys] + ["seeds"] + [m[0] for m in METRICS] + ["status"]
    rows = []
    for p in points:
        n_ok, n = len(p.completed), len(p.runs)
        bad = sorted({r.status for r in p.runs} - {"completed"})  # failed (summary says so) or missing (no summary)
        status = "ok"
        if n_ok < n:
            status = "FAILED" if n_ok == 0 else f"{n - n_ok} of {n} FAILED"
            status += "" if bad == ["failed"] else f" ({', '.join(bad)})"
        cells = [p.choices[k] for k in keys] + [f"{n_ok}/{n}"]
        cells += [_fmt(fmt, *p.stat(key)[:2]) for _, key, fmt in METRICS]
        rows.append(cells + [status])
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def significance_text(points: list[Point]) -> list[str]:
    s, dof = pooled_std(points)
    if s is None:
        return ["One completed seed per point: there is no seed-to-seed spread to judge the differences against."]
    lines = [
        f"Seed-to-seed spread of the final val loss (pooled std over points, {dof} degrees of freedom): **{s:.4f}**. "
        "A difference counts as larger than the spread when |Δ| > 2·s·√(1/n_a + 1/n_b).",
        "",
    ]
    diffs = differences(points)
    larger = [d for d in diffs if d["larger"]]
    lines += [f"{len(larger)} of {len(diffs)} pairwise differences are larger than the seed spread.", ""]
    lines += ["| a | b | Δ final val loss (a − b) | threshold | larger than seed spread |", "|---|---|---|---|---|"]
    for d in sorted(diffs, key=lambda d: -abs(d["diff"])):
        lines.append(f"| {d['a']} | {d['b']} | {d['diff']:+.4f} | {d['threshold']:.4f} | {'**yes**' if d['larger'] else 'no'} |")
    return lines


def plot_curves(points: list[Point], path: Path, title: str) -> bool:
    if not any(r.curve for p in points for r in p.runs):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, point in enumerate(points):
        color = colors[i % len(colors)]
        curves = [r.curve for r in point.completed if r.curve]
        for curve in curves:
            ax.plot(*zip(*curve, strict=True), color=color, alpha=0.35, linewidth=0.8)
        common = min((len(c) for c in curves), default=0)
        if common:
            xs = [curves[0][j][0] for j in range(common)]
            ys = [statistics.fmean(c[j][1] for c in curves) for j in range(common)]
            ax.plot(xs, ys, color=color, linewidth=2, marker="o", markersize=3, label=f"{point.label} (n={len(curves)})")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("val loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def failures_text(runs: list[Run]) -> list[str]:
    failed = [r for r in runs if r.status != "completed"]
    if not failed:
        return []
    lines = ["## Failed runs", ""]
    for r in failed:
        lines.append(f"- `{r.path.name}`: {r.status}: {r.summary.get('error', 'no summary.json (killed or never started)')}")
    return lines + [""]


def data_text(runs: list[Run]) -> list[str]:
    """Which data the runs read (summary.json "data"): one line when they agree, a warning when they do not,
    since a sweep over model choices means nothing across different datasets."""
    readers: dict[str, list[Run]] = {}
    names: dict[str, str] = {}
    for r in runs:
        data = r.summary.get("data") or {}
        if data.get("fingerprint"):
            readers.setdefault(data["fingerprint"], []).append(r)
            names[data["fingerprint"]] = Path(data.get("dataset", "")).name
    if not readers:
        return []
    if len(readers) == 1:
        (only,) = readers
        return [f"All runs read the same data: `{names[only]}` (fingerprint `{only}`).", ""]
    warning = f"**The runs read {len(readers)} different datasets**: compare them only if the sweep varies the data."
    lines = ["## Data", "", warning, ""]
    lines += [f"- `{names[fp]}` (fingerprint `{fp}`): {', '.join(r.path.name for r in rs)}" for fp, rs in readers.items()]
    return lines + [""]


def write_report(root: Path, out: Path, title: str | None = None, note: str | None = None) -> dict[str, Any]:
    runs = find_runs(root)
    if not runs:
        raise SystemExit(f"no run directories under {root}")
    keys = swept_keys(runs)
    points = group_points(runs, keys)
    title = title or f"Comparison: {', '.join(k for k in keys if k != SEED_KEY) or root.name}"
    out.mkdir(parents=True, exist_ok=True)
    header, rows = table_rows(points)
    has_plot = plot_curves(points, out / "val_loss.png", title)

    commits = sorted({r.summary.get("git_commit") for r in runs if r.summary.get("git_commit")})
    intro = [
        f"# {title}", "",
        f"{len(runs)} runs ({sum(r.status == 'completed' for r in runs)} completed) in `{root.name}`; "
        f"swept: {', '.join(f'`{k}`' for k in keys) or 'nothing'}; mean ± std over seeds"
        + (f"; git commit {', '.join(c[:10] for c in commits)}." if commits else "."), "",
    ]
    intro += [note, ""] if note else []
    intro += data_text(runs)
    md = intro + [markdown_table(header, rows), "", "## Differences vs seed-to-seed spread", ""] + significance_text(points)
    md += [""] + downstream_lines(points)  # callbacks=downstream: eval/* per point, paired tests on the same questions
    md += failures_text(runs)
    if has_plot:
        md += ["## Validation loss", "", "![val loss against tokens seen](val_loss.png)", ""]
    (out / "report.md").write_text("\n".join(md))
    _write_html(out, title, md, has_plot)
    _write_csv(out / "report.csv", points)
    _write_runs_csv(out / "runs.csv", runs, keys)
    return {"runs": runs, "points": points, "keys": keys, "out": out}


def _write_html(out: Path, title: str, md: list[str], has_plot: bool) -> None:
    body = []
    table: list[str] = []
    for line in md + [""]:
        if line.startswith("|"):
            table.append(line)
            continue
        if table:
            cells = [[c.strip() for c in row.strip("|").split(" | ")] for row in table if not row.startswith("|---")]
            head = "".join(f"<th>{html.escape(c)}</th>" for c in cells[0])
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in cells[1:])
            body.append(f"<table><tr>{head}</tr>{rows}</table>")
            table = []
        if line.startswith("!["):
            if has_plot:
                data = base64.b64encode((out / "val_loss.png").read_bytes()).decode()
                body.append(f'<img alt="val loss" src="data:image/png;base64,{data}">')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('# '))}</h{level}>")
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    style = "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;font:13px sans-serif}"
    doc = f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style>"
    (out / "report.html").write_text(doc + "</head><body>" + "\n".join(body) + "</body></html>\n")


def _write_csv(path: Path, points: list[Point]) -> None:
    keys = list(points[0].choices) if points else []
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        stats = [s for _, key, _ in METRICS for s in (f"{key}_mean", f"{key}_std")]
        w.writerow(keys + ["seeds_completed", "seeds", "status"] + stats)
        for p in points:
            n_ok, n = len(p.completed), len(p.runs)
            row = [p.choices[k] for k in keys] + [n_ok, n, "ok" if n_ok == n else "failed"]
            for _, key, _ in METRICS:
                mean, std, _ = p.stat(key)
                row += ["" if mean is None else repr(mean), "" if std is None else repr(std)]
            w.writerow(row)


def _write_runs_csv(path: Path, runs: list[Run], keys: list[str]) -> None:
    fields = ["final_val_loss", "best_val_loss", "final_val_ppl", "params", "tokens_per_s", "mfu", "wall_time_s",
              "peak_memory_bytes", "steps", "tokens_seen"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run"] + keys + ["status", "error"] + fields)
        for r in runs:
            values = ["" if r.summary.get(k) is None else r.summary[k] for k in fields]
            w.writerow([r.path.name] + [r.overrides.get(k, "") for k in keys] + [r.status, r.summary.get("error", "")] + values)


# ---- W&B ------------------------------------------------------------------------------------------
def wandb_online() -> bool:
    from llmkit.resolvers import wandb_offline

    return not wandb_offline()


def publish_wandb_report(
    project: str, group: str | None, keys: list[str], title: str, markdown: str, entity: str | None = None, save: bool = True
) -> Any:
    """The comparison as a W&B Report: the sweep's runs (its group), grouped by the swept choices (logged as
    `choices.<group>` and plain config keys). Needs network, an API key and `pip install wandb-workspaces`."""
    import wandb_workspaces.reports.v2 as wr

    entity = entity or os.environ.get("WANDB_ENTITY", "")
    groupby = [f"config.choices.{k}" if "/" in k or k in CONFIG_GROUPS else f"config.{k}" for k in keys if k != SEED_KEY]
    runset = wr.Runset(entity=entity, project=project, name="sweep", filters=f"Metric('Group') == '{group}'" if group else "",
                       groupby=groupby)
    panels = [
        wr.LinePlot(title="val loss", x="trainer/global_step", y=["val/loss"], groupby_aggfunc="mean",
                    groupby_rangefunc="stddev"),
        wr.LinePlot(title="train loss", x="trainer/global_step", y=["train/loss"], groupby_aggfunc="mean",
                    groupby_rangefunc="stddev", smoothing_factor=0.6),
        wr.BarPlot(title="final val loss", metrics=["val/loss"], groupby_aggfunc="mean", groupby_rangefunc="stddev"),
    ]
    report = wr.Report(project=project, entity=entity, title=title, description="llmkit report",
                       blocks=[wr.MarkdownBlock(text=markdown), wr.PanelGrid(runsets=[runset], panels=panels)])
    if save:
        report.save()
        print(f"W&B report: {report.url}")
    return report
