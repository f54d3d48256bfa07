"""The logit store: round trip, commit marker, schema errors, refusing to clobber."""
import json

import numpy as np
import pytest
import zarr

from store import schema as S
from store.logits import LogitWriter, create_logit_store, labels_fingerprint, open_logits
from store.schema import StoreError

N, C, E = 37, 5, 4


def make_store(path, *, epochs=E, labels=None, **kw):
    labels = np.arange(N) % C if labels is None else labels
    return create_logit_store(path, labels=labels, num_classes=C, epochs=epochs,
                              dataset={"name": "synthetic", "split": "train"}, model="mlp", view="train",
                              config={"k": 1}, versions={"x": "1"}, **kw)


def test_round_trip_and_commit_marker(tmp_path):
    path = make_store(tmp_path / "s.zarr", record_loss=True)
    store = open_logits(path)
    assert (store.num_samples, store.num_classes, store.epochs_planned, store.epochs_complete) == (N, C, E, 0)
    assert store.has_loss
    rng = np.random.default_rng(0)
    epochs = rng.normal(size=(E, N, C)).astype(np.float32)
    with LogitWriter(path) as writer:
        for e in range(3):
            writer.write_epoch(e, epochs[e], loss=np.full(N, e, np.float32))
    store = open_logits(path)
    assert store.epochs_complete == 3
    np.testing.assert_array_equal(store.read_epochs(), epochs[:3])
    assert np.isnan(store.logits_array()[3]).all()  # the epoch never written stays NaN
    np.testing.assert_array_equal(store.group()[S.LOSS][2], np.full(N, 2, np.float32))
    assert store.fingerprint == labels_fingerprint(np.arange(N) % C)
    lazy = store.to_dask(block=10, epochs=2)
    assert lazy.chunks[0] == (2,) and lazy.chunks[2] == (C,)
    np.testing.assert_array_equal(lazy.compute(), epochs[:2])
    with pytest.raises(StoreError, match="complete epochs"):
        store.read_epochs(0, 4)


def test_chunks_hold_whole_epochs_and_classes(tmp_path):
    arr = open_logits(make_store(tmp_path / "s.zarr")).logits_array()
    assert arr.chunks[0] == 1 and arr.chunks[2] == C
    assert S.samples_per_chunk(100, "float32", num_samples=10**7) * 100 * 4 <= S.TARGET_CHUNK_BYTES


def test_float16_opt_in(tmp_path):
    path = make_store(tmp_path / "s.zarr", logits_dtype="float16")
    with LogitWriter(path) as writer:
        writer.write_epoch(0, np.ones((N, C), np.float32))
    assert open_logits(path).logits_array().dtype == np.float16


def test_existing_store_is_refused_unless_overwrite(tmp_path):
    path = make_store(tmp_path / "s.zarr")
    with LogitWriter(path) as writer:
        writer.write_epoch(0, np.ones((N, C), np.float32))
    with pytest.raises(StoreError, match="--overwrite"):
        make_store(path)
    assert open_logits(path).epochs_complete == 1  # untouched
    make_store(path, overwrite=True)
    assert open_logits(path).epochs_complete == 0
    assert [p.name for p in tmp_path.iterdir()] == ["s.zarr"]  # no temporary left behind


def test_missing_and_malformed_stores(tmp_path):
    with pytest.raises(StoreError, match="nothing"):
        open_logits(tmp_path / "absent.zarr")
    path = make_store(tmp_path / "s.zarr")
    meta = path / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"][S.A_SCHEMA_VERSION] = 99
    meta.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="schema_version.*99"):
        open_logits(path)
    doc["attributes"][S.A_SCHEMA_VERSION] = S.SCHEMA_VERSION
    doc["attributes"][S.A_NUM_SAMPLES] = N + 1
    meta.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="logits.shape"):
        open_logits(path)
    doc["attributes"][S.A_NUM_SAMPLES] = N
    del doc["attributes"][S.A_VIEW]
    meta.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="attrs.view"):
        open_logits(path)


def test_labels_tampered_changes_fingerprint(tmp_path):
    path = make_store(tmp_path / "s.zarr")
    zarr.open_group(str(path), mode="r+")[S.LABELS][0] = 4
    with pytest.raises(StoreError, match="fingerprint"):
        open_logits(path)


def test_writer_rejects_bad_epochs(tmp_path):
    path = make_store(tmp_path / "s.zarr")
    with LogitWriter(path) as writer:
        with pytest.raises(StoreError, match=r"epoch.*\[0, 4\).*7"):
            writer.write_epoch(7, np.zeros((N, C), np.float32))
        with pytest.raises(StoreError, match="shape"):
            writer.write_epoch(0, np.zeros((N, C + 1), np.float32))


def test_labels_out_of_range(tmp_path):
    with pytest.raises(StoreError, match=r"labels.*\[0, 5\)"):
        make_store(tmp_path / "s.zarr", labels=np.full(N, 9))


def test_write_error_surfaces_and_marker_not_raised(tmp_path):
    path = make_store(tmp_path / "s.zarr")

    def boom():
        raise OSError("disk full")

    writer = LogitWriter(path)
    writer.write_epoch(0, np.zeros((N, C), np.float32), after=boom)
    with pytest.raises(OSError, match="disk full"):
        writer.close()
