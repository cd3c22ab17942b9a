"""The HTML page and the matplotlib charts of `prep report` (see prep/report.py).

The page is static and self-contained: inline CSS, no script, no external font or URL; the
PNGs it shows sit beside it and are referenced by relative file names. Every piece of text
from the data (captions, ids, paths, model names) goes through `html.escape`.
"""

from __future__ import annotations

import datetime as _dt
import html
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from prep import __version__
from prep.config import T5_MAX_LENGTH

CHART_SIZE = (6.0, 3.3)  # inches; saved at CHART_DPI
CHART_DPI = 130
BAR_COLOR = "#3b6ea8"
ALERT_COLOR = "#c81e1e"
VERIFY_STATES = ("valid", "invalid", "missing", "stale", "unknown")
BAD_STATES = ("invalid", "missing", "stale")


@dataclass(frozen=True)
class Chart:
    path: Path
    title: str
    alt: str
    caption: str


# ------------------------------------------------------------------------------ charts
def _new_figure(figure_classes):
    from matplotlib.ticker import MaxNLocator

    figure_cls, canvas_cls = figure_classes
    fig = figure_cls(figsize=CHART_SIZE, dpi=CHART_DPI, layout="constrained")
    canvas_cls(fig)
    ax = fig.add_subplot()
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    return fig, ax


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#666")
    ax.set_xticks([])
    ax.set_yticks([])


def _bucket_order(name: str) -> tuple[int, float, str]:
    try:
        width, height = (int(v) for v in name.split("x"))
        return (0, width / height, name)
    except ValueError:
        return (1, 0.0, name)


def _int_bins(values: list[int], max_bins: int = 40) -> list[float]:
    low, high = min(values), max(values)
    step = max(1, math.ceil((high - low + 1) / max_bins))
    return [low - 0.5 + i * step for i in range(math.ceil((high - low + 1) / step) + 1)]


def bucket_chart(buckets: Counter, path: Path, figure_classes) -> None:
    fig, ax = _new_figure(figure_classes)
    if buckets:
        names = sorted(buckets, key=_bucket_order)
        bars = ax.bar(range(len(names)), [buckets[n] for n in names], color=BAR_COLOR)
        ax.bar_label(bars, padding=2, fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=30 if len(names) > 5 else 0, ha="right" if len(names) > 5 else "center", fontsize=8)
        ax.set_xlabel("aspect bucket (W×H, narrow to wide)")
        ax.set_ylabel("images")
        ax.margins(y=0.15)
    else:
        _empty(ax, "no records")
    ax.set_title("Images per aspect bucket", fontsize=11)
    fig.savefig(path)


def median_of(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def size_chart(megapixels: list[float], path: Path, figure_classes) -> None:
    fig, ax = _new_figure(figure_classes)
    if megapixels:
        ax.hist(megapixels, bins=min(40, max(5, len(set(megapixels)))), color=BAR_COLOR)
        ax.set_xlabel("original size (megapixels = width × height / 10⁶)")
        ax.set_ylabel("images")
        ax.axvline(median_of(megapixels), color="#444", linestyle=":", linewidth=1, label="median")
        ax.legend(frameon=False, fontsize=8)
    else:
        _empty(ax, "no record has a width and height")
    ax.set_title("Original image sizes", fontsize=11)
    fig.savefig(path)


def words_chart(words: list[int], path: Path, figure_classes) -> None:
    fig, ax = _new_figure(figure_classes)
    if words:
        ax.hist(words, bins=_int_bins(words), color=BAR_COLOR)
        ax.set_xlabel("words per caption")
        ax.set_ylabel("captions")
    else:
        _empty(ax, "no captions")
    ax.set_title("Caption length (words)", fontsize=11)
    fig.savefig(path)


def tokens_chart(tokens: list[int], truncated: int, path: Path, figure_classes) -> None:
    fig, ax = _new_figure(figure_classes)
    if tokens:
        ax.hist(tokens, bins=_int_bins(tokens + [T5_MAX_LENGTH]), color=BAR_COLOR)
        ax.axvline(T5_MAX_LENGTH + 0.5, color=ALERT_COLOR, linestyle="--", linewidth=1.2)
        ax.text(T5_MAX_LENGTH + 0.5, ax.get_ylim()[1] * 0.95, f" {T5_MAX_LENGTH}-token limit", color=ALERT_COLOR, fontsize=8, va="top")
        ax.set_xlabel("T5 tokens per caption (with </s>, before truncation)")
        ax.set_ylabel("captions")
        share = truncated / len(tokens)
        ax.set_title(f"Caption length (T5 tokens): {share:.1%} truncated at {T5_MAX_LENGTH}", fontsize=11)
    else:
        _empty(ax, "no captions")
        ax.set_title("Caption length (T5 tokens)", fontsize=11)
    fig.savefig(path)


def render_charts(stats, out: Path, figure_classes) -> list[Chart]:
    """Write the chart PNGs into `out`; returns them in page order."""
    charts = []
    path = out / "buckets.png"
    bucket_chart(stats.buckets, path, figure_classes)
    charts.append(Chart(path, "Images per aspect bucket", "bar chart of images per aspect bucket",
                        f"{len(stats.buckets)} bucket(s), {sum(stats.buckets.values())} records"))
    path = out / "sizes.png"
    size_chart(stats.megapixels, path, figure_classes)
    charts.append(Chart(path, "Original sizes", "histogram of original image sizes in megapixels",
                        f"{len(stats.megapixels)} records with a size"
                        + (f"; median {median_of(stats.megapixels):.3g} MP, largest {max(stats.megapixels):.3g} MP"
                           if stats.megapixels else "")))
    path = out / "caption_words.png"
    words_chart(stats.caption_words, path, figure_classes)
    charts.append(Chart(path, "Caption length (words)", "histogram of caption lengths in words",
                        f"{len(stats.caption_words)} captions, {stats.no_caption} records without one"))
    if stats.token_counts is not None:
        path = out / "caption_tokens.png"
        tokens_chart(stats.token_counts, stats.truncated, path, figure_classes)
        charts.append(Chart(path, "Caption length (T5 tokens)", "histogram of caption lengths in T5 tokens",
                            f"{stats.truncated} of {len(stats.token_counts)} captions exceed {T5_MAX_LENGTH} tokens "
                            f"(tokenizer: {stats.tokenizer_id})"))
    else:
        (out / "caption_tokens.png").unlink(missing_ok=True)
    return charts


# ------------------------------------------------------------------------------ page
CSS = """
:root { --fg:#1c2026; --muted:#5f6874; --line:#d6dae0; --ok:#1d7a3a; --warn:#b45309; --bad:#c81e1e; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif; color:var(--fg); background:#eef1f4; }
main { max-width:1240px; margin:0 auto; padding:24px; }
h1 { font-size:26px; margin:0 0 4px; }
h2 { font-size:20px; margin:32px 0 12px; }
h3 { font-size:14px; margin:0 0 6px; text-transform:uppercase; letter-spacing:.04em; color:var(--muted); }
.meta { color:var(--muted); margin:0 0 18px; font-size:13px; overflow-wrap:anywhere; }
.card { background:#fff; border:1px solid var(--line); border-radius:10px; padding:18px 20px; }
.summary { border-top:6px solid var(--ok); }
.summary.warn { border-top-color:var(--warn); }
.verdict { font-weight:600; margin:0 0 14px; }
.summary.warn .verdict { color:var(--warn); }
.summary:not(.warn) .verdict { color:var(--ok); }
.tiles { display:grid; grid-template-columns:repeat(4,1fr); gap:12px; margin-bottom:18px; }
.tile { background:#f6f7f9; border-radius:8px; padding:10px 14px; }
.tile .n { font-size:28px; font-weight:700; line-height:1.1; }
.tile .l { color:var(--muted); font-size:13px; }
.tile.bad .n { color:var(--bad); }
.tile.good .n { color:var(--ok); }
.cols { display:grid; grid-template-columns:minmax(0,1fr) minmax(0,1.2fr) minmax(0,1.4fr); gap:24px; }
table { border-collapse:collapse; width:100%; font-size:13px; }
th,td { text-align:left; padding:4px 8px 4px 0; border-bottom:1px solid #eceef1; vertical-align:top; }
th { color:var(--muted); font-weight:600; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; padding-right:0; padding-left:8px; }
td.bad { color:var(--bad); font-weight:600; }
code, .mono { font-family:ui-monospace,"DejaVu Sans Mono",monospace; font-size:12px; overflow-wrap:anywhere; }
.notes { margin:16px 0 0; padding:10px 14px 10px 30px; background:#fff7ed; border:1px solid #fed7aa; border-radius:8px; font-size:13px; }
.charts { display:grid; grid-template-columns:repeat(2,minmax(0,1fr)); gap:16px; }
figure { margin:0; background:#fff; border:1px solid var(--line); border-radius:10px; padding:10px; }
figure img { width:100%; height:auto; display:block; }
figcaption { color:var(--muted); font-size:12px; margin-top:6px; overflow-wrap:anywhere; }
.sheet img { width:100%; height:auto; display:block; border-radius:10px; border:1px solid var(--line); background:#fff; margin-bottom:12px; }
.legend { color:var(--muted); font-size:13px; margin:-4px 0 12px; }
details { margin-top:8px; }
summary { cursor:pointer; font-weight:600; }
tr.flagged td { background:#fdf0f0; }
td { overflow-wrap:anywhere; }
.wide-table { overflow-x:auto; }
.wide-table table { table-layout:fixed; }
td.caption { max-width:520px; overflow-wrap:anywhere; word-break:break-word; }
td.warn { color:var(--warn); font-weight:600; }
footer { color:var(--muted); font-size:12px; margin-top:32px; }
@media (max-width: 900px) { .tiles,.cols,.charts { grid-template-columns:1fr; } }
"""


def e(value) -> str:
    """HTML-escaped text (quotes included, so it is safe in attributes too)."""
    return html.escape(str(value), quote=True)


def plural(count: int, singular: str, plural_form: str | None = None) -> str:
    """'1 record', '2 records' (the count included)."""
    return f"{count} {singular if count == 1 else plural_form or singular + 's'}"


def _pct(part: int, whole: int) -> str:
    return f"{part / whole:.1%}" if whole else "–"


def _tile(number, label: str, cls: str = "") -> str:
    return f'<div class="tile {cls}"><div class="n">{e(number)}</div><div class="l">{e(label)}</div></div>'


def _reasons_table(stats) -> str:
    if not stats.not_ready_reasons:
        return "<p>Every record is ready.</p>" if stats.records else "<p>No records.</p>"
    rows = "".join(
        f'<tr><td>{e(reason)}</td><td class="num">{count}</td></tr>'
        for reason, count in sorted(stats.not_ready_reasons.items(), key=lambda kv: (-kv[1], kv[0]))
    )
    return (
        '<table><thead><tr><th>reason</th><th class="num">records</th></tr></thead>'
        f"<tbody>{rows}</tbody></table>"
        '<p class="meta">A record with several problems counts under each.</p>'
    )


def _rejected_list(stats) -> str:
    if not stats.rejected_examples:
        return ""
    items = "".join(f"<li>line {line}: {e(reason)}</li>" for line, reason in stats.rejected_examples)
    more = stats.rejected_now - len(stats.rejected_examples)
    tail = f"<li>… and {more} more</li>" if more > 0 else ""
    return f'<h3 style="margin-top:14px">Rejected manifest lines</h3><ul class="meta">{items}{tail}</ul>'


def _verify_table(stats) -> str:
    rows = []
    for kind, counts in stats.artifacts.items():
        cells = "".join(
            f'<td class="num{" bad" if name in BAD_STATES and counts[name] else ""}">{counts[name]}</td>'
            for name in VERIFY_STATES
        )
        rows.append(f"<tr><td>{e(kind)}</td>{cells}</tr>")
    head = "".join(f'<th class="num">{name}</th>' for name in VERIFY_STATES)
    return (
        f'<table><thead><tr><th>type</th>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
        '<p class="meta">As <code>prep verify</code>: data read in full (shape, dtype, length, finite '
        "values). Stale (inputs or model changed) and unknown (no provenance) are among the valid.</p>"
    )


def _models_table(metadata: dict) -> str:
    models = metadata.get("models") if isinstance(metadata.get("models"), dict) else {}
    if not models:
        return "<p>No models recorded.</p>"
    rows = []
    for kind in sorted(models):
        entry = models[kind] if isinstance(models[kind], dict) else {}
        rows.append(
            f"<tr><td>{e(kind)}</td><td class=\"mono\">{e(entry.get('model_id', '?'))}</td>"
            f"<td class=\"mono\">{e(entry.get('revision', '?'))}</td></tr>"
        )
    return (
        "<table><thead><tr><th>pass</th><th>model</th><th>revision</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _convention_table(metadata: dict) -> str:
    convention = metadata.get("vae") if isinstance(metadata.get("vae"), dict) else {}
    if not convention:
        return "<p>No latent convention recorded.</p>"
    order = ["latent", "transform", "shift_factor", "scaling_factor", "model_id", "subfolder", "dtype", "compute_dtype"]
    keys = [k for k in order if k in convention] + sorted(k for k in convention if k not in order)
    rows = "".join(f"<tr><th>{e(k)}</th><td class=\"mono\">{e(convention[k])}</td></tr>" for k in keys)
    return f"<table><tbody>{rows}</tbody></table>"


def _summary(stats, metadata: dict, notes: list[str]) -> str:
    bad_types = sum(c["invalid"] + c["missing"] + c["stale"] for c in stats.artifacts.values())
    problems = stats.not_ready or stats.rejected_now or bad_types or stats.ready_but_invalid
    if not stats.records:
        verdict = "The manifest holds no usable record."
    elif problems:
        parts = []
        if stats.not_ready:
            parts.append(f"{stats.not_ready} of {plural(stats.records, 'record')} "
                         f"{'is' if stats.not_ready == 1 else 'are'} not ready for training")
        else:
            parts.append(f"all {plural(stats.records, 'record')} pass the readiness check")
        if stats.filtered:
            parts.append(f"{plural(sum(stats.filtered.values()), 'record')} of them flagged by curation "
                         "(see Filtered records)")
        if stats.rejected_now:
            parts.append(f"{plural(stats.rejected_now, 'manifest line')} rejected")
        if bad_types:
            parts.append(f"{plural(bad_types, 'side file')} invalid, missing or stale")
        verdict = "; ".join(parts)
        verdict = verdict[0].upper() + verdict[1:] + "."
    else:
        verdict = f"All {plural(stats.records, 'record')} are ready and every side file verifies."
    rejected_label = "rejected manifest lines"
    if stats.rejected_saved:
        rejected_label += f" (+{stats.rejected_saved} set aside earlier in .rejected.jsonl)"
    tiles = "".join(
        [
            _tile(stats.records, "records"),
            _tile(stats.ready, f"ready ({_pct(stats.ready, stats.records)})", "good" if stats.ready else ""),
            _tile(stats.not_ready, "not ready", "bad" if stats.not_ready else ""),
            _tile(stats.rejected_now, rejected_label, "bad" if stats.rejected_now else ""),
        ]
    )
    notes_html = ""
    if notes:
        notes_html = '<ul class="notes">' + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>"
    return f"""<section class="card summary{' warn' if problems or not stats.records else ''}" aria-label="summary">
<p class="verdict">{e(verdict)}</p>
<div class="tiles">{tiles}</div>
<div class="cols">
<div><h3>Not ready, by reason</h3>{_reasons_table(stats)}{_rejected_list(stats)}</div>
<div><h3>Side files (verify)</h3>{_verify_table(stats)}</div>
<div><h3>Models</h3>{_models_table(metadata)}<h3 style="margin-top:14px">Latent convention</h3>{_convention_table(metadata)}</div>
</div>
{notes_html}
</section>"""


def _charts(charts: list[Chart], out: Path) -> str:
    figures = "".join(
        f'<figure><img src="{e(c.path.relative_to(out).as_posix())}" alt="{e(c.alt)}" loading="lazy">'
        f"<figcaption>{e(c.caption)}</figcaption></figure>"
        for c in charts
    )
    return f'<section aria-label="charts"><h2>Distributions</h2><div class="charts">{figures}</div></section>'


def _sheet(entries, sheets: list[Path], out: Path, records: int, samples: int, seed: int, decoded: bool) -> str:
    flagged = [entry for entry in entries if entry.flags]
    legend = (
        f"{len(entries)} of {records} records sampled with seed {seed} (--samples {samples}). "
        "Each card: the original (the yellow box is the region kept by the crop), the bucket crop the VAE "
        "encoded (same preprocessing call as the pipeline), and "
        + ("the VAE decode of the stored latent." if decoded else "no decode (the latent is only checked).")
        + f" {len(flagged)} card(s) flagged in red. \"enlarged N×\" (amber; red above the --max-upscale in "
        "force) means the image was scaled up to cover its bucket: the latent is blurrier than its size suggests."
    )
    images = "".join(
        f'<img src="{e(path.relative_to(out).as_posix())}" alt="contact sheet page {i}: original, VAE input '
        f'crop and decoded latent for each sampled record">'
        for i, path in enumerate(sheets, start=1)
    )
    rows = []
    for entry in entries:
        size = f"{entry.width}×{entry.height}" if entry.width and entry.height else "?"
        flags = "<br>".join(e(f) for f in entry.flags) or "—"
        enlarged = f"{entry.upscale:.2f}×" if entry.upscale is not None and entry.upscale > 1.005 else "—"
        rows.append(
            f'<tr class="{"flagged" if entry.flags else ""}"><td class="mono">{e(entry.image_id)}</td>'
            f"<td>{e(entry.bucket or '?')}</td><td>{e(size)}</td>"
            f'<td class="num{" warn" if enlarged != "—" else ""}">{e(enlarged)}</td>'
            f'<td class="caption">{e(entry.caption) if entry.caption is not None else "<em>(no caption)</em>"}</td>'
            f"<td>{flags}</td></tr>"
        )
    table = (
        '<details open><summary>Sampled records (full captions)</summary><div class="wide-table"><table><thead><tr>'
        '<th style="width:16%">id</th><th style="width:9%">bucket</th><th style="width:9%">original</th>'
        '<th class="num" style="width:9%">enlarged</th><th style="width:39%">caption</th>'
        f"<th style=\"width:18%\">flags</th></tr></thead><tbody>{''.join(rows)}</tbody></table></div></details>"
        if entries
        else "<p>No records to sample.</p>"
    )
    return (
        f'<section class="sheet" aria-label="contact sheet"><h2>Contact sheet</h2><p class="legend">{e(legend)}</p>'
        f"{images}{table}</section>"
    )


def _filtered(stats, filtered, strip: Path | None, out: Path) -> str:
    """The flagged records: counts by reason, the strip of examples, and each example's reason in full."""
    if not stats.filtered:
        return ""
    counts = "".join(
        f'<tr><td>{e(reason)}</td><td class="num">{count}</td></tr>'
        for reason, count in sorted(stats.filtered.items(), key=lambda kv: (-kv[1], kv[0]))
    )
    total = sum(stats.filtered.values())
    legend = (
        f"{plural(total, 'record')} flagged by curation: kept in the manifest, but no model runs on them and the "
        "export leaves them out. `prep curate --dry-run` lists them all; change a threshold and run again to "
        "lift flags, `--keep-ids FILE` to keep some, `prep prune` to move them aside. A few examples of each reason:"
    )
    image = (f'<img src="{e(strip.relative_to(out).as_posix())}" alt="examples of flagged records with their '
             'reasons, and the kept image each duplicate duplicates">' if strip is not None else "")
    rows = "".join(
        f'<tr><td class="mono">{e(entry.image_id)}</td><td>{e(entry.reason)}</td>'
        f'<td class="caption">{e(entry.detail)}</td><td class="mono">{e(entry.kept_id or "—")}</td></tr>'
        for entry in filtered
    )
    table = ('<div class="wide-table"><table><thead><tr><th>id</th><th>reason</th><th>detail</th>'
             f"<th>duplicate of</th></tr></thead><tbody>{rows}</tbody></table></div>")
    return (
        f'<section class="sheet" aria-label="filtered"><h2>Filtered records</h2><p class="legend">{e(legend)}</p>'
        f'<table style="max-width:360px;margin-bottom:12px"><thead><tr><th>reason</th><th class="num">records</th>'
        f"</tr></thead><tbody>{counts}</tbody></table>{image}{table}</section>"
    )


def render_page(
    *,
    manifest_path: Path,
    derived_dir: Path,
    stats,
    metadata: dict,
    entries,
    sheets: list[Path],
    charts: list[Chart],
    notes: list[str],
    samples: int,
    seed: int,
    decoded: bool,
    filtered=(),
    strip: Path | None = None,
) -> str:
    out = sheets[0].parent if sheets else charts[0].path.parent
    when = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>prep report: {e(manifest_path.name)}</title>
<style>{CSS}</style>
</head>
<body>
<main>
<h1>Dataset report</h1>
<p class="meta">manifest <code>{e(manifest_path)}</code> · derived dir <code>{e(derived_dir)}</code> · {e(when)}</p>
{_summary(stats, metadata, notes)}
{_charts(charts, out)}
{_sheet(entries, sheets, out, stats.records - sum(stats.filtered.values()), samples, seed, decoded)}
{_filtered(stats, filtered, strip, out)}
<footer>Generated by prep {e(__version__)} (<code>prep report</code>). Self-contained: no network resources.</footer>
</main>
</body>
</html>
"""
