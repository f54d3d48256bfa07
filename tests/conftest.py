"""Shared fixtures: tiny synthetic logit stores in the project's schema."""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest


def synthetic_labels(data_config) -> np.ndarray:
    """Labels of the configured synthetic data set (via pipeline.data when it exists)."""
    try:
        data = importlib.import_module("pipeline.data")
    except ModuleNotFoundError:
        data = None
    loader = getattr(data, "load_train_labels", None)
    if loader is not None:
        return np.asarray(loader(data_config))
    n, k = data_config.synthetic_samples, data_config.synthetic_classes
    return np.random.default_rng(data_config.seed).permutation(np.arange(n) % k)


def random_walk_logits(labels: np.ndarray, *, epochs: int, num_classes: int, seed: int = 0,
                       drift: float = 0.25, noise: float = 0.6) -> np.ndarray:
    """(E, N, C) float32 logits: a random walk per sample with a per-sample drift toward its label,
    so samples differ in how fast, and how steadily, they are learned."""
    rng = np.random.default_rng(seed)
    n = labels.size
    z = np.zeros((epochs, n, num_classes), dtype=np.float32)
    current = rng.normal(0.0, 1.0, size=(n, num_classes))
    speed = rng.uniform(-0.5, 2.0, size=n) * drift
    for e in range(epochs):
        current = current + rng.normal(0.0, noise, size=(n, num_classes))
        current[np.arange(n), labels] += speed
        z[e] = current
    return z


@pytest.fixture
def make_store(tmp_path, monkeypatch) -> Callable[..., Any]:
    """Factory: a logit store under tmp_path with random-walk logits.

    make_store(n=300, classes=5, epochs=10, complete=None, chunk=32, seed=0, name="logits.zarr",
    data=None (a DataConfig; default synthetic of n samples, `classes` classes), mutate=None
    (a function (E, N, C) array -> array applied before writing)) -> (store path, logits, labels, config dict)
    """
    from pipeline.config import Config, DataConfig, config_to_dict
    from store import schema as S
    from store.logits import LogitWriter, create_logit_store

    def factory(*, n: int = 300, classes: int = 5, epochs: int = 10, complete: int | None = None,
                chunk: int = 32, seed: int = 0, name: str = "logits.zarr", data=None,
                mutate: Callable[[np.ndarray], np.ndarray] | None = None, dtype: str = "float32"):
        data = data or DataConfig(name="synthetic", synthetic_samples=n, synthetic_classes=classes)
        config = config_to_dict(Config(data=data))
        labels = synthetic_labels(data)
        assert labels.shape == (n,)
        logits = random_walk_logits(labels, epochs=epochs, num_classes=classes, seed=seed)
        if mutate is not None:
            logits = mutate(logits)
        path = Path(tmp_path) / name
        with monkeypatch.context() as m:  # small chunks, so that blocks of several sizes exist
            m.setattr(S, "TARGET_CHUNK_BYTES", chunk * classes * np.dtype(dtype).itemsize)
            create_logit_store(
                path, labels=labels, num_classes=classes, epochs=epochs,
                dataset={"name": data.name, "split": "train"}, model="mlp", view="train",
                config=config, versions={"test": True}, logits_dtype=dtype,
            )
        with LogitWriter(path) as writer:
            for e in range(epochs if complete is None else complete):
                writer.write_epoch(e, logits[e])
        return path, logits, labels, config

    return factory
