"""The run's report: PNG figures, ``report.html`` and ``summary.md`` from the stage artifacts.

Everything here reads artifacts that the other stages wrote (``paths.*`` of the config) and
writes one folder, ``paths.report``, atomically (built under a temporary name beside it, then
renamed). Inputs that are absent are not errors: the table shows "—" and a note says which file
was missing; a figure that needs a missing input is skipped with a note. Inputs that are present
but malformed (a store that fails its schema, a sweep table without its columns, scores of
another length than the store) are errors that name the file and the field.

Figures are drawn with matplotlib's Agg canvas directly (``Figure`` + ``FigureCanvasAgg``), so
the report never depends on, or changes, pyplot's global backend; each is saved at exactly
``figsize * DPI`` pixels (no tight bounding box).

Large N stays cheap: the data map reads the store in blocks of samples (all complete epochs of
a block at a time, block memory ``block_mb``), keeps only two (N,) float64 vectors, and draws at
most ``max_points`` points (a seeded random sample).
"""
from __future__ import annotations

import csv
import html
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .config import Config

__all__ = [
    "DPI", "MAX_POINTS", "DASH", "FigureInfo", "Section", "Report", "RunInputs",
    "load_inputs", "data_map_coordinates", "n_prune_of", "prune_threshold", "read_history_csv",
    "read_sweep_table", "run_table", "build_report",
]

DPI = 100
MAX_POINTS = 20_000  # data map: at most this many points drawn
GRID_PER_CLASS = 8  # image grids: images per class (columns)
GRID_MAX_CLASSES = 20  # image grids: at most this many classes (rows)
DASH = "—"
SWEEP_COLUMNS = ("method", "prune_rate", "mean", "std", "n")

_KEPT_COLOR = "#1f77b4"
_PRUNED_COLOR = "#9a9a9a"
_CUT_COLOR = "#d62728"


# ---------------------------------------------------------------------------------------------
# What the report is made of
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FigureInfo:
    """One PNG of the report: its file name inside the folder and its exact size in pixels."""

    file: str
    title: str
    caption: str
    size_px: tuple[int, int]  # (width, height) = figsize * DPI


@dataclass(frozen=True)
class Section:
    """A heading of the report with its figure, or the note that says why there is none."""

    heading: str
    figure: FigureInfo | None
    note: str = ""


@dataclass(frozen=True)
class Report:
    folder: Path
    sections: list[Section]
    table: list[tuple[str, str, str]]  # (quantity, value or DASH, source file or why absent)
    notes: list[str]
    summary_md: str
    seconds: float
    timings: dict[str, float]  # seconds per figure / step

    @property
    def figures(self) -> list[FigureInfo]:
        return [s.figure for s in self.sections if s.figure is not None]


@dataclass
class RunInputs:
    """Every artifact the report can use; ``None`` where the file is absent (see ``notes``)."""

    store: Any = None  # store.logits.LogitStore
    scores: dict[str, np.ndarray] | None = None  # name -> (N,)
    scores_attrs: dict[str, Any] = field(default_factory=dict)
    keep_ids: np.ndarray | None = None  # (n_keep,) ascending sample ids
    train_metrics: dict[str, Any] | None = None
    retrain_metrics: dict[str, Any] | None = None
    score_summary: dict[str, Any] | None = None
    train_history: list[dict[str, Any]] | None = None
    retrain_history: list[dict[str, Any]] | None = None
    sweep: dict[str, dict[str, np.ndarray]] | None = None  # method -> prune_rate, mean, std, n
    sweep_full: float | None = None
    absent: dict[str, str] = field(default_factory=dict)  # input key -> the missing path
    notes: list[str] = field(default_factory=list)

    @property
    def num_samples(self) -> int | None:
        if self.store is not None:
            return self.store.num_samples
        if self.scores:
            return int(next(iter(self.scores.values())).shape[0])
        return None

    @property
    def select_by(self) -> str | None:
        for source in (self.score_summary, self.scores_attrs, self.retrain_metrics):
            if source and source.get("select_by"):
                return str(source["select_by"])
        return None

    @property
    def prune_rate(self) -> float | None:
        for source in (self.score_summary, self.scores_attrs, self.retrain_metrics):
            if source and source.get("prune_rate") is not None:
                return float(source["prune_rate"])
        return None

    def kept_mask(self) -> np.ndarray | None:
        """(N,) bool, True = kept by the keep-list; None without a keep-list."""
        n = self.num_samples
        if self.keep_ids is None or n is None:
            return None
        mask = np.zeros(n, dtype=bool)
        mask[self.keep_ids] = True
        return mask


# ---------------------------------------------------------------------------------------------
# Reading the inputs
# ---------------------------------------------------------------------------------------------
_HOW = {
    "store": "run `tddyun train`",
    "scores": "run `tddyun score`",
    "keep": "run `tddyun score`",
    "score_summary": "run `tddyun score`",
    "train_metrics": "run `tddyun train`",
    "retrain_metrics": "run `tddyun retrain`",
    "train_history": "run `tddyun train`",
    "retrain_history": "run `tddyun retrain`",
    "sweep": "run `tddyun sweep`",
}


def _absent(inputs: RunInputs, key: str, path: str | Path) -> None:
    inputs.absent[key] = str(path)


def absent_note(inputs: RunInputs, key: str) -> str:
    return f"{inputs.absent[key]} absent ({_HOW.get(key, 'not produced')})"


def read_history_csv(path: str | Path) -> list[dict[str, Any]]:
    """Per-epoch rows of a history CSV (columns include ``epoch`` and ``test_accuracy``).

    Values are floats (``epoch`` an int); an empty cell is None. A missing column or a value
    that is not a number is a ValueError naming the file, the line and the field.
    """
    path = Path(path)
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        for column in ("epoch", "test_accuracy"):
            if column not in header:
                raise ValueError(f"{path}: line 1: column {column!r} missing: expected a header with "
                                 f"epoch and test_accuracy, found {','.join(header) or 'nothing'}")
        rows = []
        for lineno, row in enumerate(reader, start=2):
            parsed: dict[str, Any] = {}
            for key, text in row.items():
                if key is None or text is None:
                    raise ValueError(f"{path}: line {lineno}: expected {len(header)} fields")
                text = text.strip()
                if text == "":
                    parsed[key] = None
                    continue
                try:
                    parsed[key] = float(text)
                except ValueError:
                    raise ValueError(f"{path}: line {lineno}: {key} = {text!r}: expected a number") from None
            if parsed["epoch"] is None:
                raise ValueError(f"{path}: line {lineno}: epoch is empty: expected an integer")
            parsed["epoch"] = int(parsed["epoch"])
            rows.append(parsed)
    return rows


def read_sweep_table(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """A sweep's ``table.csv`` (columns method,prune_rate,mean,std,n) by method.

    Returns method -> {"prune_rate", "mean", "std", "n"} arrays sorted by prune rate. ``std``
    may be empty (one seed): NaN. Errors name the file, the line, the field and the value.
    """
    path = Path(path)
    out: dict[str, dict[str, list[float]]] = {}
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        missing = [c for c in SWEEP_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{path}: line 1: column {missing[0]!r} missing: expected columns "
                             f"{','.join(SWEEP_COLUMNS)}, found {','.join(header) or 'nothing'}")
        for lineno, row in enumerate(reader, start=2):
            method = (row.get("method") or "").strip()
            if not method:
                raise ValueError(f"{path}: line {lineno}: method is empty: expected a score name")
            values = {}
            for column in SWEEP_COLUMNS[1:]:
                text = (row.get(column) or "").strip()
                if text == "" and column == "std":
                    values[column] = math.nan
                    continue
                try:
                    values[column] = float(text)
                except ValueError:
                    raise ValueError(f"{path}: line {lineno}: {column} = {text!r}: expected a number") from None
            if not 0.0 <= values["prune_rate"] < 1.0:
                raise ValueError(f"{path}: line {lineno}: prune_rate = {values['prune_rate']!r}: "
                                 "expected a number in [0, 1)")
            entry = out.setdefault(method, {c: [] for c in SWEEP_COLUMNS[1:]})
            for column, value in values.items():
                entry[column].append(value)
    if not out:
        raise ValueError(f"{path}: line 2: no rows: expected one row per method and prune rate")
    result = {}
    for method, entry in out.items():
        order = np.argsort(entry["prune_rate"], kind="stable")
        result[method] = {c: np.asarray(v, dtype=np.float64)[order] for c, v in entry.items()}
    return result


def _read_full_json(path: Path) -> float:
    from store.artifacts import read_json

    data = read_json(path)
    value = data.get("final_test_accuracy") if isinstance(data, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{path}: final_test_accuracy = {value!r}: expected a number")
    return float(value)


def load_inputs(config: Config) -> RunInputs:
    """Read every artifact named by ``config.paths`` that exists; record the absent ones."""
    from store.artifacts import read_json, read_keep_csv, read_scores
    from store.logits import open_logits

    paths = config.paths
    inputs = RunInputs()
    if Path(paths.store).exists():
        inputs.store = open_logits(paths.store)
    else:
        _absent(inputs, "store", paths.store)
    if Path(paths.scores).exists():
        inputs.scores, inputs.scores_attrs = read_scores(paths.scores)
    else:
        _absent(inputs, "scores", paths.scores)
    if Path(paths.keep).exists():
        inputs.keep_ids = read_keep_csv(paths.keep)[0]
    else:
        _absent(inputs, "keep", paths.keep)
    for key in ("train_metrics", "retrain_metrics", "score_summary"):
        path = Path(getattr(paths, key))
        if path.is_file():
            data = read_json(path)
            if not isinstance(data, dict):
                raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
            setattr(inputs, key, data)
        else:
            _absent(inputs, key, path)
    for key, metrics in (("train_history", inputs.train_metrics), ("retrain_history", inputs.retrain_metrics)):
        path = Path(getattr(paths, key))
        if path.is_file():
            setattr(inputs, key, read_history_csv(path))
        elif metrics and isinstance(metrics.get("history"), list):
            setattr(inputs, key, list(metrics["history"]))
        else:
            _absent(inputs, key, path)
    sweep_table = Path(paths.sweep) / "table.csv"
    if sweep_table.is_file():
        inputs.sweep = read_sweep_table(sweep_table)
        full = Path(paths.sweep) / "full.json"
        if full.is_file():
            inputs.sweep_full = _read_full_json(full)
    else:
        _absent(inputs, "sweep", sweep_table)
    _check_consistency(inputs, config)
    return inputs


def _check_consistency(inputs: RunInputs, config: Config) -> None:
    """Scores and keep-list must describe the store's samples; stale metrics get a note."""
    paths = config.paths
    n = inputs.num_samples
    if inputs.store is not None and inputs.scores:
        for name, values in inputs.scores.items():
            if values.shape != (inputs.store.num_samples,):
                raise ValueError(f"{paths.scores}: {name}: expected shape ({inputs.store.num_samples},) "
                                 f"like the store {paths.store}, found {values.shape}")
        fingerprint = (inputs.scores_attrs.get("store") or {}).get("fingerprint")
        if fingerprint is not None and fingerprint != inputs.store.fingerprint:
            raise ValueError(f"{paths.scores}: attrs.store.fingerprint = {fingerprint}: expected the "
                             f"store's {inputs.store.fingerprint} ({paths.store}); rerun `tddyun score`")
    if inputs.keep_ids is not None and n is not None and inputs.keep_ids.size and inputs.keep_ids[-1] >= n:
        raise ValueError(f"{paths.keep}: sample_id = {int(inputs.keep_ids[-1])}: expected ids < N = {n}")
    if inputs.retrain_metrics and inputs.score_summary:
        for key in ("select_by", "prune_rate"):
            a, b = inputs.retrain_metrics.get(key), inputs.score_summary.get(key)
            if a is not None and b is not None and a != b:
                inputs.notes.append(
                    f"{paths.retrain_metrics} has {key} = {a!r} but {paths.score_summary} has {b!r}: "
                    "the retrain metrics are stale (rerun `tddyun retrain`)")


# ---------------------------------------------------------------------------------------------
# The table of the run
# ---------------------------------------------------------------------------------------------
def _first(*candidates: tuple[dict | None, str, str]) -> tuple[Any, str] | None:
    """The first (value, source path) among (mapping, key, path) whose value is present."""
    for data, key, path in candidates:
        if data and data.get(key) is not None:
            return data[key], path
    return None


def run_table(inputs: RunInputs, config: Config) -> tuple[list[tuple[str, str, str]], list[str]]:
    """Rows (quantity, value, source) of the run's table, and notes for the values shown as "—"."""
    p = config.paths
    tm, rm, ss = inputs.train_metrics, inputs.retrain_metrics, inputs.score_summary
    sa = inputs.scores_attrs or None
    rows: list[tuple[str, str, str]] = []
    notes: list[str] = []

    def add(quantity: str, found: tuple[Any, str] | None, fmt: Callable[[Any], str], needs: list[str]) -> None:
        if found is None:
            missing = [absent_note(inputs, k) for k in needs if k in inputs.absent]
            why = "; ".join(missing) if missing else f"not recorded in {' / '.join(_paths_of(p, needs))}"
            rows.append((quantity, DASH, why))
            notes.append(f"{quantity}: {why}")
        else:
            rows.append((quantity, fmt(found[0]), found[1]))

    pct = lambda v: f"{100 * float(v):.2f} %"  # noqa: E731
    add("Full-data test accuracy (final)", _first((tm, "final_test_accuracy", p.train_metrics)), pct,
        ["train_metrics"])
    add("Pruned test accuracy (final)", _first((rm, "final_test_accuracy", p.retrain_metrics)), pct,
        ["retrain_metrics"])
    kept = None
    if rm and rm.get("kept_fraction") is not None:
        kept = ((rm["kept_fraction"], rm.get("n_keep"), rm.get("n_total")), p.retrain_metrics)
    elif ss and ss.get("n_keep") is not None and ss.get("n_total"):
        kept = ((ss["n_keep"] / ss["n_total"], ss["n_keep"], ss["n_total"]), p.score_summary)
    elif inputs.keep_ids is not None and inputs.num_samples:
        kept = ((inputs.keep_ids.size / inputs.num_samples, inputs.keep_ids.size, inputs.num_samples), p.keep)

    def kept_fmt(v):
        frac, k, n = v
        return f"{float(frac):.4f}" + (f" ({int(k):,} of {int(n):,})" if k is not None and n else "")

    add("Kept fraction", kept, kept_fmt, ["retrain_metrics", "score_summary", "keep"])
    add("Prune rate", _first((ss, "prune_rate", p.score_summary), (sa, "prune_rate", p.scores),
                             (rm, "prune_rate", p.retrain_metrics)), lambda v: f"{float(v):g}",
        ["score_summary", "scores", "retrain_metrics"])
    add("Select by", _first((ss, "select_by", p.score_summary), (sa, "select_by", p.scores),
                            (rm, "select_by", p.retrain_metrics)), str,
        ["score_summary", "scores", "retrain_metrics"])
    add("Weighting", _first((ss, "weighting", p.score_summary), (rm, "weighting", p.retrain_metrics)), str,
        ["score_summary", "retrain_metrics"])
    add("Budget", _first((rm, "budget", p.retrain_metrics)), str, ["retrain_metrics"])
    add("Stage-one seconds", _first((tm, "train_seconds", p.train_metrics)), lambda v: f"{float(v):.1f} s",
        ["train_metrics"])
    add("Stage-three seconds", _first((rm, "train_seconds", p.retrain_metrics)), lambda v: f"{float(v):.1f} s",
        ["retrain_metrics"])
    add("Speed-up (stage one / stage three)", _first((rm, "speedup_vs_full", p.retrain_metrics)),
        lambda v: f"{float(v):.2f}×", ["retrain_metrics"])
    return rows, notes


def _paths_of(paths, keys: list[str]) -> list[str]:
    names = {"keep": paths.keep, "scores": paths.scores}
    return [names.get(k) or getattr(paths, k) for k in keys]


# ---------------------------------------------------------------------------------------------
# Numbers behind the figures
# ---------------------------------------------------------------------------------------------
def data_map_coordinates(store, *, block_mb: float = 64.0) -> tuple[np.ndarray, np.ndarray]:
    """Dataset Cartography coordinates from the store's complete epochs, read in blocks of samples.

    Returns (confidence, variability), each (N,) float64: the mean and the standard deviation
    (ddof=0) over the E complete epochs of the gold-class probability
    ``g[e, n] = softmax(Z[e, n, :])[y[n]]``, both in [0, 1] (variability at most 0.5).
    A block holds every complete epoch of ``block`` samples, (E, block, C), sized to about
    ``block_mb`` MiB and aligned to the store's chunks; only the block is ever in memory.
    A sample with a non-finite logit gets NaN.
    """
    e = store.epochs_complete
    if e < 1:
        raise ValueError(f"{store.path}: epochs_complete = 0: expected at least one complete epoch")
    array = store.logits_array()
    n, c = store.num_samples, store.num_classes
    chunk = int(array.chunks[1])
    block = max(1, int(block_mb * 2**20 // (e * c * 4)))
    if block >= chunk:
        block -= block % chunk  # whole chunks: each is read and decoded once
    labels = store.labels.astype(np.int64)
    confidence = np.empty(n, dtype=np.float64)
    variability = np.empty(n, dtype=np.float64)
    for start in range(0, n, block):
        stop = min(n, start + block)
        z = np.asarray(array[:e, start:stop], dtype=np.float32)  # (E, b, C)
        m = z.max(axis=2, keepdims=True)  # (E, b, 1)
        lse = m[..., 0] + np.log(np.exp(z - m).sum(axis=2))  # (E, b)
        gold = np.take_along_axis(z, labels[None, start:stop, None], axis=2)[..., 0]  # (E, b)
        g = np.exp(gold - lse).astype(np.float64)  # (E, b) gold-class probability
        confidence[start:stop] = g.mean(axis=0)
        variability[start:stop] = g.std(axis=0)
    return confidence, variability


def n_prune_of(prune_rate: float, num_samples: int) -> int:
    """``floor(p * N)`` exactly: how many samples a selection at ``prune_rate`` drops."""
    from .select import n_keep_of

    return num_samples - n_keep_of(prune_rate, num_samples)


def prune_threshold(values: np.ndarray, prune_rate: float) -> float | None:
    """The n_prune-th lowest value of ``values`` (N,), n_prune = floor(prune_rate * N) exactly.

    The samples at or below it are the ones a global ``top`` selection at that rate drops
    (scores are "higher = keep"). None when nothing is pruned. NaN values are ignored.
    """
    v = np.asarray(values, dtype=np.float64)
    n_prune = n_prune_of(prune_rate, v.size)
    v = np.sort(v[~np.isnan(v)])
    if n_prune < 1 or v.size == 0:
        return None
    return float(v[min(n_prune, v.size) - 1])


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------
def _new_figure(figsize: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=tuple(_whole_pixels(x) for x in figsize), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _whole_pixels(inches: float) -> float:
    """``inches`` snapped to a whole number of pixels at DPI, so that Agg (which truncates
    ``inches * dpi`` to an int) draws exactly ``round(inches * DPI)`` pixels."""
    px = round(inches * DPI)
    snapped = px / DPI
    while int(snapped * DPI) < px:  # 0.29 * 100 = 28.999...: step up to the next float
        snapped = math.nextafter(snapped, math.inf)
    return snapped


def _save(fig, folder: Path, name: str, title: str, caption: str) -> FigureInfo:
    fig.savefig(folder / name, dpi=DPI, format="png")
    size = (int(fig.bbox.width), int(fig.bbox.height))  # what Agg drew: figsize * DPI
    return FigureInfo(file=name, title=title, caption=caption, size_px=size)


def _finite_for_drawing(values: np.ndarray) -> tuple[np.ndarray, str]:
    """Values with ±inf clipped to the finite range (NaN kept), and a note saying so."""
    v = np.asarray(values, dtype=np.float64)
    finite = v[np.isfinite(v)]
    notes = []
    if finite.size == 0:
        return v, "no finite values"
    lo, hi = float(finite.min()), float(finite.max())
    pos, neg = int(np.isposinf(v).sum()), int(np.isneginf(v).sum())
    if pos:
        notes.append(f"{pos:,} +inf drawn at the max finite value {hi:.4g}")
    if neg:
        notes.append(f"{neg:,} -inf drawn at the min finite value {lo:.4g}")
    v = np.clip(v, lo, hi)
    return v, "; ".join(notes)


def figure_data_map(folder: Path, inputs: RunInputs, confidence: np.ndarray, variability: np.ndarray,
                    *, max_points: int, seed: int) -> FigureInfo:
    store = inputs.store
    n = confidence.size
    select_by = inputs.select_by
    colour = None
    colour_note = ""
    if inputs.scores and select_by in inputs.scores:
        colour, colour_note = _finite_for_drawing(inputs.scores[select_by])
    kept = inputs.kept_mask()
    ok = np.isfinite(confidence) & np.isfinite(variability)
    candidates = np.flatnonzero(ok)
    sampled = candidates.size > max_points
    if sampled:
        rng = np.random.default_rng(seed)
        shown = np.sort(rng.choice(candidates, size=max_points, replace=False))
    else:
        shown = candidates

    fig = _new_figure((8.0, 6.0))
    ax = fig.add_subplot()
    x = variability[shown]  # for the x-axis limit
    handles = []
    if kept is not None:
        pruned_shown = shown[~kept[shown]]
        kept_shown = shown[kept[shown]]
        h = ax.scatter(variability[pruned_shown], confidence[pruned_shown], s=9, marker="x",
                       c=_PRUNED_COLOR, linewidths=0.6, alpha=0.7,
                       label=f"pruned ({int((~kept).sum()):,} of {n:,})")
        handles.append(h)
    else:
        kept_shown = shown
    size = 6 if len(shown) > 5000 else 12
    if colour is not None:
        finite = colour[np.isfinite(colour)]
        vmin, vmax = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
        sc = ax.scatter(variability[kept_shown], confidence[kept_shown], s=size, c=colour[kept_shown],
                        cmap="viridis", vmin=vmin, vmax=vmax if vmax > vmin else vmin + 1e-12,
                        linewidths=0, alpha=0.8,
                        label=("kept" if kept is not None else "samples")
                        + (f" ({int(kept.sum()):,} of {n:,})" if kept is not None else ""))
        bar = fig.colorbar(sc, ax=ax, extend="both", pad=0.01)
        bar.set_label(f"{select_by} score (higher = keep; colours clipped to 1st–99th percentile)")
    else:
        sc = ax.scatter(variability[kept_shown], confidence[kept_shown], s=size, c=_KEPT_COLOR,
                        linewidths=0, alpha=0.6, label="kept" if kept is not None else "samples")
    handles.insert(0, sc)
    ax.legend(handles=handles, loc="lower right", markerscale=2, framealpha=0.9)
    ax.set_xlabel("variability: std over epochs of the gold-class probability (→ more variable)")
    ax.set_ylabel("confidence: mean gold-class probability over epochs (↑ easier)")
    ax.set_xlim(0.0, max(0.05, float(np.nanmax(x)) * 1.05) if x.size else 0.5)
    ax.set_ylim(-0.02, 1.02)
    for text, (px, py) in (("easy to learn", (0.02, 0.97)), ("hard to learn", (0.02, 0.03)),
                           ("ambiguous", (0.70, 0.55))):
        ax.text(px, py, text, transform=ax.transAxes, color="#444444", fontsize=9, style="italic",
                va="top" if py > 0.5 else "bottom", zorder=5,
                bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "alpha": 0.75, "linewidth": 0})
    title = f"Data map: {n:,} training samples, {store.epochs_complete} epochs ({store.attrs.get('view')} view)"
    if sampled:
        title += f"\nrandom sample of {max_points:,} of {candidates.size:,} points drawn (seed {seed})"
    ax.set_title(title)
    caption = ("Dataset Cartography: each point is one training sample; confidence is the mean and "
               "variability the standard deviation, over the recorded epochs, of the probability the "
               "model gave the true class. ")
    if colour is not None:
        caption += f"Kept samples are coloured by the selecting score {select_by}. "
    else:
        why = absent_note(inputs, "scores") if "scores" in inputs.absent else f"score {select_by!r} not in the scores"
        caption += f"Not coloured by a score: {why}. "
    if kept is not None:
        caption += "Pruned samples are grey crosses. "
    else:
        caption += f"Pruned samples not marked: {absent_note(inputs, 'keep')}. "
    if colour_note:
        caption += f"Colour: {colour_note}. "
    if (~ok).any():
        caption += f"{int((~ok).sum()):,} samples with non-finite logits are not drawn. "
    if sampled:
        caption += f"A seeded random sample of {max_points:,} of the {candidates.size:,} points is drawn."
    return _save(fig, folder, "data_map.png", "Data map", caption.strip())


def figure_score_histograms(folder: Path, inputs: RunInputs) -> FigureInfo:
    scores = inputs.scores
    names = list(scores)
    k = len(names)
    ncols = min(3, k)
    nrows = math.ceil(k / ncols)
    fig = _new_figure((4.2 * ncols, 3.0 * nrows + 0.5))
    select_by = inputs.select_by
    rate = inputs.prune_rate
    kept = inputs.kept_mask()
    directions = inputs.scores_attrs.get("directions") or {}
    notes = []
    for i, name in enumerate(names):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        raw = np.asarray(scores[name], dtype=np.float64)
        values, clip_note = _finite_for_drawing(raw)
        nan = np.isnan(values)
        drawn = values[~nan]
        if drawn.size == 0:
            ax.text(0.5, 0.5, "no finite values", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(name)
            continue
        lo, hi = float(drawn.min()), float(drawn.max())
        bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 41)
        if name == select_by and kept is not None:
            ax.hist([values[kept & ~nan], values[~kept & ~nan]], bins=bins, stacked=True,
                    color=[_KEPT_COLOR, _PRUNED_COLOR], label=["kept", "pruned"])
        else:
            ax.hist(drawn, bins=bins, color=_KEPT_COLOR if name == select_by else "#6a8fb3")
        cut = prune_threshold(raw, rate) if rate is not None else None
        if cut is not None:
            cut_drawn = min(max(cut, lo), hi)
            ax.axvline(cut_drawn, color=_CUT_COLOR, linestyle="--", linewidth=1.2,
                       label=f"cut at p = {rate:g}: {cut:.3g}")
        ax.legend(fontsize=7, loc="best", framealpha=0.85)
        ax.set_title(name + (" (selecting)" if name == select_by else ""),
                     fontweight="bold" if name == select_by else "normal", fontsize=10)
        ax.set_xlabel("score (higher = keep)" + ("; +inf clipped" if np.isposinf(raw).any() else ""), fontsize=8)
        ax.set_ylabel("samples", fontsize=8)
        ax.tick_params(labelsize=7)
        if clip_note:
            notes.append(f"{name}: {clip_note}")
        if nan.any():
            notes.append(f"{name}: {int(nan.sum()):,} NaN values not drawn")
    title = f"Scores of {inputs.num_samples:,} training samples"
    if rate is not None:
        title += f", cut at prune rate {rate:g}"
    fig.suptitle(title, fontsize=12)
    caption = ("One histogram per computed score (scores.zarr), higher = more worth keeping. The red "
               "dashed line is the n_prune-th lowest value at the run's prune rate: the samples at or "
               "left of it are what a global selection by that score drops.")
    if select_by and kept is not None:
        caption += (f" For the selecting score {select_by}, the bars are split into kept and pruned "
                    "samples from the keep-list (a class-balanced selection cuts per class, so the two "
                    "overlap near the line).")
    if rate is None:
        caption += " No cut drawn: the prune rate is not recorded (score summary and scores attrs absent)."
    if notes:
        caption += " " + "; ".join(notes) + "."
    for name in names:
        if name in directions:
            caption += f" {name}: {directions[name]}."
    return _save(fig, folder, "score_histograms.png", "Score histograms", caption)


def _class_names(inputs: RunInputs, classes: tuple[str, ...] | None, c: int) -> list[str]:
    if classes and len(classes) == c:
        return [str(x) for x in classes]
    return [str(i) for i in range(c)]


def figure_class_counts(folder: Path, inputs: RunInputs, class_names: list[str]) -> FigureInfo:
    labels = inputs.store.labels.astype(np.int64)
    c = inputs.store.num_classes
    full = np.bincount(labels, minlength=c)
    kept = np.bincount(labels[inputs.keep_ids], minlength=c)
    width = float(min(14.0, max(6.0, 0.45 * c + 2.0)))
    fig = _new_figure((width, 4.5))
    ax = fig.add_subplot()
    xs = np.arange(c)
    ax.bar(xs, full, width=0.8, color="#d9d9d9", edgecolor="#7f7f7f", linewidth=0.5, label="full data")
    ax.bar(xs, kept, width=0.55, color=_KEPT_COLOR, label="kept")
    if c <= 30:
        ax.set_xticks(xs, class_names, rotation=45 if max(map(len, class_names)) > 3 else 0,
                      ha="right" if max(map(len, class_names)) > 3 else "center", fontsize=8)
        for x_, k_, f_ in zip(xs, kept, full):
            if f_:
                ax.text(x_, f_, f"{100 * k_ / f_:.0f}%", ha="center", va="bottom", fontsize=7, color="#333333")
    ax.set_xlabel("class" + ("" if c <= 30 else " id"))
    ax.set_ylabel("training samples")
    ax.set_ylim(0, full.max() * 1.25 if full.max() else 1)
    ax.legend(loc="upper right", ncols=2, framealpha=0.9)
    ax.set_title(f"Kept samples per class: {int(kept.sum()):,} of {int(full.sum()):,} "
                 f"({100 * kept.sum() / max(1, full.sum()):.1f} %)")
    caption = ("Training samples per class in the full data (grey) and in the keep-list (blue)"
               + ("; the label over each bar is the kept share of that class." if c <= 30 else "."))
    return _save(fig, folder, "class_counts.png", "Kept samples per class", caption)


def _curve(history: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    pts = [(int(r["epoch"]), float(r["test_accuracy"])) for r in history
           if r.get("epoch") is not None and r.get("test_accuracy") is not None]
    if not pts:
        return np.empty(0), np.empty(0)
    e, a = zip(*pts)
    return np.asarray(e), np.asarray(a)


def figure_accuracy_curves(folder: Path, inputs: RunInputs) -> FigureInfo:
    fig = _new_figure((7.5, 4.5))
    ax = fig.add_subplot()
    drawn = []
    for history, label, colour, metrics in (
            (inputs.train_history, "full data", "#333333", inputs.train_metrics),
            (inputs.retrain_history, "pruned", _KEPT_COLOR, inputs.retrain_metrics)):
        if history is None:
            continue
        e, a = _curve(history)
        if e.size == 0:
            continue
        text = label
        if label == "pruned" and metrics and metrics.get("kept_fraction") is not None:
            text += f", {100 * float(metrics['kept_fraction']):.0f} % kept"
        text += f" (final {100 * a[-1]:.2f} %)"
        ax.plot(e + 1, 100 * a, color=colour, marker="o", markersize=3, linewidth=1.5, label=text)
        drawn.append(label)
    ax.set_xlabel("epoch (1 = after the first epoch)")
    ax.set_ylabel("test accuracy (%, higher is better)")
    ax.grid(True, alpha=0.3)
    if drawn:
        ax.legend(loc="lower right", framealpha=0.9)
    ax.set_title("Test accuracy per epoch: full-data run vs pruned run")
    caption = "Test accuracy after each epoch of stage one (full data) and stage three (kept samples)."
    for key in ("train_history", "retrain_history"):
        if key in inputs.absent:
            caption += f" Not drawn: {absent_note(inputs, key)}."
    return _save(fig, folder, "accuracy_curves.png", "Test accuracy per epoch", caption)


def figure_sweep(folder: Path, inputs: RunInputs, sweep_dir: str) -> FigureInfo:
    fig = _new_figure((7.5, 5.0))
    ax = fig.add_subplot()
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    for i, (method, d) in enumerate(inputs.sweep.items()):
        colour = cmap(i % 10)
        x, mean, std, n = d["prune_rate"], 100 * d["mean"], 100 * d["std"], d["n"]
        ns = sorted({int(v) for v in n})
        seeds = f"n={ns[0]}" if len(ns) == 1 else f"n={ns[0]}–{ns[-1]}"
        ax.plot(x, mean, marker="o", markersize=4, color=colour, label=f"{method} ({seeds})")
        band = np.nan_to_num(std, nan=0.0)
        if band.any():
            ax.fill_between(x, mean - band, mean + band, color=colour, alpha=0.18, linewidth=0)
    if inputs.sweep_full is not None:
        ax.axhline(100 * inputs.sweep_full, color="#333333", linestyle="--", linewidth=1,
                   label=f"full data ({100 * inputs.sweep_full:.2f} %)")
    ax.set_xlabel("prune rate (fraction of the training set removed →)")
    ax.set_ylabel("final test accuracy (%, mean ± std over seeds)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, framealpha=0.9)
    ax.set_title("Sweep: test accuracy against prune rate")
    caption = (f"From {sweep_dir}/table.csv: the mean final test accuracy over seeds at each prune rate, "
               "one line per method; the band is ± one standard deviation over seeds (none where n = 1).")
    if inputs.sweep_full is None:
        caption += f" No full-data line: {sweep_dir}/full.json absent."
    return _save(fig, folder, "sweep.png", "Sweep", caption)


def _pick(values: np.ndarray, ids: np.ndarray, k: int, *, highest: bool) -> np.ndarray:
    """k ids of ``ids`` with the highest (or lowest) values, NaN excluded; ties to the lower id."""
    v = values[ids]
    ok = ~np.isnan(v)
    ids, v = ids[ok], v[ok]
    order = np.lexsort((ids, -v if highest else v))
    return ids[order[:k]]


def figure_image_grid(folder: Path, inputs: RunInputs, x: np.ndarray, class_names: list[str],
                      *, highest: bool) -> FigureInfo:
    """Mosaic of GRID_PER_CLASS images per class (rows), by the selecting score, score under each."""
    select_by = inputs.select_by
    values = np.asarray(inputs.scores[select_by], dtype=np.float64)
    labels = inputs.store.labels.astype(np.int64)
    kept = inputs.kept_mask()
    c = inputs.store.num_classes
    rows = min(c, GRID_MAX_CLASSES)
    cols = GRID_PER_CLASS
    _, ch, h, w = x.shape
    cell_in = 1.0 if h >= 16 else 0.8  # inches per image column
    gap_x = max(1, w // 8)
    px_per_unit = cell_in * DPI / (w + gap_x)  # display pixels per image pixel
    gap_y = max(2, math.ceil(15 / px_per_unit))  # room for one line of 7 pt text under each image
    canvas = np.ones((rows * (h + gap_y), cols * (w + gap_x), 3), dtype=np.float32)
    grid_w_in = cols * cell_in
    grid_h_in = grid_w_in * canvas.shape[0] / canvas.shape[1]
    fig = _new_figure((grid_w_in + 1.6, grid_h_in + 0.9))  # + class labels, + title
    ax = fig.add_subplot()
    texts = []
    for r in range(rows):
        picked = _pick(values, np.flatnonzero(labels == r), cols, highest=highest)
        for j, sid in enumerate(picked):
            img = x[sid].astype(np.float32) / 255.0  # (C, H, W)
            img = np.repeat(img, 3, axis=0) if ch == 1 else img[:3]
            top, left = r * (h + gap_y), j * (w + gap_x)
            canvas[top:top + h, left:left + w] = img.transpose(1, 2, 0)
            v = values[sid]
            label = "+inf" if np.isposinf(v) else f"{v:.3g}"
            pruned = kept is not None and not kept[sid]
            texts.append((left + w / 2, top + h + 0.1, label, _CUT_COLOR if pruned else "black"))
    ax.imshow(canvas, interpolation="nearest", aspect="equal")
    for tx, ty, label, colour in texts:
        ax.text(tx, ty, label, ha="center", va="top", fontsize=7, color=colour)
    ax.set_xticks([])
    ax.set_yticks([r * (h + gap_y) + h / 2 for r in range(rows)], class_names[:rows], fontsize=8)
    ax.set_ylabel("class")
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    which = "most" if highest else "least"
    ax.set_title(f"The {cols} {which} important training images per class by {select_by}"
                 + ("\n(highest scores, kept first)" if highest else "\n(lowest scores, dropped first)"),
                 fontsize=10)
    caption = (f"Per class (rows), the {cols} training images with the "
               f"{'highest' if highest else 'lowest'} {select_by} score, "
               f"{'most important first' if highest else 'least important first'}; the score is under "
               f"each image" + (", in red for a sample the keep-list prunes." if kept is not None else "."))
    if c > rows:
        caption += f" Showing the first {rows} of {c} classes."
    name = f"images_{which}_important.png"
    return _save(fig, folder, name, f"{which.capitalize()} important images", caption)


# ---------------------------------------------------------------------------------------------
# HTML and Markdown
# ---------------------------------------------------------------------------------------------
def _context(inputs: RunInputs, config: Config) -> str:
    if inputs.store is None:
        return f"data {config.data.name}, model {config.model.name} (logit store absent)"
    s = inputs.store
    ds = s.attrs.get("dataset") or {}
    return (f"data {ds.get('name', '?')} ({s.num_samples:,} training samples, {s.num_classes} classes), "
            f"model {s.attrs.get('model', '?')}, {s.epochs_complete} recorded epochs "
            f"({s.attrs.get('view', '?')} view)")


def render_markdown(table: list[tuple[str, str, str]], notes: list[str], context: str) -> str:
    lines = ["# TD-DyUn report", "", context, "", "| Quantity | Value | From |", "|---|---|---|"]
    for q, v, src in table:
        lines.append(f"| {q} | {v} | {src.replace('|', '/')} |")
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: left; }
th { background: #f3f3f3; }
td.value { font-variant-numeric: tabular-nums; font-weight: 600; }
td.from { color: #666; font-size: 0.9em; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption, .note { color: #444; font-size: 0.92em; max-width: 900px; }
.note { background: #fff8e1; border-left: 4px solid #f0c040; padding: 0.5em 0.8em; }
"""


def render_html(report_table: list[tuple[str, str, str]], notes: list[str], sections: list[Section],
                context: str) -> str:
    e = html.escape
    parts = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>TD-DyUn report</title>", f"<style>{_CSS}</style></head><body>",
             "<h1>TD-DyUn report</h1>", f"<p>{e(context)}</p>", "<h2>Run</h2>",
             "<table><thead><tr><th>Quantity</th><th>Value</th><th>From</th></tr></thead><tbody>"]
    for q, v, src in report_table:
        parts.append(f'<tr><td>{e(q)}</td><td class="value">{e(v)}</td><td class="from">{e(src)}</td></tr>')
    parts.append("</tbody></table>")
    if notes:
        parts.append('<div class="note"><strong>Notes</strong><ul>')
        parts += [f"<li>{e(n)}</li>" for n in notes]
        parts.append("</ul></div>")
    for section in sections:
        parts.append(f"<h2>{e(section.heading)}</h2>")
        if section.figure is not None:
            f = section.figure
            w, h = f.size_px
            parts.append(f'<figure><img src="{e(f.file)}" width="{w}" height="{h}" alt="{e(f.title)}">'
                         f"<figcaption>{e(f.caption)}</figcaption></figure>")
        if section.note:
            parts.append(f'<p class="note">{e(section.note)}</p>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------
# The whole report
# ---------------------------------------------------------------------------------------------
def _load_images(config: Config, inputs: RunInputs) -> tuple[np.ndarray | None, tuple[str, ...] | None, str]:
    """(x uint8 (N, C, H, W) or None, class names, note why there are no images)."""
    from store.logits import labels_fingerprint

    from .data import load_data

    try:
        splits = load_data(config.data)
    except FileNotFoundError as exc:
        return None, None, f"image grids skipped: the training data could not be loaded ({exc})"
    train = splits.train
    if train.kind != "images":
        return None, train.classes, (f"image grids skipped: data set {config.data.name!r} holds "
                                     f"{train.kind}, not images")
    found = labels_fingerprint(train.y.numpy())
    if found != inputs.store.fingerprint:
        raise ValueError(f"{config.source}: data = {config.data.name!r}: its training labels (sha256 "
                         f"{found[:12]}…) do not match the logit store {config.paths.store} "
                         f"({inputs.store.fingerprint[:12]}…): expected the data the store was trained on")
    return train.x.numpy(), train.classes, ""


def build_report(config: Config, *, out: str | Path | None = None, seed: int = 0,
                 max_points: int = MAX_POINTS, block_mb: float | None = None) -> Report:
    """Read the run's artifacts (``config.paths``) and write the report folder, atomically.

    out: the folder (default ``config.paths.report``); it holds one PNG per figure,
    ``report.html`` (relative links to them) and ``summary.md`` (the run's table). seed: the
    data map's point sample (at most ``max_points`` points drawn). block_mb: memory of one block
    of samples when reading the store (default ``score.block_mb``).
    """
    from store.artifacts import atomic_path

    if max_points < 1:
        raise ValueError(f"max_points = {max_points}: expected an integer >= 1")
    started = time.perf_counter()
    timings: dict[str, float] = {}
    folder = Path(out if out is not None else config.paths.report)
    inputs = load_inputs(config)
    timings["read inputs"] = time.perf_counter() - started
    table, notes = run_table(inputs, config)
    notes += inputs.notes
    have_store, have_scores = inputs.store is not None, bool(inputs.scores)
    select_by = inputs.select_by

    sections: list[Section] = []
    with atomic_path(folder) as tmp:
        tmp.mkdir(parents=True)

        def step(heading: str, draw: Callable[[], FigureInfo] | None, why: str = "", key: str = "") -> None:
            t = time.perf_counter()
            if draw is None:
                sections.append(Section(heading, None, why))
                notes.append(f"{heading}: {why}")
            else:
                sections.append(Section(heading, draw()))
            timings[key or heading] = time.perf_counter() - t

        # data map
        if have_store and inputs.store.epochs_complete >= 1:
            t = time.perf_counter()
            conf, var = data_map_coordinates(inputs.store, block_mb=block_mb or config.score.block_mb)
            timings["data map: read store"] = time.perf_counter() - t
            step("Data map", lambda: figure_data_map(tmp, inputs, conf, var, max_points=max_points, seed=seed))
        else:
            step("Data map", None, absent_note(inputs, "store") if not have_store
                 else f"{config.paths.store}: no complete epoch yet")
        # score histograms
        step("Score histograms", (lambda: figure_score_histograms(tmp, inputs)) if have_scores else None,
             absent_note(inputs, "scores") if not have_scores else "")
        # class counts
        images, classes, image_note = None, None, ""
        if have_store and have_scores and select_by in inputs.scores:
            t = time.perf_counter()
            images, classes, image_note = _load_images(config, inputs)
            timings["load images"] = time.perf_counter() - t
        class_names = _class_names(inputs, classes, inputs.store.num_classes) if have_store else []
        if have_store and inputs.keep_ids is not None:
            step("Kept samples per class", lambda: figure_class_counts(tmp, inputs, class_names))
        else:
            why = "; ".join(absent_note(inputs, k) for k in ("store", "keep") if k in inputs.absent)
            step("Kept samples per class", None, why)
        # accuracy curves
        if inputs.train_history is not None or inputs.retrain_history is not None:
            step("Test accuracy per epoch", lambda: figure_accuracy_curves(tmp, inputs))
        else:
            step("Test accuracy per epoch", None,
                 "; ".join(absent_note(inputs, k) for k in ("train_history", "retrain_history")))
        # sweep
        if inputs.sweep is not None:
            step("Sweep", lambda: figure_sweep(tmp, inputs, config.paths.sweep))
        else:
            step("Sweep", None, absent_note(inputs, "sweep"))
        # image grids
        if images is not None:
            step("Most important images", lambda: figure_image_grid(tmp, inputs, images, class_names,
                                                                     highest=True))
            step("Least important images", lambda: figure_image_grid(tmp, inputs, images, class_names,
                                                                      highest=False))
        else:
            if not (have_store and have_scores):
                image_note = "image grids skipped: " + "; ".join(
                    absent_note(inputs, k) for k in ("store", "scores") if k in inputs.absent)
            elif not image_note:
                image_note = f"image grids skipped: the selecting score {select_by!r} is not in {config.paths.scores}"
            step("Most and least important images", None, image_note)

        context = _context(inputs, config)
        summary_md = render_markdown(table, notes, context)
        (tmp / "summary.md").write_text(summary_md)
        (tmp / "report.html").write_text(render_html(table, notes, sections, context))
    seconds = time.perf_counter() - started
    return Report(folder=folder, sections=sections, table=table, notes=notes, summary_md=summary_md,
                  seconds=seconds, timings=timings)
