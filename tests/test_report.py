"""tddyun report: figures as PNGs of the asked size, HTML links, absent inputs, image grids, CLI."""
from __future__ import annotations

import html
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from pipeline.config import Config, DataConfig, PathsConfig, config_to_dict
from pipeline.report import (
    DASH, DPI, build_report, data_map_coordinates, n_prune_of, prune_threshold, read_sweep_table,
)
from store.artifacts import write_history_csv, write_json, write_keep_csv, write_scores
from store.logits import LogitWriter, create_logit_store, open_logits

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # matplotlib layout warnings, if any


# ---------------------------------------------------------------------------------------------
# A tiny run's artifacts, written with the project's writers
# ---------------------------------------------------------------------------------------------
def _paths(root: Path) -> PathsConfig:
    a = root / "artifacts"
    return PathsConfig(**{key: str(a / Path(value).name) for key, value in vars(PathsConfig()).items()})


def make_run(root: Path, *, n: int = 120, classes: int = 4, epochs: int = 6, data: DataConfig | None = None,
             chunk: int | None = None, scores: bool = True, keep: bool = True, metrics: bool = True,
             histories: bool = True, sweep: bool = True, full: bool = True) -> Config:
    """Store (+ scores, keep-list, metrics, histories, sweep) under ``root``; the matching Config."""
    from pipeline.data import load_train_labels

    data = data or DataConfig(name="synthetic", synthetic_samples=n, synthetic_classes=classes)
    config = Config(data=data, paths=_paths(root), source=str(root / "params.yaml"))
    p = config.paths
    labels = np.asarray(load_train_labels(data))
    n = labels.size
    rng = np.random.default_rng(0)
    if chunk is not None:
        import store.schema as S

        old, S.TARGET_CHUNK_BYTES = S.TARGET_CHUNK_BYTES, chunk * classes * 4
    try:
        create_logit_store(p.store, labels=labels, num_classes=classes, epochs=epochs,
                           dataset={"name": data.name, "split": "train"}, model="mlp", view="train",
                           config=config_to_dict(config), versions={"test": True})
    finally:
        if chunk is not None:
            S.TARGET_CHUNK_BYTES = old
    z = rng.normal(0.0, 1.0, (n, classes)).astype(np.float32)
    speed = rng.uniform(-0.5, 2.0, n).astype(np.float32)
    with LogitWriter(p.store) as writer:
        for e in range(epochs):
            z = z + rng.normal(0.0, 0.6, (n, classes)).astype(np.float32)
            z[np.arange(n), labels] += 0.5 * speed
            writer.write_epoch(e, z.copy())
    fingerprint = open_logits(p.store).fingerprint
    arrays = {
        "td_dyun": rng.random(n),
        "el2n": rng.gamma(2.0, 0.2, n).astype(np.float32),
        "forgetting": rng.integers(0, 4, n).astype(np.float32),
    }
    arrays["forgetting"][:3] = np.inf  # never learned
    n_keep = n - n_prune_of(0.5, n)
    keep_ids = np.sort(np.argsort(-arrays["td_dyun"], kind="stable")[:n_keep])
    if scores:
        write_scores(p.scores, arrays, {"select_by": "td_dyun", "prune_rate": 0.5,
                                        "directions": {"td_dyun": "higher = keep"},
                                        "store": {"fingerprint": fingerprint}})
        write_json(p.score_summary, {"n_keep": n_keep, "n_total": n, "prune_rate": 0.5,
                                     "select_by": "td_dyun", "weighting": "score"})
    if keep:
        write_keep_csv(p.keep, keep_ids, np.ones(n_keep), arrays["td_dyun"][keep_ids])
    history = [{"epoch": e, "loss": 1.0 / (e + 1), "train_accuracy": 0.5 + e / 20,
                "test_accuracy": 0.5 + e / 25, "epoch_seconds": 0.1} for e in range(epochs)]
    if metrics:
        write_json(p.train_metrics, {"final_test_accuracy": 0.9, "train_seconds": 12.0, "history": history})
        write_json(p.retrain_metrics, {
            "final_test_accuracy": 0.875, "kept_fraction": n_keep / n, "n_keep": n_keep, "n_total": n,
            "budget": "same_epochs", "train_seconds": 3.0, "speedup_vs_full": 4.0, "select_by": "td_dyun",
            "prune_rate": 0.5, "weighting": "score", "history": history})
    if histories:
        write_history_csv(p.train_history, history)
        write_history_csv(p.retrain_history, history[: epochs - 1])
    if sweep:
        folder = Path(p.sweep)
        folder.mkdir(parents=True, exist_ok=True)
        rows = ["method,prune_rate,mean,std,n"]
        for method, base in (("td_dyun", 0.9), ("random", 0.88)):
            for rate in (0.7, 0.3, 0.5):  # unsorted on purpose
                rows.append(f"{method},{rate},{base - rate / 5},{0.01 if rate != 0.7 else ''},3")
        (folder / "table.csv").write_text("\n".join(rows) + "\n")
        if full:
            write_json(folder / "full.json", {"final_test_accuracy": 0.92})
    return config


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.src: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.src.append(dict(attrs)["src"])


def img_sources(html_text: str) -> list[str]:
    parser = _Images()
    parser.feed(html_text)
    return parser.src


def table_of(report) -> dict[str, str]:
    return {q: v for q, v, _ in report.table}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    config = make_run(root)
    return config, build_report(config)


# What each figure was asked to be, in inches (figsize), for the tiny run: 3 scores, 4 classes.
EXPECTED_FIGSIZE = {
    "data_map.png": (8.0, 6.0),
    "score_histograms.png": (3 * 4.2, 3.0 + 0.5),
    "class_counts.png": (6.0, 4.5),
    "accuracy_curves.png": (7.5, 4.5),
    "sweep.png": (7.5, 5.0),
}


# ---------------------------------------------------------------------------------------------
# The full report
# ---------------------------------------------------------------------------------------------
def test_every_figure_is_a_png_of_the_asked_size(full_run):
    config, report = full_run
    folder = Path(config.paths.report)
    assert report.folder == folder
    assert sorted(f.file for f in report.figures) == sorted(EXPECTED_FIGSIZE)
    for name, (w, h) in EXPECTED_FIGSIZE.items():
        with Image.open(folder / name) as image:
            assert image.format == "PNG"
            assert image.size == (round(w * DPI), round(h * DPI)), name
            image.load()  # decodes the whole file
    assert {f.file: f.size_px for f in report.figures} == {
        k: (round(w * DPI), round(h * DPI)) for k, (w, h) in EXPECTED_FIGSIZE.items()}
    assert (folder / "summary.md").is_file() and (folder / "report.html").is_file()
    assert not list(folder.parent.glob(".report.tmp-*"))  # the temporary folder is gone


def test_html_references_only_files_that_exist(full_run):
    config, report = full_run
    folder = Path(config.paths.report)
    text = (folder / "report.html").read_text()
    sources = img_sources(text)
    assert sources, "no <img> in report.html"
    for src in sources:
        assert not src.startswith(("/", "http:", "https:", "file:")), src  # relative links only
        assert (folder / src).is_file(), src
    assert sorted(sources) == sorted(p.name for p in folder.glob("*.png"))  # and every PNG is shown
    assert "<link" not in text and "<script" not in text  # self-contained


def test_table_values_and_summary(full_run):
    config, report = full_run
    table = table_of(report)
    assert table["Full-data test accuracy (final)"] == "90.00 %"
    assert table["Pruned test accuracy (final)"] == "87.50 %"
    assert table["Kept fraction"] == "0.5000 (60 of 120)"
    assert table["Prune rate"] == "0.5"
    assert table["Select by"] == "td_dyun"
    assert table["Weighting"] == "score"
    assert table["Budget"] == "same_epochs"
    assert table["Stage-one seconds"] == "12.0 s"
    assert table["Stage-three seconds"] == "3.0 s"
    assert table["Speed-up (stage one / stage three)"] == "4.00×"
    assert DASH not in table.values()
    md = (Path(config.paths.report) / "summary.md").read_text()
    assert md == report.summary_md
    for quantity, value in table.items():
        assert f"| {quantity} | {value} |" in md


def test_no_image_data_skips_the_grids_with_a_note(full_run):
    config, report = full_run
    folder = Path(config.paths.report)
    assert not list(folder.glob("images_*.png"))
    note = "image grids skipped: data set 'synthetic' holds features, not images"
    assert any(note in n for n in report.notes)
    assert note in html.unescape((folder / "report.html").read_text())


def test_captions_say_what_was_clipped(full_run):
    _, report = full_run
    captions = {f.file: f.caption for f in report.figures}
    assert "forgetting: 3 +inf drawn at the max finite value 3" in captions["score_histograms.png"]
    assert "sample of" not in captions["data_map.png"]  # 120 points: all drawn


# ---------------------------------------------------------------------------------------------
# Absent and malformed inputs
# ---------------------------------------------------------------------------------------------
def test_missing_optional_inputs_give_dashes_not_errors(tmp_path):
    config = make_run(tmp_path, metrics=False, histories=False, sweep=False)
    report = build_report(config)
    table = table_of(report)
    for quantity in ("Full-data test accuracy (final)", "Pruned test accuracy (final)", "Budget",
                     "Stage-one seconds", "Stage-three seconds", "Speed-up (stage one / stage three)"):
        assert table[quantity] == DASH, quantity
    assert table["Kept fraction"] == "0.5000 (60 of 120)"  # from the score summary instead
    assert table["Prune rate"] == "0.5"
    notes = "\n".join(report.notes)
    assert f"{config.paths.retrain_metrics} absent (run `tddyun retrain`)" in notes
    assert f"{config.paths.sweep}/table.csv absent" in notes
    assert sorted(f.file for f in report.figures) == ["class_counts.png", "data_map.png", "score_histograms.png"]
    md = report.summary_md
    assert f"| Pruned test accuracy (final) | {DASH} |" in md
    html_text = (Path(config.paths.report) / "report.html").read_text()
    assert DASH in html_text and "tddyun retrain" in html_text
    for src in img_sources(html_text):
        assert (Path(config.paths.report) / src).is_file()


def test_no_artifacts_at_all_still_writes_a_report(tmp_path):
    config = Config(paths=_paths(tmp_path))
    report = build_report(config)
    assert report.figures == []
    assert set(table_of(report).values()) == {DASH}
    folder = Path(config.paths.report)
    assert sorted(p.name for p in folder.iterdir()) == ["report.html", "summary.md"]
    assert img_sources((folder / "report.html").read_text()) == []


def test_histories_fall_back_to_the_metrics_json(tmp_path):
    config = make_run(tmp_path, histories=False, sweep=False)
    report = build_report(config)
    assert "accuracy_curves.png" in [f.file for f in report.figures]


def test_scores_and_keep_list_absent(tmp_path):
    config = make_run(tmp_path, scores=False, keep=False, sweep=False)
    report = build_report(config)
    assert [f.file for f in report.figures] == ["data_map.png", "accuracy_curves.png"]
    caption = report.figures[0].caption
    assert f"{config.paths.scores} absent" in caption and f"{config.paths.keep} absent" in caption
    assert table_of(report)["Prune rate"] == "0.5"  # from the retrain metrics


def test_malformed_sweep_table_names_file_and_column(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("method,prune_rate,mean,n\ntd_dyun,0.5,0.9,3\n")
    with pytest.raises(ValueError, match=r"table\.csv: line 1: column 'std' missing"):
        read_sweep_table(path)
    path.write_text("method,prune_rate,mean,std,n\ntd_dyun,0.5,high,0.1,3\n")
    with pytest.raises(ValueError, match=r"table\.csv: line 2: mean = 'high': expected a number"):
        read_sweep_table(path)


def test_read_sweep_table_sorts_by_rate_and_allows_empty_std(tmp_path):
    config = make_run(tmp_path, metrics=False, histories=False, scores=False, keep=False)
    table = read_sweep_table(Path(config.paths.sweep) / "table.csv")
    assert list(table) == ["td_dyun", "random"]
    np.testing.assert_allclose(table["td_dyun"]["prune_rate"], [0.3, 0.5, 0.7])
    np.testing.assert_allclose(table["td_dyun"]["mean"], [0.9 - 0.06, 0.9 - 0.1, 0.9 - 0.14])
    assert np.isnan(table["td_dyun"]["std"][2]) and table["td_dyun"]["std"][0] == 0.01


def test_scores_of_another_store_are_an_error(tmp_path):
    config = make_run(tmp_path, sweep=False)
    write_scores(config.paths.scores, {"td_dyun": np.zeros(7)}, {"select_by": "td_dyun"})
    with pytest.raises(ValueError, match=r"scores\.zarr: td_dyun: expected shape \(120,\)"):
        build_report(config)


def test_failed_report_leaves_the_previous_one(tmp_path, monkeypatch):
    from pipeline import report as R

    config = make_run(tmp_path, metrics=False, histories=False, scores=False, keep=False)
    folder = Path(config.paths.report)
    folder.mkdir(parents=True)
    (folder / "old.txt").write_text("previous report")

    def broken(*args, **kwargs):
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(R, "figure_sweep", broken)
    with pytest.raises(RuntimeError, match="drawing failed"):
        build_report(config)
    assert sorted(p.name for p in folder.iterdir()) == ["old.txt"]
    assert not list(folder.parent.glob(".report.*"))
    monkeypatch.undo()
    build_report(config)  # a good run replaces the folder whole
    assert not (folder / "old.txt").exists() and (folder / "sweep.png").is_file()


# ---------------------------------------------------------------------------------------------
# The numbers behind the figures
# ---------------------------------------------------------------------------------------------
def _gold_probability(z: np.ndarray, labels: np.ndarray) -> np.ndarray:
    p = np.exp(z.astype(np.float64))
    p /= p.sum(axis=2, keepdims=True)
    return p[:, np.arange(labels.size), labels]  # (E, N)


@pytest.mark.parametrize("block_mb", [1e-4, 2e-3, 64.0])  # blocks < a chunk, several chunks, whole
def test_data_map_blocked_equals_whole(tmp_path, block_mb):
    config = make_run(tmp_path, n=100, epochs=5, chunk=16, scores=False, keep=False, metrics=False,
                      histories=False, sweep=False)
    store = open_logits(config.paths.store)
    z = np.asarray(store.read_epochs())
    g = _gold_probability(z, store.labels.astype(np.int64))
    confidence, variability = data_map_coordinates(store, block_mb=block_mb)
    np.testing.assert_allclose(confidence, g.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(variability, g.std(axis=0), rtol=1e-4, atol=1e-6)
    assert ((0 <= confidence) & (confidence <= 1) & (0 <= variability) & (variability <= 0.5)).all()


def test_data_map_hand_computed(tmp_path):
    """Two samples, two classes, two epochs: gold probabilities (0.5, 0.5) and (e/(1+e), 1/(1+e))."""
    path = tmp_path / "s.zarr"
    create_logit_store(path, labels=np.array([0, 1]), num_classes=2, epochs=2, dataset={"name": "t"},
                       model="m", view="train", config={}, versions={})
    with LogitWriter(path) as writer:
        writer.write_epoch(0, np.array([[0.0, 0.0], [0.0, 1.0]], dtype=np.float32))
        writer.write_epoch(1, np.array([[3.0, 3.0], [1.0, 0.0]], dtype=np.float32))
    confidence, variability = data_map_coordinates(open_logits(path))
    a = np.e / (1 + np.e)
    np.testing.assert_allclose(confidence, [0.5, 0.5], rtol=1e-6)
    np.testing.assert_allclose(variability, [0.0, (a - (1 - a)) / 2], rtol=1e-6, atol=1e-7)


def test_prune_threshold_is_the_n_prune_th_lowest():
    values = np.array([3.0, 1.0, 2.0, np.inf, 0.0])
    assert prune_threshold(values, 0.4) == 1.0  # n_prune = 2: {0, 1} are cut
    assert prune_threshold(values, 0.2) == 0.0
    assert prune_threshold(values, 0.9) == 3.0  # floor(4.5) = 4
    assert prune_threshold(values, 0.0) is None  # nothing pruned
    assert prune_threshold(np.array([np.inf, np.inf, 1.0]), 0.9) == np.inf


def test_n_prune_matches_the_selection_rule():
    from pipeline.select import n_keep_of

    for n in (1, 7, 100, 1347, 50_000):
        for rate in (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.999):
            assert n_prune_of(rate, n) == n - n_keep_of(rate, n), (n, rate)


def test_data_map_sampled_title_and_caption(tmp_path):
    config = make_run(tmp_path, scores=True, metrics=False, histories=False, sweep=False)
    report = build_report(config, max_points=50, seed=3)
    data_map = next(f for f in report.figures if f.file == "data_map.png")
    assert "seeded random sample of 50 of the 120 points" in data_map.caption


# ---------------------------------------------------------------------------------------------
# Image grids on image data (the digits, bundled with scikit-learn: no download)
# ---------------------------------------------------------------------------------------------
def test_image_grids_on_image_data(tmp_path):
    config = make_run(tmp_path, data=DataConfig(name="digits"), classes=10, epochs=3, metrics=False,
                      histories=False, sweep=False)
    report = build_report(config)
    folder = Path(config.paths.report)
    files = {f.file: f for f in report.figures}
    for name in ("images_most_important.png", "images_least_important.png"):
        assert name in files
        with Image.open(folder / name) as image:
            assert image.size == files[name].size_px
        assert name in img_sources((folder / "report.html").read_text())
    w, h = files["images_most_important.png"].size_px
    assert w == round((8 * 0.8 + 1.6) * DPI)  # 8 per class, 8x8 images at 0.8 in each
    assert not any("image grids skipped" in n for n in report.notes)


def test_image_data_of_another_data_set_is_an_error(tmp_path):
    config = make_run(tmp_path, data=DataConfig(name="digits"), classes=10, epochs=2, metrics=False,
                      histories=False, sweep=False)
    other = config.replace(data=DataConfig(name="digits", seed=1))  # another train/test split
    with pytest.raises(ValueError, match="do not match the logit store"):
        build_report(other)


def test_image_grid_rgb_and_many_classes(tmp_path):
    """3-channel images (as CIFAR) and more classes than the grid shows (rows capped, caption says so)."""
    from pipeline import report as R

    config = make_run(tmp_path, n=250, classes=25, epochs=3, metrics=False, histories=False, sweep=False)
    inputs = R.load_inputs(config)
    x = np.random.default_rng(0).integers(0, 256, (250, 3, 32, 32), dtype=np.uint8)
    names = [f"class {c}" for c in range(25)]
    info = R.figure_image_grid(tmp_path, inputs, x, names, highest=False)
    with Image.open(tmp_path / info.file) as image:
        assert image.size == info.size_px
        assert info.size_px[1] > info.size_px[0]  # 20 rows of 8
    assert f"Showing the first {R.GRID_MAX_CLASSES} of 25 classes" in info.caption


def test_pick_orders_by_score_then_id():
    from pipeline.report import _pick

    values = np.array([0.5, np.nan, 0.1, 0.5, 0.9, 0.1])
    ids = np.arange(6)
    assert _pick(values, ids, 3, highest=True).tolist() == [4, 0, 3]
    assert _pick(values, ids, 3, highest=False).tolist() == [2, 5, 0]
    assert _pick(values, ids, 10, highest=False).tolist() == [2, 5, 0, 3, 4]  # NaN never shown


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------
def _params_file(config: Config, root: Path) -> Path:
    raw = config_to_dict(config)
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump({"data": raw["data"], "paths": raw["paths"]}))
    return params


def test_cli_report(tmp_path):
    from stages.cli import main

    config = make_run(tmp_path, metrics=False, histories=False)
    params = _params_file(config, tmp_path)
    result = CliRunner().invoke(main, ["report", "--params", str(params)])
    assert result.exit_code == 0, result.output
    assert "| Quantity | Value | From |" in result.output
    assert f"| Pruned test accuracy (final) | {DASH} |" in result.output
    assert "report: 4 figures" in result.output
    folder = Path(config.paths.report)
    assert (folder / "summary.md").read_text() in result.output
    assert sorted(p.name for p in folder.glob("*.png")) == [
        "class_counts.png", "data_map.png", "score_histograms.png", "sweep.png"]
    quiet = CliRunner().invoke(main, ["report", "--params", str(params), "--quiet"])
    assert quiet.exit_code == 0, quiet.output
    assert "| Quantity |" not in quiet.output and quiet.output.startswith("report: 4 figures")


def test_cli_set_override_and_clean_errors(tmp_path):
    from stages.report import report

    config = make_run(tmp_path, scores=False, keep=False, metrics=False, histories=False, sweep=False)
    params = _params_file(config, tmp_path)
    other = tmp_path / "elsewhere"
    result = CliRunner().invoke(report, ["--params", str(params), "--set", f"paths.report={other}"])
    assert result.exit_code == 0, result.output
    assert (other / "report.html").is_file() and not Path(config.paths.report).exists()
    bad = tmp_path / "artifacts" / "sweep" / "table.csv"
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_text("method,mean\n")
    result = CliRunner().invoke(report, ["--params", str(params)])
    assert result.exit_code == 1
    assert "column 'prune_rate' missing" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(report, ["--params", str(params), "--set", "paths.nope=1"])
    assert result.exit_code == 2 and "unknown key paths.nope" in result.output
