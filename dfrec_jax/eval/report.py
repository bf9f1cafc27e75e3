"""Markdown tables of an `eval` metrics dict (pure functions: no models, no files).

    table_i(metrics)          the paper's Table I layout: rows None, inpainting, DFREC;
                              columns each forgery method + "All"; target IDSim (FaceNet)
    full_table(metrics)       one group ("All"), one column per metric, one row per method
    robustness_table(metrics) a `--perturb NAME` run: one row per level
    document(metrics)         what `eval` writes to table.md

A cell is a per-sample summary ({"mean", "std", "n"}: the mean is shown), a number (FID,
accuracy, AUC) or null, shown as "–" (undefined, or not applicable to that row).
"""

from __future__ import annotations

# Table I of the paper (target IDSim, FaceNet cosine of recovered vs true target), for
# comparison only: those numbers come from other data (FF++, CelebaMegaFS, FFHQ-E4S).
PAPER_TABLE_I = {
    "metric": "idsim_target_facenet",
    "source": "DFREC (arXiv 2412.07260) Table I",
    "columns": {"none": "None (forgery vs target)", "dfi": "best prior (DFI)", "dfrec": "DFREC"},
    "values": {
        "FF++ DeepFake": {"none": 0.4238, "dfi": 0.4706, "dfrec": 0.5367},
        "FF++ FaceShifter": {"none": 0.4252, "dfi": 0.5207, "dfrec": 0.5047},
        "FF++ LCR": {"none": 0.3516, "dfi": 0.4860, "dfrec": 0.5135},
        "CelebaMegaFS FTM": {"none": 0.2792, "dfi": 0.4137, "dfrec": 0.7192},
        "CelebaMegaFS IDInjection": {"none": 0.3150, "dfi": 0.4346, "dfrec": 0.7582},
        "CelebaMegaFS LCR": {"none": 0.2318, "dfi": 0.3442, "dfrec": 0.6967},
        "FFHQ-E4S": {"none": 0.2812, "dfi": 0.3805, "dfrec": 0.5870},
    },
}

ALL = "All"
DASH = "–"
# (metric key, column header, format) of the full table.
METRICS = (
    ("idsim_target_facenet", "IDSim target FaceNet ↑", ".4f"),
    ("idsim_target_dlib", "IDSim target dlib ↑", ".4f"),
    ("dlib_match_target", "dlib same person ↑", ".4f"),
    ("idsim_source_facenet", "IDSim source FaceNet ↑", ".4f"),
    ("idsim_source_dlib", "IDSim source dlib ↑", ".4f"),
    ("fid", "FID ↓", ".2f"),
    ("lpips", "LPIPS ↓", ".4f"),
    ("psnr", "PSNR dB ↑", ".2f"),
    ("ssim", "SSIM ↑", ".4f"),
    ("recovery_accuracy", "Recovery acc. ↑", ".4f"),
    ("auc", "AUC ↑", ".4f"),
    ("mask_iou", "Mask IoU ↑", ".4f"),
    ("pose_error", "Pose error ° ↓", ".2f"),
)
# (row, metric key, column header, format) of the robustness table.
ROBUSTNESS = (
    ("dfrec", "idsim_target_facenet", "DFREC IDSim target FaceNet", ".4f"),
    ("none", "idsim_target_facenet", "None IDSim target FaceNet", ".4f"),
    ("dfrec", "recovery_accuracy", "DFREC recovery acc.", ".4f"),
    ("dfrec", "auc", "DFREC AUC", ".4f"),
    ("dfrec", "psnr", "DFREC PSNR dB", ".2f"),
    ("dfrec", "ssim", "DFREC SSIM", ".4f"),
)


def value(cell) -> float | None:
    """The number a cell shows: a summary's mean, a plain number, or None."""
    if isinstance(cell, dict):
        cell = cell.get("mean")
    return None if cell is None else float(cell)


def _format(cell, fmt: str) -> str:
    v = value(cell)
    return DASH if v is None else format(v, fmt)


def _markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


def _rows(metrics: dict) -> list[tuple[str, str]]:
    """(row key, label) in table order (metrics.json stores the order: its keys are sorted)."""
    labels = metrics.get("row_labels", {})
    return [(row, labels.get(row, row)) for row in metrics["row_order"]]


def table_i(metrics: dict, rows: dict | None = None) -> str:
    """Target IDSim (FaceNet), 4 decimals: a row per recovery method, a column per forgery
    method present and "All". `rows` defaults to metrics["rows"] (give one level's rows)."""
    rows = metrics["rows"] if rows is None else rows
    groups = metrics["groups"]
    body = [
        [label] + [_format(rows[row][g]["idsim_target_facenet"], ".4f") for g in groups]
        for row, label in _rows(metrics)
    ]
    return _markdown(["Method"] + list(groups), body)


def full_table(metrics: dict, group: str = ALL, rows: dict | None = None) -> str:
    """Every metric of one group: a row per recovery method, a column per metric."""
    rows = metrics["rows"] if rows is None else rows
    body = [
        [label] + [_format(rows[row][group][key], fmt) for key, _, fmt in METRICS]
        for row, label in _rows(metrics)
    ]
    return _markdown(["Method"] + [header for _, header, _ in METRICS], body)


def robustness_table(metrics: dict, group: str = ALL) -> str:
    """One row per perturbation level (numeric order) of a multi-level run."""
    levels = sorted(metrics["levels"], key=float)
    body = [
        [level]
        + [
            _format(metrics["levels"][level][row][group][key], fmt)
            for row, key, _, fmt in ROBUSTNESS
        ]
        for level in levels
    ]
    return _markdown([metrics["perturb"]] + [header for _, _, header, _ in ROBUSTNESS], body)


def _caption(metrics: dict) -> str:
    ckpt, counts = metrics["checkpoint"], metrics["num_examples"]
    dataset = metrics["dataset"]["name"]
    perturb = f", perturbation {metrics['perturb']}" if metrics.get("perturb") else ""
    return (
        f"{dataset} split {metrics['split']}{perturb}; checkpoint step {ckpt['step']} "
        f"({ckpt['path']}); {counts['forged']} forged + {counts['pristine']} pristine examples.\n"
    )


def document(metrics: dict) -> str:
    """table.md: Table I and the full "All" table, or the robustness table for a run over
    perturbation levels."""
    if "levels" in metrics:
        return "\n".join(
            [
                f"# Robustness to {metrics['perturb']}\n",
                _caption(metrics),
                robustness_table(metrics),
            ]
        )
    return "\n".join(
        [
            "# Target identity similarity (FaceNet), as in the paper's Table I\n",
            _caption(metrics),
            table_i(metrics),
            f"# All metrics, group {ALL}\n",
            full_table(metrics),
        ]
    )
