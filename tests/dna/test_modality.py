"""DnaModality: registry, CLI options, reading, tokenizer fitting, encoding, defaults."""

from __future__ import annotations

import argparse
from importlib.resources import files

import numpy as np
import pytest
import torch

import healthfm.dna.modality as dna_modality
from healthfm.dna import DnaModality, KmerTokenizer
from healthfm.errors import ConfigError, DataError
from healthfm.modality import assign_splits, get_modality, modality_names, split_indices
from healthfm.tokenizer import CLS_ID, PAD_ID, Tokenizer, load_tokenizer
from healthfm.tokens import write_store

SPLICE = files("healthfm") / "data" / "dna" / "splice.tsv"


@pytest.fixture(scope="module")
def splice():
    return get_modality("dna").read(SPLICE, {})


def options(*argv: str) -> dict:
    # The flags as the CLI parses them, then typed (unset flags take the dataclass defaults).
    parser = argparse.ArgumentParser()
    modality = DnaModality()
    modality.options_class.add_arguments(parser)
    return modality.options(vars(parser.parse_args(list(argv)))).to_dict()


def test_registered():
    modality = get_modality("dna")
    assert isinstance(modality, DnaModality) and "dna" in modality_names()
    assert modality.objective == "masked" and modality.default_pooling == "mean"
    assert set(modality.baselines()) == {"kmer-counts+logreg", "one-hot+logreg"}


def test_cli_options():
    opts = options()
    assert opts["k"] == 1 and opts["stride"] == 1 and opts["ambiguity"] == "token"
    assert opts["label_column"] is None and opts["sequence_column"] == "sequence"
    assert (
        opts["reverse_complement"] is True and opts["labels"] is None and opts["key_column"] is None
    )
    opts = options("--k", "6", "--stride", "6", "--ambiguity", "n", "--no-reverse-complement")
    assert (opts["k"], opts["stride"], opts["ambiguity"], opts["reverse_complement"]) == (
        6,
        6,
        "n",
        False,
    )


def test_read_dispatch(tmp_path, splice):
    assert len(splice) == 3188 and splice.labels is not None
    fa = tmp_path / "x.fasta"
    fa.write_text(">a\nACGT\n>b\nGG\n")
    (tmp_path / "y.tsv").write_text("id\ttarget\na\t1\nb\t0\n")
    m = get_modality("dna")
    samples = m.read(fa, options("--labels", str(tmp_path / "y.tsv"), "--label-column", "target"))
    assert samples.keys.tolist() == ["a", "b"] and samples.labels.tolist() == ["1", "0"]
    assert m.read(fa, {}).labels is None
    table = tmp_path / "t.csv"
    table.write_text("name,dna\nx,ACGT\n")
    unlabelled = m.read(
        table, options("--sequence-column", "dna", "--key-column", "name", "--label-column", "none")
    )
    assert unlabelled.labels is None and unlabelled.keys.tolist() == ["x"]
    # No --label-column and no "label" column: an unlabelled (pretraining) table.
    assert m.read(table, options("--sequence-column", "dna")).labels is None
    with pytest.raises(DataError, match="no label column"):
        m.read(table, options("--sequence-column", "dna", "--label-column", "label"))
    with pytest.raises(ConfigError, match="--labels is for FASTA"):
        m.read(table, options("--labels", str(tmp_path / "y.tsv")))


def test_fit_encode_defaults(splice, tmp_path):
    m = get_modality("dna")
    splits = assign_splits(splice.groups)
    idx = split_indices(splits)
    tok = m.fit_tokenizer(splice, idx["train"], options())
    assert isinstance(tok, KmerTokenizer) and tok.k == 1 and tok.max_length == 64
    assert m.model_defaults(tok, splice, {}) == {"max_len": 64}
    chunks = list(m.encode(tok, splice, idx["test"]))
    assert len(chunks) == 1 and len(chunks[0]) == len(idx["test"])
    assert list(chunks[0].keys) == splice.keys[idx["test"]].tolist()
    assert np.all(np.diff(chunks[0].offsets) == 61) and chunks[0].ids[0] == CLS_ID
    # Identical sequences share a split.
    pairs = np.unique(np.char.add(splice.groups.astype(str), splits.astype(str)))
    assert len(pairs) == len(np.unique(splice.groups)) == 2902
    store = write_store(tmp_path / "store", m.encode(tok, splice), tok.hash)
    assert len(store) == 3188 and store.meta["max_length"] == 61
    tok.save(tmp_path / "tokenizer.json")
    assert load_tokenizer(tmp_path / "tokenizer.json").hash == tok.hash
    tok6 = m.fit_tokenizer(splice, idx["train"], options("--k", "6"))
    assert tok6.vocab_size == 4102 and m.model_defaults(tok6, splice, {}) == {"max_len": 64}


def test_encode_chunks(monkeypatch, splice):
    monkeypatch.setattr(dna_modality, "CHUNK_SIZE", 1000)
    m = get_modality("dna")
    tok = KmerTokenizer(k=3)
    chunks = list(m.encode(tok, splice))
    assert [len(c) for c in chunks] == [1000, 1000, 1000, 188]
    whole = tok.encode(splice.payload)
    assert np.array_equal(np.concatenate([c.ids for c in chunks]), whole.ids)


def test_model_defaults_cap(tmp_path):
    m = get_modality("dna")
    path = tmp_path / "long.tsv"
    path.write_text("sequence\n" + "A" * 5000 + "\nACGT\n")
    samples = m.read(path, {"label_column": None})
    tok = m.fit_tokenizer(samples, np.array([0, 1]), {})
    assert tok.max_length == 4096 and m.model_defaults(tok, samples, {}) == {"max_len": 4096}
    assert len(next(m.encode(tok, samples)).sample(0)["ids"]) == 4096


def test_augmenter(splice):
    m = get_modality("dna")
    train = np.arange(100)
    assert (
        m.pretraining.augmenter(m.fit_tokenizer(splice, train, options("--no-reverse-complement")))
        is None
    )
    tok = m.fit_tokenizer(splice, train, options())
    augment = m.pretraining.augmenter(tok)
    chunk = tok.encode(splice.payload[:4])
    ids = torch.from_numpy(chunk.ids.astype(np.int64).reshape(4, 61))
    out = augment({"ids": ids, "attention_mask": ids != PAD_ID}, torch.Generator().manual_seed(0))
    assert out["ids"].shape == ids.shape and torch.all(out["ids"][:, 0] == CLS_ID)


def test_wrong_tokenizer_type(splice):
    class Other(Tokenizer):
        type = "x.other"
        modality = "x"
        vocab_size = 1

        def config(self):
            return {}

        @classmethod
        def from_config(cls, config):
            return cls()

    with pytest.raises(ConfigError, match=r"dna\.kmer"):
        list(get_modality("dna").encode(Other(), splice))
    with pytest.raises(ConfigError):
        get_modality("dna").check_input(splice, Other())
