import pickle

import numpy as np
import pytest
import torch

from healthfm.errors import DataError
from healthfm.tokens import TokenChunk, TokenStore, TokenStoreWriter, write_store
from helpers import make_chunk


def test_round_trip_all_fields(tmp_path):
    chunks = [make_chunk(10, s, values=True, times=True) for s in range(3)]
    store = write_store(tmp_path / "s", chunks, "h", fields=("values", "times"))
    assert len(store) == 30
    i = 0
    for chunk in chunks:
        for j in range(len(chunk)):
            expected = chunk.sample(j)
            got = store[i]
            np.testing.assert_array_equal(got["ids"], expected["ids"])
            np.testing.assert_array_equal(got["values"], expected["values"])
            np.testing.assert_array_equal(got["times"], expected["times"])
            assert store.keys[i] == expected["key"]
            i += 1
    assert store.meta["n_tokens"] == sum(len(c.ids) for c in chunks)
    assert store.meta["fields"] == {"ids": "int32", "values": "float32", "times": "float64"}
    assert store[-1]["ids"].dtype == np.int32


def test_hash_mismatch_is_clear(tmp_path):
    write_store(tmp_path / "s", [make_chunk(4)], "hash-a")
    with pytest.raises(DataError, match="another tokenizer"):
        TokenStore(tmp_path / "s", tokenizer_hash="hash-b")


def test_failed_write_leaves_nothing(tmp_path):
    def chunks():
        yield make_chunk(4)
        raise RuntimeError("reader failed half-way")

    with pytest.raises(RuntimeError):
        write_store(tmp_path / "s", chunks(), "h")
    assert list(tmp_path.iterdir()) == []


def test_failed_rewrite_keeps_old_store(tmp_path):
    write_store(tmp_path / "s", [make_chunk(4)], "h")
    with pytest.raises(ValueError), TokenStoreWriter(tmp_path / "s", "h", fields=("values",)) as w:
        w.write(make_chunk(4))  # no values: refused
    assert len(TokenStore(tmp_path / "s", "h")) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_truncated_store_detected(tmp_path):
    write_store(tmp_path / "s", [make_chunk(8)], "h")
    data = (tmp_path / "s" / "ids.bin").read_bytes()
    (tmp_path / "s" / "ids.bin").write_bytes(data[:-8])
    with pytest.raises(DataError, match="truncated"):
        TokenStore(tmp_path / "s")


def test_not_a_store(tmp_path):
    with pytest.raises(DataError, match=r"meta\.json"):
        TokenStore(tmp_path)


def test_pickle_does_not_copy_maps(store):
    _ = store[0]
    blob = pickle.dumps(store)
    assert len(blob) < 4000  # maps are reopened, not pickled
    again = pickle.loads(blob)
    np.testing.assert_array_equal(again[5]["ids"], store[5]["ids"])


def _ids_of(store, i):
    return store[int(i)]["ids"].sum()


def test_dataloader_workers_share_store(store):
    loader = torch.utils.data.DataLoader(
        list(range(len(store))),
        batch_size=16,
        num_workers=2,
        collate_fn=lambda idx: [store[i]["ids"].sum() for i in idx],
    )
    got = [x for batch in loader for x in batch]
    assert got == [store[i]["ids"].sum() for i in range(len(store))]


def test_chunk_validation():
    with pytest.raises(ValueError):
        TokenChunk(ids=np.zeros(3), offsets=np.array([0, 2]), keys=["a"])
    with pytest.raises(ValueError):
        TokenChunk(ids=np.zeros(3), offsets=np.array([0, 3]), keys=["a", "b"])


def test_empty_store(tmp_path):
    store = write_store(tmp_path / "s", [], "h")
    assert len(store) == 0
    assert store.lengths.tolist() == []
