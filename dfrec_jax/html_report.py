"""`report`: one browsable HTML page for a `recover` output folder.

    python -m dfrec_jax report --input OUT [--output OUT/report.html]
    python -m dfrec_jax recover ... --output OUT --report      (written after the recovery)

The page (OUT/report.html by default) reads the folder's evidence records: each image's panel
(input | forged pixels tinted red | recovered source | recovered target), verdict, forgery
probability, identity similarities, input and output sha256; a `recover --video` clip's
verdict, frame counts, aggregated spread and contact sheet; and, where `trace` wrote
OUT/trace.json (or a clip's <clip>_trace.json), each face's best gallery candidates. Rows sort by
forgery probability (highest first; the column header toggles the order).

Self-contained: no network, no script or style from elsewhere; images are linked relative to
the page (the PNGs recover wrote beside it), so the folder can be copied or zipped as a whole.
The page holds no timestamp: the same folder gives the same bytes.
"""

from __future__ import annotations

import html
import json
import os

from dfrec_jax import recover, trace, video

REPORT_NAME = "report.html"
TOP_CANDIDATES = 3

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; width: 100%; }
th, td { border-bottom: 1px solid #ccc; padding: 6px; text-align: left; vertical-align: top; }
th button { font: inherit; font-weight: bold; border: none; background: none; cursor: pointer; }
img.panel { height: 112px; image-rendering: pixelated; }
img.sheet { max-width: 640px; }
.forgery { color: #b00; font-weight: bold; }
.pristine { color: #070; font-weight: bold; }
code { font-size: 0.8em; word-break: break-all; }
"""

# Sorts the rows by their data-probability attribute; each click flips the order.
_SCRIPT = """
var descending = true;
function sortByProbability() {
  var body = document.getElementById("rows");
  var rows = Array.prototype.slice.call(body.rows);
  descending = !descending;
  rows.sort(function (a, b) {
    var d = parseFloat(a.dataset.probability) - parseFloat(b.dataset.probability);
    return descending ? -d : d;
  });
  rows.forEach(function (row) { body.appendChild(row); });
  document.getElementById("order").textContent = descending ? "\\u25bc" : "\\u25b2";
}
"""


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_folder(folder: str) -> tuple[list[dict], dict]:
    """(image and clip records of `folder`, {(stem, role): trace candidates}); every JSON that
    is not a recover or clip record is left out."""
    records, ranking = [], {}
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".json"):
            continue
        data = _read_json(os.path.join(folder, name))
        if data is None:
            continue
        if data.get("format") in (recover.FORMAT, video.FORMAT):
            records.append(data)
        elif data.get("format") == trace.FORMAT:
            for face in data.get("faces", []):
                ranking[(face["stem"], face["role"])] = face["candidates"][:TOP_CANDIDATES]
    return records, ranking


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _img(src: str, css: str, alt: str) -> str:
    return f'<img class="{css}" src="{_e(src)}" alt="{_e(alt)}">'


def _candidates(ranking: dict, stem: str) -> str:
    parts = []
    for role in ("target", "source"):
        candidates = ranking.get((stem, role))
        if candidates:
            names = ", ".join(f"{_e(c['person'])} ({c['facenet']['cosine']:.3f})"
                              for c in candidates)  # fmt: skip
            parts.append(f"{role}: {names}")
    return "<br>".join(parts) or "&ndash;"


def _image_row(record: dict, ranking: dict, link) -> str:
    outputs = record["outputs"]
    hashes = "".join(f"<li>{_e(kind)}: <code>{_e(o['sha256'])}</code></li>"
                     for kind, o in sorted(outputs.items()))  # fmt: skip
    probability = float(record["forgery_probability"])
    return (
        f'<tr data-probability="{probability:.6f}"><td>{_e(record["stem"])}<br>'
        f'<small>{_e(record["input"]["path"])}</small></td>'
        f"<td>{_img(link(outputs['panel']['file']), 'panel', record['stem'] + ' panel')}</td>"
        f'<td class="{_e(record["verdict"])}">{_e(record["verdict"])}</td>'
        f"<td>{probability:.3f}</td>"
        f"<td>FaceNet {record['identity_similarity_input_target']:.3f}<br>"
        f"dlib {record['identity_similarity_input_target_dlib']:.3f}</td>"
        f"<td>{_candidates(ranking, record['stem'])}</td>"
        f"<td><details><summary>sha256</summary>input <code>{_e(record['input_sha256'])}"
        f"</code><ul>{hashes}</ul></details></td></tr>"
    )


def _clip_row(record: dict, ranking: dict, link) -> str:
    stem = os.path.splitext(os.path.basename(record["clip"]["path"]))[0]
    probability = float(record["forgery_probability"]["mean"])
    spread = record["aggregate"]["target"]["facenet"]["spread"]
    sheet = record["outputs"]["contact_sheet"]
    return (
        f'<tr data-probability="{probability:.6f}"><td>{_e(stem)} (video)<br>'
        f"<small>{_e(record['clip']['path'])}</small></td>"
        f"<td>{_img(link(sheet['file']), 'sheet', stem + ' contact sheet')}</td>"
        f'<td class="{_e(record["verdict"])}">{_e(record["verdict"])}<br><small>'
        f"{record['forgery_frames']} of {record['recovered_frames']} frames forged</small></td>"
        f"<td>{probability:.3f} (mean)</td>"
        f"<td>target FaceNet spread: mean {spread['mean']:.3f}, min {spread['min']:.3f}</td>"
        f"<td>{_candidates(ranking, stem)}</td>"
        f"<td><details><summary>sha256</summary>video <code>{_e(record['clip']['sha256'])}"
        f"</code><ul><li>contact sheet: <code>{_e(sheet['sha256'])}</code></li></ul>"
        "</details></td></tr>"
    )


def render(records: list[dict], ranking: dict, title: str, link=lambda name: name) -> str:
    """The page for `records` (sorted by forgery probability, highest first); `link` maps an
    output file name to its address relative to the page."""

    def probability(record):
        value = record["forgery_probability"]
        return float(value["mean"] if isinstance(value, dict) else value)

    rows = [
        (_clip_row if r.get("format") == video.FORMAT else _image_row)(r, ranking, link)
        for r in sorted(records, key=lambda r: (-probability(r), r.get("stem", "")))
    ]
    first = records[0] if records else {}
    checkpoint = first.get("checkpoint", {})
    summary = (
        f"{len(records)} records; checkpoint {_e(checkpoint.get('path', '?'))} step "
        f"{_e(checkpoint.get('step', '?'))}, params sha256 "
        f"<code>{_e(checkpoint.get('params_sha256', '?'))}</code>; verdict threshold "
        f"{_e(first.get('verdict_threshold', '?'))}"
    )
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{_e(title)}</h1><p>{summary}</p><table><thead><tr><th>input</th>"
        "<th>input | forged pixels | source | target</th><th>verdict</th>"
        '<th><button type="button" onclick="sortByProbability()">forgery probability '
        '<span id="order">\u25bc</span></button></th><th>identity similarity input / target'
        "</th><th>trace (best gallery matches)</th><th>hashes</th></tr></thead>"
        f'<tbody id="rows">{"".join(rows)}</tbody></table>'
        f"<script>{_SCRIPT}</script></body></html>\n"
    )


def write(folder: str, output: str | None = None) -> str:
    """Writes the page for the recover output `folder`; returns its path. ValueError when the
    folder holds no evidence record."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"recover output folder not found: {folder}")
    records, ranking = read_folder(folder)
    if not records:
        raise ValueError(f"no recover evidence records (*.json) in {folder}")
    output = output or os.path.join(folder, REPORT_NAME)
    title = f"DFREC recovery report: {os.path.basename(os.path.abspath(folder))}"
    here = os.path.dirname(os.path.abspath(output))

    def link(name: str) -> str:
        return os.path.relpath(os.path.join(os.path.abspath(folder), name), here)

    recover.write_atomic(output, render(records, ranking, title, link).encode())
    return output
