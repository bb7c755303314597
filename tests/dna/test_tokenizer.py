"""KmerTokenizer: vocabulary, vectorized encoding against a pure-Python reference, RC."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from healthfm.dna import tokenizer as tokmod
from healthfm.dna.tokenizer import (
    AMBIGUOUS_KMER_TOKEN,
    COMPLEMENT,
    IUPAC_AMBIGUITY,
    KmerTokenizer,
    make_rc_augmenter,
    reverse_complement_batch,
)
from healthfm.errors import ConfigError
from healthfm.tokenizer import CLS_ID, PAD_ID, UNK_ID, load_tokenizer, tokenizer_from_dict

ALPHABET = "ACGTacgtuU" + IUPAC_AMBIGUITY + IUPAC_AMBIGUITY.lower()
VALID = set("ACGT" + IUPAC_AMBIGUITY)


@functools.cache
def token_index(k: int, ambiguity: str) -> dict[str, int]:
    return {s: i for i, s in enumerate(KmerTokenizer(k=k, ambiguity=ambiguity).token_strings())}


def reference_encode(tok: KmerTokenizer, seq: str) -> list[int]:
    """Straightforward per-window tokenizer the vectorized one must match."""
    index = token_index(tok.k, tok.ambiguity)
    seq = seq.upper().replace("U", "T")
    out = [CLS_ID] if tok.add_cls else []
    for p in range(0, len(seq) - tok.k + 1, tok.stride):
        window = seq[p : p + tok.k]
        if any(c not in VALID for c in window):
            out.append(UNK_ID)
        elif tok.k == 1 and window not in "ACGT":
            out.append(index[window] if tok.ambiguity == "token" else index["N"])
        elif any(c not in "ACGT" for c in window):
            out.append(index[AMBIGUOUS_KMER_TOKEN])
        else:
            out.append(index[window])
    return out if tok.max_length is None else out[: tok.max_length]


def revcomp(seq: str) -> str:
    return "".join(COMPLEMENT[c] for c in reversed(seq))


def pad(chunk) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.diff(chunk.offsets)
    width = max(int(lengths.max()), 1)
    ids = np.full((len(lengths), width), PAD_ID, dtype=np.int64)
    for i in range(len(lengths)):
        ids[i, : lengths[i]] = chunk.sample(i)["ids"]
    return ids, lengths


sequences = st.lists(st.text(alphabet=ALPHABET + "x-", max_size=30), max_size=8)


@settings(max_examples=60, deadline=None)
@given(
    seqs=sequences,
    k=st.integers(1, 6),
    overlapping=st.booleans(),
    ambiguity=st.sampled_from(["token", "n"]),
    add_cls=st.booleans(),
    max_length=st.one_of(st.none(), st.integers(2, 12)),
)
def test_encode_matches_reference(seqs, k, overlapping, ambiguity, add_cls, max_length):
    tok = KmerTokenizer(
        k=k,
        stride=1 if overlapping else k,
        ambiguity=ambiguity,
        add_cls=add_cls,
        max_length=max_length,
    )
    chunk = tok.encode(seqs, keys=[f"s{i}" for i in range(len(seqs))])
    assert chunk.ids.dtype == np.int32
    assert list(chunk.keys) == [f"s{i}" for i in range(len(seqs))]
    got = [chunk.sample(i)["ids"].tolist() for i in range(len(seqs))]
    assert got == [reference_encode(tok, s) for s in seqs]
    assert np.array_equal(np.diff(chunk.offsets), tok.tokenized_lengths([len(s) for s in seqs]))
    assert chunk.ids.max(initial=0) < tok.vocab_size


def test_encode_across_blocks(monkeypatch):
    # Tiny blocks force many block boundaries; results must not change.
    rng = np.random.default_rng(0)
    seqs = ["".join(rng.choice(list("ACGTN"), size=rng.integers(0, 40))) for _ in range(200)]
    tok = KmerTokenizer(k=3)
    whole = tok.encode(seqs)
    monkeypatch.setattr(tokmod, "_BLOCK_BASES", 17)
    blocked = tok.encode(seqs)
    assert np.array_equal(whole.ids, blocked.ids)
    assert np.array_equal(whole.offsets, blocked.offsets)
    assert [blocked.sample(i)["ids"].tolist() for i in range(200)] == [
        reference_encode(tok, s) for s in seqs
    ]


def test_encode_inputs_and_edge_cases():
    tok = KmerTokenizer(k=1)
    assert len(tok.encode([])) == 0
    arr = tok.encode(np.array(["ACGT", "GG"], dtype=object))
    assert arr.offsets.tolist() == [0, 5, 8]
    assert tok.encode(np.array(["ACGT", "GG"])).ids.tolist() == arr.ids.tolist()
    assert arr.keys.tolist() == [0, 1]
    # A sequence shorter than k encodes to [CLS] alone.
    assert KmerTokenizer(k=4).encode(["ACG"]).ids.tolist() == [CLS_ID]
    # Non-ASCII characters are [UNK], one per character.
    assert tok.encode(["AéC"]).ids.tolist() == [CLS_ID, 5, UNK_ID, 6]


@pytest.mark.parametrize(
    ("kwargs", "size"),
    [({"k": 1}, 20), ({"k": 1, "ambiguity": "n"}, 10), ({"k": 3}, 5 + 64 + 1), ({"k": 6}, 4102)],
)
def test_vocab(kwargs, size):
    tok = KmerTokenizer(**kwargs)
    strings = tok.token_strings()
    assert tok.vocab_size == size == len(strings)
    assert strings[:5] == ["[PAD]", "[MASK]", "[CLS]", "[UNK]", "[SEP]"]
    kmers = strings[5 : 5 + 4**tok.k]
    assert kmers == sorted(kmers) and all(set(s) <= set("ACGT") for s in kmers)
    assert len(set(strings)) == len(strings)


def test_vocab_ambiguity_tokens():
    assert KmerTokenizer(k=1).token_strings()[9:] == list(IUPAC_AMBIGUITY)
    assert KmerTokenizer(k=1, ambiguity="n").token_strings()[9:] == ["N"]
    assert KmerTokenizer(k=2).token_strings()[-1] == AMBIGUOUS_KMER_TOKEN
    tok = KmerTokenizer(k=1, ambiguity="n")
    assert len(set(tok.encode(["NRYSWKMBDHV"]).ids[1:].tolist())) == 1


@pytest.mark.parametrize(("k", "ambiguity"), [(1, "token"), (1, "n"), (2, "token"), (5, "n")])
def test_reverse_complement_map(k, ambiguity):
    tok = KmerTokenizer(k=k, ambiguity=ambiguity)
    rc = tok.reverse_complement_map()
    strings = tok.token_strings()
    assert np.array_equal(rc[rc], np.arange(tok.vocab_size))  # an involution
    assert rc[:5].tolist() == list(range(5))
    for i, s in enumerate(strings):
        if i >= 5 and not s.startswith("["):
            assert strings[rc[i]] == revcomp(s)
    if k > 1 or ambiguity == "n":
        assert rc[-1] == tok.vocab_size - 1  # [AMB] / N is its own reverse complement


def test_reverse_complement_iupac_pairs():
    tok = KmerTokenizer(k=1)
    strings = tok.token_strings()
    rc = tok.reverse_complement_map()
    pairs = {strings[i]: strings[rc[i]] for i in range(5, tok.vocab_size)}
    assert pairs["R"] == "Y" and pairs["K"] == "M" and pairs["B"] == "V" and pairs["D"] == "H"
    assert pairs["S"] == "S" and pairs["W"] == "W" and pairs["N"] == "N" and pairs["A"] == "T"


rc_sequences = st.lists(
    st.text(alphabet="ACGT" + IUPAC_AMBIGUITY, min_size=6, max_size=30), min_size=1, max_size=6
)


@settings(max_examples=40, deadline=None)
@given(seqs=rc_sequences, k=st.integers(1, 6), ambiguity=st.sampled_from(["token", "n"]))
def test_rc_batch_equals_encoding_of_revcomp(seqs, k, ambiguity):
    tok = KmerTokenizer(k=k, stride=1, ambiguity=ambiguity)
    ids, lengths = pad(tok.encode(seqs))
    expected, _ = pad(tok.encode([revcomp(s) for s in seqs]))
    rc = tok.reverse_complement_map()
    assert np.array_equal(reverse_complement_batch(ids, lengths, rc), expected)
    mask = ids != PAD_ID
    got = reverse_complement_batch(
        torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(rc)
    )
    assert torch.equal(got, torch.from_numpy(expected))
    # Twice is the identity.
    assert np.array_equal(reverse_complement_batch(expected, lengths, rc), ids)


def test_rc_batch_without_cls_and_non_overlapping():
    tok = KmerTokenizer(k=3, stride=3, add_cls=False)
    seqs = ["ACGTTTGCA", "AAACCC"]  # lengths divisible by k
    ids, lengths = pad(tok.encode(seqs))
    expected, _ = pad(tok.encode([revcomp(s) for s in seqs]))
    assert np.array_equal(
        reverse_complement_batch(ids, lengths, tok.reverse_complement_map()), expected
    )


def test_rc_augmenter():
    tok = KmerTokenizer(k=1)
    seqs = ["ACGTTG", "GGA", "RNACT"]
    ids, _lengths = pad(tok.encode(seqs))
    expected, _ = pad(tok.encode([revcomp(s) for s in seqs]))
    batch = {
        "ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy(ids != PAD_ID),
        "values": torch.arange(ids.size, dtype=torch.float32).reshape(ids.shape),
    }
    always = make_rc_augmenter(tok, p=1.0)(batch, torch.Generator().manual_seed(0))
    assert torch.equal(always["ids"], torch.from_numpy(expected))
    assert torch.equal(always["attention_mask"], batch["attention_mask"])
    assert always["values"][0, 1].item() == batch["values"][0, 6].item()  # reordered alike
    assert always["values"][0, 0].item() == batch["values"][0, 0].item()  # [CLS] stays
    never = make_rc_augmenter(tok, p=0.0)(batch, torch.Generator().manual_seed(0))
    assert torch.equal(never["ids"], batch["ids"])
    assert torch.equal(never["values"], batch["values"])
    # p=0.5: deterministic for a seed, each row either unchanged or flipped.
    big = {k: v.repeat(20, 1) for k, v in batch.items()}
    aug = make_rc_augmenter(tok, p=0.5)
    a = aug(big, torch.Generator().manual_seed(1))["ids"]
    b = aug(big, torch.Generator().manual_seed(1))["ids"]
    assert torch.equal(a, b)
    flipped = (a != big["ids"]).any(1)
    assert 0 < int(flipped.sum()) < 60
    assert torch.equal(a[flipped], torch.from_numpy(expected).repeat(20, 1)[flipped])
    with pytest.raises(ConfigError):
        make_rc_augmenter(tok, p=1.5)


def test_decode_round_trip():
    seq = "ACGTACGGTTCA"
    for k, stride in [(1, 1), (3, 1), (3, 3), (4, 2), (6, 1)]:
        tok = KmerTokenizer(k=k, stride=stride)
        assert tok.decode(tok.encode([seq]).ids) == seq
    assert (
        KmerTokenizer(k=2, stride=2).decode(KmerTokenizer(k=2, stride=2).encode(["ANGT"]).ids)
        == "NNGT"
    )
    assert KmerTokenizer(k=1).decode([CLS_ID, UNK_ID, 5]) == "?A"
    assert KmerTokenizer(k=1).decode([]) == ""


def test_config_round_trip_and_hash(tmp_path):
    tok = KmerTokenizer(
        k=4, stride=2, ambiguity="n", add_cls=False, max_length=100, reverse_complement=False
    )
    tok.save(tmp_path / "tokenizer.json")
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert isinstance(loaded, KmerTokenizer)
    assert loaded.config() == tok.config() and loaded.hash == tok.hash
    assert tokenizer_from_dict(tok.to_dict()).config() == tok.config()
    assert loaded.type == "dna.kmer" and loaded.modality == "dna"
    # The augmentation flag does not change the encoding, so not the hash either.
    assert (
        KmerTokenizer(k=1, reverse_complement=True).hash
        == KmerTokenizer(k=1, reverse_complement=False).hash
    )
    assert KmerTokenizer(k=1).hash != KmerTokenizer(k=2).hash
    assert KmerTokenizer(k=1).hash != KmerTokenizer(k=1, max_length=64).hash
    with pytest.raises(ConfigError, match="unknown"):
        KmerTokenizer.from_config({"k": 2, "colour": "red"})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"k": 0},
        {"k": 9},
        {"k": 3, "stride": 4},
        {"k": 3, "stride": 0},
        {"ambiguity": "x"},
        {"max_length": 1},
    ],
)
def test_bad_config(kwargs):
    with pytest.raises(ConfigError):
        KmerTokenizer(**kwargs)


@pytest.mark.parametrize(("k", "stride"), [(7, 1), (7, 3), (8, 1), (8, 8)])
def test_encode_long_kmers(k, stride):
    rng = np.random.default_rng(k)
    seqs = [
        "".join(rng.choice(list("ACGTACGTACGTNRx"), size=rng.integers(0, 40))) for _ in range(30)
    ]
    tok = KmerTokenizer(k=k, stride=stride)
    chunk = tok.encode(seqs)
    assert [chunk.sample(i)["ids"].tolist() for i in range(30)] == [
        reference_encode(tok, s) for s in seqs
    ]


def packed(chunks_per_row: list[list[np.ndarray]], width: int):
    """Pack token arrays into rows: ids, segment ids (1.., 0 at pads), positions."""
    ids = np.zeros((len(chunks_per_row), width), dtype=np.int64)
    seg = np.zeros_like(ids)
    pos = np.zeros_like(ids)
    for r, parts in enumerate(chunks_per_row):
        c = 0
        for s, part in enumerate(parts, start=1):
            ids[r, c : c + len(part)] = part
            seg[r, c : c + len(part)] = s
            pos[r, c : c + len(part)] = np.arange(len(part))
            c += len(part)
    return ids, seg, pos


@pytest.mark.parametrize("add_cls", [True, False])
def test_rc_packed_segments(add_cls):
    tok = KmerTokenizer(k=2, add_cls=add_cls)
    seqs = ["ACGTTGCA", "GGAN", "TTACG", "CCCA", "AG"]
    fwd = tok.encode(seqs)
    rev = tok.encode([revcomp(s) for s in seqs])
    rows = [[0, 1, 2], [3], [4, 0]]
    ids, seg, pos = packed([[fwd.sample(i)["ids"] for i in row] for row in rows], 20)
    expected, _, _ = packed([[rev.sample(i)["ids"] for i in row] for row in rows], 20)
    rc = tok.reverse_complement_map()
    assert np.array_equal(reverse_complement_batch(ids, seg != 0, rc, segment_ids=seg), expected)
    got = reverse_complement_batch(
        torch.from_numpy(ids), None, torch.from_numpy(rc), segment_ids=torch.from_numpy(seg)
    )
    assert torch.equal(got, torch.from_numpy(expected))
    batch = {
        "ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy(seg != 0),
        "segment_ids": torch.from_numpy(seg),
        "positions": torch.from_numpy(pos),
    }
    out = make_rc_augmenter(tok, p=1.0)(batch, torch.Generator().manual_seed(0))
    assert torch.equal(out["ids"], torch.from_numpy(expected))
    assert torch.equal(out["positions"], batch["positions"])
    assert torch.equal(out["segment_ids"], batch["segment_ids"])
    # p=0.5: every segment is either untouched or fully reverse-complemented.
    out = make_rc_augmenter(tok, p=0.5)(batch, torch.Generator().manual_seed(3))["ids"].numpy()
    for r in range(len(rows)):
        for s in range(1, len(rows[r]) + 1):
            m = seg[r] == s
            assert np.array_equal(out[r, m], ids[r, m]) or np.array_equal(out[r, m], expected[r, m])


def test_rc_batch_mask_input_numpy():
    tok = KmerTokenizer(k=1)
    ids, lengths = pad(tok.encode(["ACGR", "T"]))
    expected, _ = pad(tok.encode(["YCGT", "A"]))
    rc = tok.reverse_complement_map()
    assert np.array_equal(reverse_complement_batch(ids, ids != PAD_ID, rc), expected)
    assert reverse_complement_batch(ids[:, :0], lengths * 0, rc).shape == (2, 0)
