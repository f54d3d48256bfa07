"""Logit capture overhead: the same model, data and epochs with capture on and off, alternating.

    .venv/bin/python bench/capture_overhead.py --params configs/cifar10-cpu.yaml --epochs 3 --repeats 3

Each trial trains a fresh model (same seed) for --epochs epochs with no test pass; "on" records
the training forward pass's logits into a real Zarr store (background write), "off" records
nothing. Prints per-trial seconds per epoch, the medians and their ratio on/off (goal <= 1.03).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import config_to_dict, load_config  # noqa: E402
from pipeline.data import load_data  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.record import StoreSink  # noqa: E402
from pipeline.train import fit, seed_everything  # noqa: E402
from store.logits import LogitWriter, create_logit_store  # noqa: E402


def trial(cfg, data, *, capture: bool, epochs: int, workdir: Path) -> float:
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model, input_shape=data.train.input_shape, num_classes=data.num_classes)
    writer = sink = None
    if capture:
        path = create_logit_store(workdir / "logits.zarr", labels=data.train.y.numpy(), num_classes=data.num_classes,
                                  epochs=epochs, dataset=data.info, model=cfg.model.name, view="train",
                                  config=config_to_dict(cfg), versions={}, overwrite=True)
        writer = LogitWriter(path)
        sink = StoreSink(writer, "train", record_loss=False)
    start = time.perf_counter()
    fit(model, data.train, None, cfg.train, augment=cfg.data.augment, epochs=epochs, sink=sink,
        progress=False, log=lambda _: None)
    if writer is not None:
        writer.close()  # the last epoch's write counts too
    return (time.perf_counter() - start) / epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="configs/cifar10-cpu.yaml")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per trial")
    parser.add_argument("--repeats", type=int, default=3, help="trials per setting (alternating)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    cfg = load_config(args.params, args.overrides)
    data = load_data(cfg.data)
    print(f"data {cfg.data.name} N={len(data.train)} model {cfg.model.name} width {cfg.model.width} "
          f"batch {cfg.train.batch_size}, {args.epochs} epochs a trial, {args.repeats} trials a setting")
    times = {"off": [], "on": []}
    with tempfile.TemporaryDirectory() as tmp:
        trial(cfg, data, capture=True, epochs=1, workdir=Path(tmp))  # warm-up: first-call costs, discarded
        for r in range(args.repeats):
            for setting in ("off", "on") if r % 2 == 0 else ("on", "off"):
                seconds = trial(cfg, data, capture=setting == "on", epochs=args.epochs, workdir=Path(tmp))
                times[setting].append(seconds)
                print(f"trial {r} capture {setting:>3}: {seconds:.3f} s/epoch", flush=True)
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    print()
    print("| capture | median s/epoch | images/s |")
    print("|---|---|---|")
    for name, value in (("off", off), ("on (record: train)", on)):
        print(f"| {name} | {value:.3f} | {len(data.train) / value:.0f} |")
    print(f"\nratio on/off (median): {on / off:.3f}  (goal <= 1.03)")


if __name__ == "__main__":
    main()
