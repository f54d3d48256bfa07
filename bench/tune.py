"""Choose TD-DyUn's defaults on a validation split: one variant of its parameters at a time.

    .venv/bin/python bench/tune.py                          # every variant (about an hour on 2 cores)
    .venv/bin/python bench/tune.py --variants default,trajectory_all --rates 0.7 --seeds 1

configs/cifar10-cpu-tune.yaml is the quality benchmark's setting with 2,000 of the 10,000 training
images held out (`data.validation`): stage one trains on the other 8,000 and records their logits,
and every accuracy here is measured on the 2,000 held out, never on the test set. Each variant
changes one thing of the current defaults (`default`) and is a rescore of that one store plus
retrains at each rate and seed; `default` also runs random, dyun and tdds as references. Finished
cells are reused (tddyun sweep's resumable cells, one folder per variant). Prints the table and
writes it to docs/benchmarks.md between the BEGIN/END tuning markers.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, for its sibling quality.py

from pipeline.config import load_config  # noqa: E402
from pipeline.sweep import run_sweep  # noqa: E402
from quality import ensure_stage_one, write_section  # noqa: E402

REFERENCES = ["random", "dyun", "tdds"]
TD = "score.methods.td_dyun"
# name -> (what it changes, --set overrides on top of the params file)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "default": ("the defaults: α 0.5, trajectory auto, windows 10, λ 1, η 1, weights `score`, "
                "class-balanced selection", []),
    "trajectory_all": ("trajectory all (T = E at every rate)", [f"{TD}.trajectory=all"]),
    "trajectory_5": ("trajectory 5 at every rate (auto: 9, 6, 3 at p = 0.3, 0.7, 0.9)",
                     [f"{TD}.trajectory=5"]),
    "weights_none": ("no importance weights", ["score.weighting=none"]),
    "alpha_0.25": ("α 0.25 (more tsdd)", [f"{TD}.alpha=0.25"]),
    "alpha_0.75": ("α 0.75 (more wdu)", [f"{TD}.alpha=0.75"]),
    "alpha_1": ("α 1 (wdu alone)", [f"{TD}.alpha=1.0"]),
    "difficulty_0": ("η 0 (uncertainty alone)", [f"{TD}.wdu.difficulty=0.0"]),
    "difficulty_2": ("η 2", [f"{TD}.wdu.difficulty=2.0"]),
    "window_5": ("windows 5 (wdu J and tsdd K)", [f"{TD}.wdu.window=5", f"{TD}.tsdd.window=5"]),
    "recency_0.9": ("λ 0.9 (recent windows weigh more)", [f"{TD}.wdu.recency=0.9"]),
    "unbalanced": ("selection not class-balanced", ["score.class_balanced=false"]),
    "unbalanced_reweighted": ("selection not class-balanced, class_balance weights",
                              ["score.class_balanced=false", "score.class_balance=true"]),
}
BEGIN, END = "<!-- BEGIN tuning -->", "<!-- END tuning -->"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(ROOT / "configs" / "cifar10-cpu-tune.yaml"))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rates", default="0.3,0.7,0.9")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = parser.parse_args()
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    rates = [float(r) for r in args.rates.split(",")]

    t0 = time.perf_counter()
    cfg = load_config(args.params)
    if cfg.data.validation is None:
        parser.error(f"--params {args.params}: data.validation is null; tuning must not evaluate on the test set")
    stage_one = ensure_stage_one(cfg)

    results: dict[str, list[dict]] = {}  # row label -> sweep rows
    for name in names:
        overrides = VARIANTS[name][1] + ["train.test_every=0", f"paths.sweep={Path(cfg.paths.sweep) / name}"]
        methods = (REFERENCES if name == "default" else []) + ["td_dyun"]
        rows = run_sweep(load_config(args.params, overrides), methods=methods, rates=rates, seeds=args.seeds)
        for row in rows:
            label = f"td_dyun: {name}" if row["method"] == "td_dyun" else row["method"]
            results.setdefault(label, []).append(row)
    text = "\n".join([BEGIN, _table(results, names, rates, args, cfg, stage_one, time.perf_counter() - t0), END])
    print(text)
    out = write_section(Path(args.out), text, BEGIN, END, heading="Choosing TD-DyUn's defaults on a validation split")
    print(f"\nwritten to {out}")


def _table(results, names, rates, args, cfg, stage_one, seconds) -> str:
    by = {(label, r["prune_rate"]): r for label, rows in results.items() for r in rows}
    base = {r: by.get(("td_dyun: default", r)) for r in rates}
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} with `python bench/tune.py --variants {','.join(names)} "
        f"--rates {args.rates} --seeds {args.seeds}` (params `{Path(args.params).name}`: "
        f"{cfg.data.subset - cfg.data.validation} training images, {cfg.data.validation} held out for validation, "
        f"{cfg.model.name} width {cfg.model.width}, {cfg.train.epochs} epochs, budget {cfg.retrain.budget}).",
        "",
        f"Full data (stage one, 8,000 images): {100 * stage_one['final_test_accuracy']:.2f}% validation accuracy",
        "",
        "| run | what it changes | " + " | ".join(f"p = {r:g}" for r in rates) + " | mean Δ vs default |",
        "|---|---|" + "---|" * (len(rates) + 1),
    ]
    for label in results:
        what = VARIANTS[label.split(": ", 1)[1]][0] if label.startswith("td_dyun: ") else "reference"
        cells, deltas = [], []
        for r in rates:
            row = by.get((label, r))
            cells.append(f"{100 * row['mean']:.2f} ± {100 * row['std']:.2f}" if row else "—")
            if row and base[r]:
                deltas.append(100 * (row["mean"] - base[r]["mean"]))
        delta = f"{statistics.fmean(deltas):+.2f}" if deltas else "—"
        lines.append(f"| {label} | {what} | " + " | ".join(cells) + f" | {delta} |")
    lines += ["", f"Validation accuracy (%) after retraining on the kept samples, mean ± std over {args.seeds} "
              f"seeds; this run took {seconds:.0f} s (finished cells reused)."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
