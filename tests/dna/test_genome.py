"""Genomes as a pretraining corpus: readers, the genome store, windows, Markov baseline."""

from __future__ import annotations

import gzip
import re
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from healthfm.dna import DnaModality, KmerTokenizer
from healthfm.dna.genome import GenomeIndex, is_genome_input, iter_blocks, read_genome
from healthfm.dna.genome_store import (
    MIN_GAP,
    GenomeStore,
    GenomeWindows,
    write_genome_store,
)
from healthfm.dna.markov import MarkovModel, markov_baseline
from healthfm.errors import ConfigError, DataError
from healthfm.modality import get_modality

RNG = np.random.default_rng(7)


def random_bases(n: int, rng=RNG, alphabet: str = "ACGT") -> str:
    return "".join(np.array(list(alphabet))[rng.integers(0, len(alphabet), n)])


def fasta_text(records: dict[str, str], width: int = 60) -> str:
    lines = []
    for name, seq in records.items():
        lines.append(f">{name} some description")
        lines.extend(seq[i : i + width] for i in range(0, len(seq), width))
    return "\n".join(lines) + "\n"


def write_fasta(path: Path, records: dict[str, str], width: int = 60) -> Path:
    data = fasta_text(records, width).encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def write_2bit(path: Path, records: dict[str, str]) -> Path:
    """The UCSC .2bit format (version 0): header, index, then per record its size, N
    blocks, soft-mask blocks, and bases packed four to a byte (T=0 C=1 A=2 G=3, first base
    in the high bits)."""
    code = {"T": 0, "C": 1, "A": 2, "G": 3, "N": 0}
    names = list(records)
    offset = 16 + sum(1 + len(n) + 4 for n in names)
    index, body = b"", b""
    for name in names:
        seq = records[name]
        index += bytes([len(name)]) + name.encode() + struct.pack("<I", offset + len(body))
        upper = seq.upper()
        n_runs = [(m.start(), m.end() - m.start()) for m in re.finditer("N+", upper)]
        masks = [(m.start(), m.end() - m.start()) for m in re.finditer("[a-z]+", seq)]
        values = np.array([code[c] for c in upper], dtype=np.uint8)
        values = np.concatenate([values, np.zeros(-len(values) % 4, np.uint8)]).reshape(-1, 4)
        packed = (values[:, 0] << 6 | values[:, 1] << 4 | values[:, 2] << 2 | values[:, 3]).astype(
            np.uint8
        )
        rec = struct.pack("<II", len(seq), len(n_runs))
        rec += b"".join(struct.pack("<I", s) for s, _ in n_runs)
        rec += b"".join(struct.pack("<I", n) for _, n in n_runs)
        rec += struct.pack("<I", len(masks))
        rec += b"".join(struct.pack("<I", s) for s, _ in masks)
        rec += b"".join(struct.pack("<I", n) for _, n in masks)
        rec += struct.pack("<I", 0) + packed.tobytes()
        body += rec
    path.write_bytes(struct.pack("<IIII", 0x1A412743, 0, len(names), 0) + index + body)
    return path


def genome_records(rng=RNG) -> dict[str, str]:
    """Three records: soft-masked stretches, IUPAC codes, short and long N runs."""
    chrom = list(random_bases(9000, rng))
    chrom[100:400] = list("".join(chrom[100:400]).lower())  # soft-masked
    chrom[1000 : 1000 + MIN_GAP] = "N" * MIN_GAP  # a gap
    chrom[3000:3010] = "N" * 10  # a short N run: kept as bases
    chrom[5000:5003] = "RYK"
    plasmid = "N" * 120 + random_bases(5000, rng) + "N" * 70
    return {"chr1": "".join(chrom), "plasmid": plasmid, "tiny": random_bases(4200, rng)}


def expected_segments(records: dict[str, str], min_gap: int = MIN_GAP):
    """Reference: (record, start, bases) of every stretch between N runs >= min_gap."""
    out = []
    for r, seq in enumerate(records.values()):
        seq = seq.upper()
        pos = 0
        for m in re.finditer(f"N{{{min_gap},}}", seq):
            if m.start() > pos:
                out.append((r, pos, seq[pos : m.start()]))
            pos = m.end()
        if pos < len(seq):
            out.append((r, pos, seq[pos:]))
    return out


def store_segments(store: GenomeStore):
    bases = np.asarray(store.bases).tobytes().decode()
    return [(int(r), int(s), bases[o : o + n]) for r, s, o, n in store.segments.tolist()]


def read_all(index: GenomeIndex, block: int = 1 << 20) -> dict[str, str]:
    out: dict[str, list[str]] = {}
    for record, bases in iter_blocks(index, block=block):
        out.setdefault(index.names[record], []).append(bases.tobytes().decode())
    return {k: "".join(v) for k, v in out.items()}


# --------------------------------------------------------------------------- readers
def test_detection_peeks_the_first_record(tmp_path):
    m = get_modality("dna")
    short = write_fasta(tmp_path / "short.fa", {"a": "ACGT", "b": "GGCC"})
    samples = m.read(short, {})
    assert samples.payload.tolist() == ["ACGT", "GGCC"]  # one sample per record, as before
    long = tmp_path / "long.fa"
    # A first record longer than the context makes a genome; the rest is never read to
    # decide (a broken tail far past the peek does not change the decision).
    long.write_bytes(fasta_text({"chr": random_bases(5000)}).encode() + b"#" * 200_000)
    assert is_genome_input(long, None, 4096)
    assert not is_genome_input(long, "labels.tsv", 4096)
    exactly = write_fasta(tmp_path / "exact.fa", {"c": random_bases(4096)})
    assert not is_genome_input(exactly, None, 4096)
    assert is_genome_input(write_2bit(tmp_path / "g.2bit", {"c": "ACGT"}), None, 4096)


@pytest.mark.parametrize("suffix", [".fa", ".fa.gz", "faidx", "bgzf", ".2bit"])
def test_every_reader_reads_the_same_bases(tmp_path, suffix):
    records = genome_records(np.random.default_rng(1))
    expected = {k: v.upper() for k, v in records.items()}
    if suffix == ".2bit":
        # .2bit stores ACGT and N only: the IUPAC codes become N.
        records = {k: re.sub("[RYK]", "N", v) for k, v in records.items()}
        expected = {k: v.upper() for k, v in records.items()}
        path = write_2bit(tmp_path / "g.2bit", records)
        kind = "2bit"
    elif suffix == "faidx":
        path = write_fasta(tmp_path / "g.fa", records, width=70)
        pyfaidx = pytest.importorskip("pyfaidx")
        pyfaidx.Faidx(str(path)).close()  # writes g.fa.fai
        kind = "faidx"
    elif suffix == "bgzf":
        pysam = pytest.importorskip("pysam")
        plain = write_fasta(tmp_path / "plain.fa", records)
        path = tmp_path / "g.fa.gz"
        pysam.tabix_compress(str(plain), str(path))
        pysam.faidx(str(path))  # .fai and .gzi
        assert Path(f"{path}.gzi").is_file()
        kind = "bgzf"
    else:
        path = write_fasta(tmp_path / f"g{suffix}", records)
        kind = "stream"
    samples = get_modality("dna").read(path, {})
    index = samples.payload
    assert isinstance(index, GenomeIndex) and index.kind == kind
    assert samples.keys.tolist() == list(records) == samples.groups.tolist()
    assert samples.labels is None and len(samples.data_hash) == 64
    assert index.lengths.tolist() == [len(v) for v in records.values()]
    assert read_all(index, block=997) == expected
    # The store: long N runs skipped, everything else kept, whatever the reader.
    store = write_genome_store(index, tmp_path / "store", samples.data_hash, block=997)
    assert store_segments(store) == expected_segments(expected)


def test_store_segments_match_reference_whatever_the_blocks(tmp_path):
    rng = np.random.default_rng(3)
    # Many N runs of lengths around MIN_GAP, at random places, records that start and end
    # with N, a record that is all N.
    records = {}
    for r in range(4):
        pieces = []
        for _ in range(30):
            pieces.append(random_bases(int(rng.integers(1, 200)), rng, "ACGTacgtRY"))
            pieces.append("N" * int(rng.choice([1, MIN_GAP - 1, MIN_GAP, MIN_GAP + 1, 300])))
        records[f"r{r}"] = "".join(pieces if r % 2 else pieces[1:])
    records["gap"] = "N" * 500
    path = write_fasta(tmp_path / "g.fa", records)
    index = read_genome(path).payload
    for block in (7, 49, 50, 64, 1000, 1 << 20):
        store = write_genome_store(index, tmp_path / f"s{block}", "h", block=block)
        assert store_segments(store) == expected_segments(records), block
        kept = sum(len(s) for _, _, s in expected_segments(records))
        assert store.meta["n_bases"] == kept
        assert store.meta["gap_bases"] == sum(len(v) for v in records.values()) - kept
        assert store.names == list(records) and store.lengths.tolist() == [
            len(v) for v in records.values()
        ]


def test_store_of_chosen_records_and_failure_leaves_nothing(tmp_path, monkeypatch):
    records = genome_records(np.random.default_rng(2))
    path = write_fasta(tmp_path / "g.fa", records)
    index = read_genome(path).payload
    store = write_genome_store(index, tmp_path / "s", "h", records=np.array([2, 0]))
    assert store.names == ["chr1", "tiny"]
    assert {r for r, _, _ in store_segments(store)} == {0, 1}
    empty = write_genome_store(index, tmp_path / "e", "h", records=np.array([], dtype=int))
    assert len(empty) == 0 and empty.meta["n_bases"] == 0

    import healthfm.dna.genome_store as gs

    def broken(*args, **kwargs):
        yield 0, np.frombuffer(b"ACGT", np.uint8)
        raise DataError("boom", file=path)

    monkeypatch.setattr(gs, "iter_blocks", broken)
    with pytest.raises(DataError, match="boom"):
        write_genome_store(index, tmp_path / "s2", "h")
    assert not (tmp_path / "s2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".s2.")]


def test_writer_holds_no_record_in_memory(tmp_path):
    # A 20 Mb record written with 1 Mb blocks: the peak of Python/numpy allocations stays
    # a few blocks, far below the record.
    path = tmp_path / "big.fa"
    rng = np.random.default_rng(0)
    line = 80
    with open(path, "wb") as handle:
        handle.write(b">big\n")
        for _ in range(20):
            raw = np.frombuffer(b"ACGTacgtNN", np.uint8)[rng.integers(0, 10, 1_000_000)]
            text = raw.reshape(-1, line)
            handle.write(np.concatenate([text, np.full((len(text), 1), 10, np.uint8)], 1).tobytes())
    index = read_genome(path).payload
    assert index.total == 20_000_000
    tracemalloc.start()
    try:
        store = write_genome_store(index, tmp_path / "s", "h", block=1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert store.meta["n_bases"] == 20_000_000
    assert peak < 12_000_000, peak


def test_bad_fasta_names_file_record_and_position(tmp_path):
    m = get_modality("dna")
    long = random_bases(5000)
    cases = {
        "noheader.fa": ("ACGT" * 2000 + "\n", "first non-blank line must start with '>'"),
        "empty.fa": (f">a\n{long}\n>b\n>c\nACGT\n", "empty record 'b'"),
        "dup.fa": (f">a\n{long}\n>a\nACGT\n", "duplicate record id 'a'"),
        "noid.fa": (f">a\n{long}\n>  \nACGT\n", "header without an id"),
        "bad.fa": (
            f">a\n{long}\n>b x\nACGT\nAC-GT\n",
            r"invalid character '-' at position 6 .*'b'",
        ),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        samples_or_error = None
        with pytest.raises(DataError, match=message) as info:
            samples_or_error = read_genome(path)
        assert samples_or_error is None and Path(info.value.file) == path
    truncated = tmp_path / "cut.fa.gz"
    truncated.write_bytes(gzip.compress(fasta_text({"a": random_bases(100_000)}).encode())[:20_000])
    with pytest.raises(DataError, match="corrupt compressed file"):
        read_genome(truncated)
    # Record index as the row, for the invalid character.
    with pytest.raises(DataError) as info:
        m.read(tmp_path / "bad.fa", {})
    assert info.value.row == 1


# --------------------------------------------------------------------------- windows
@pytest.fixture
def genome(tmp_path):
    rng = np.random.default_rng(5)
    records = {f"c{i}": random_bases(int(n), rng) for i, n in enumerate([30_000, 5_000, 700])}
    seq = list(records["c0"])
    seq[10_000:10_200] = "N" * 200  # splits c0 into two segments
    records["c0"] = "".join(seq)
    path = write_fasta(tmp_path / "g.fa", records)
    return get_modality("dna").read(path, {"window": 256}), records


def _check_windows(source: GenomeWindows, records: dict[str, str], starts, lengths):
    segs = source.store.segments
    bases = np.asarray(source.store.bases)
    for a, n in zip(starts.tolist(), lengths.tolist(), strict=True):
        inside = (segs[:, 2] <= a) & (a + n <= segs[:, 2] + segs[:, 3])
        assert inside.sum() == 1, (a, n)  # within exactly one segment
        r, s, o, _ = segs[np.argmax(inside)]
        name = source.store.names[r]
        assert bases[a : a + n].tobytes().decode() == records[name][s + a - o : s + a - o + n]


def test_windows_never_cross_a_segment(tmp_path, genome):
    samples, records = genome
    m = DnaModality()
    tok = m.fit_tokenizer(samples, np.arange(3), {})
    assert tok.max_length == 257 and m.model_defaults(tok, samples, {}) == {"max_len": 257}
    source = m.pretraining.batch_source(
        tok, samples, np.arange(3), training=True, workdir=tmp_path / "w"
    )
    # Segments: c0 [0,10000) [10200,30000), c1, c2; windows: ceil(len/256) each.
    expected = sum(-(-n // 256) for n in (10_000, 19_800, 5_000, 700))
    assert len(source) == expected
    seen = 0
    for step in range(20):
        idx = np.random.default_rng(step).choice(len(source), 64, replace=False)
        gen = torch.Generator().manual_seed(step)
        starts, lengths = source.spans(idx, torch.Generator().manual_seed(step))
        _check_windows(source, records, starts, lengths)
        batch = source.batch(idx, gen)
        assert batch["ids"].dtype == torch.int64 and batch["attention_mask"].dtype == torch.bool
        assert batch["attention_mask"].sum(1).tolist() == source.sample_tokens(idx).tolist()
        # Tokens are the tokenizer's encoding of exactly those bases.
        bases = np.asarray(source.store.bases)
        strings = [
            bases[a : a + n].tobytes().decode() for a, n in zip(starts, lengths, strict=True)
        ]
        chunk = tok.encode(strings)
        row = batch["ids"][0, : batch["attention_mask"][0].sum()].numpy()
        assert row.tolist() == chunk.ids[: chunk.offsets[1]].tolist()
        seen += len(idx)
    assert seen == 20 * 64


def test_random_offsets_per_epoch_and_fixed_tiling_held_out(tmp_path, genome):
    samples, records = genome
    m = DnaModality()
    tok = m.fit_tokenizer(samples, np.arange(3), {})
    train = m.pretraining.batch_source(
        tok, samples, np.arange(3), training=True, workdir=tmp_path / "t"
    )
    idx = np.arange(len(train))
    a = train.spans(idx, torch.Generator().manual_seed(1))[0]
    b = train.spans(idx, torch.Generator().manual_seed(2))[0]
    again = train.spans(idx, torch.Generator().manual_seed(1))[0]
    assert np.array_equal(a, again) and not np.array_equal(a, b)
    assert (a != b).mean() > 0.9
    b1 = train.batch(idx[:8], torch.Generator().manual_seed(1))["ids"]
    assert torch.equal(b1, train.batch(idx[:8], torch.Generator().manual_seed(1))["ids"])
    held = m.pretraining.batch_source(
        tok, samples, np.arange(3), training=False, workdir=tmp_path / "v"
    )
    s1, n1 = held.spans(idx, torch.Generator().manual_seed(1))
    s2, n2 = held.spans(idx, None)
    assert np.array_equal(s1, s2) and np.array_equal(n1, n2)
    _check_windows(held, records, s1, n1)
    # The fixed tiling covers every stored base exactly once.
    assert n1.sum() == held.store.meta["n_bases"]
    tiles = held.describe(idx)
    assert len(set(tiles)) == len(idx) and {"c0:0-256", "c0:256-512"} <= set(tiles)
    assert "c0:9984-10000" in tiles  # the segment's last, shorter tile
    assert "c0:10000-10200" not in tiles and "c0:10200-10456" in tiles  # the gap is skipped
    # The first held-out windows (what the trainer scores) are spread over the records.
    assert len({t.split(":")[0] for t in tiles[:8]}) >= 2 and tiles[1] != "c0:256-512"


def test_store_reuse_and_split_stores(tmp_path, genome):
    samples, _ = genome
    m = DnaModality()
    tok = m.fit_tokenizer(samples, np.arange(3), {})
    work = tmp_path / "train"
    first = m.pretraining.batch_source(tok, samples, np.array([0, 2]), training=True, workdir=work)
    stamp = (work / "bases.bin").stat().st_mtime_ns
    again = m.pretraining.batch_source(tok, samples, np.array([2, 0]), training=True, workdir=work)
    assert (work / "bases.bin").stat().st_mtime_ns == stamp
    assert again.store.names == first.store.names == ["c0", "c2"]
    other = m.pretraining.batch_source(tok, samples, np.array([1]), training=False, workdir=work)
    assert other.store.names == ["c1"] and len(other) == -(-5000 // 256)


def test_kmer_windows_and_context_cap(tmp_path, genome):
    samples, _ = genome
    m = DnaModality()
    tok = m.fit_tokenizer(samples, np.arange(3), {"k": 3, "stride": 3, "window": 256})
    assert tok.max_length == 1 + (256 - 3) // 3 + 1
    source = m.pretraining.batch_source(
        tok, samples, np.arange(3), training=False, workdir=tmp_path / "s"
    )
    idx = np.arange(len(source))
    batch = source.batch(idx, None)
    buf, lengths, _ = source.window_bases(idx)
    strings = np.split(buf, np.cumsum(lengths)[:-1])
    chunk = tok.encode([s.tobytes().decode() for s in strings])
    for i in (0, 5, len(idx) - 1):
        n = int(batch["attention_mask"][i].sum())
        assert (
            batch["ids"][i, :n].tolist()
            == chunk.ids[chunk.offsets[i] : chunk.offsets[i + 1]].tolist()
        )
    with pytest.raises(ConfigError, match="--window 5000 gives 5001 tokens"):
        m.fit_tokenizer(m.read(samples.source, {"window": 5000}), np.arange(3), {"window": 5000})


def test_corpus_hooks(tmp_path, genome):
    samples, _ = genome
    m = DnaModality()
    table = tmp_path / "t.tsv"
    table.write_text("sequence\n" + "\n".join(random_bases(n) for n in (100, 600)) + "\n")
    tsamples = m.read(table, {})
    tok = m.fit_corpus_tokenizer([(samples, np.arange(3)), (tsamples, np.arange(2))], {})
    assert tok.max_length == 1024  # the table's 601 tokens round up past the window's 257
    tok = m.fit_corpus_tokenizer([(samples, np.arange(3)), (tsamples, np.array([0]))], {})
    assert tok.max_length == 257
    folder = tmp_path / "genomes"
    folder.mkdir()
    for name in ("b.fa.gz", "a.fna", "c.2bit", "notes.txt"):
        (folder / name).write_bytes(b"")
    assert [p.name for p in m.pretraining.expand_input(folder)] == ["a.fna", "b.fa.gz", "c.2bit"]
    assert m.pretraining.expand_input(table) == [table]


def test_tokenize_command_writes_the_genome_store(tmp_path, genome, capsys):
    from healthfm.cli import main

    samples, records = genome
    out = tmp_path / "store"
    main(["tokenize", "dna", str(samples.source), "--out", str(out)])
    store = GenomeStore(out)
    assert store.names == list(records) and store.meta["data_hash"] == samples.data_hash
    assert store.meta["n_bases"] == sum(map(len, records.values())) - 200
    assert (out / ".healthfm.json").is_file() and "GenomeStore" in capsys.readouterr().out


# --------------------------------------------------------------------------- baseline
def test_markov_model_counts_and_scores():
    periodic = np.frombuffer(b"ACGTTGCA" * 2000, np.uint8)
    model = MarkovModel(order=3)
    model.update(periodic, np.array([len(periodic)]))
    bits, n = model.score(periodic, np.array([len(periodic)]))
    assert n == len(periodic) - 3 and bits / n < 0.01  # deterministic given 3 bases
    rng = np.random.default_rng(0)
    noise = np.frombuffer(b"ACGT", np.uint8)[rng.integers(0, 4, 200_000)]
    model = MarkovModel(order=2)
    model.update(noise[:100_000], np.array([100_000]))
    bits, n = model.score(noise[100_000:], np.array([50_000, 50_000]))
    assert n == 100_000 - 2 * 2 and 1.98 < bits / n < 2.01
    # Contexts with an ambiguity code, or crossing a window, are not counted.
    model = MarkovModel(order=2)
    model.update(np.frombuffer(b"ACNGTAC", np.uint8), np.array([4, 3]))
    assert model.counts.sum() == 1  # only "TAC"


def test_pretraining_baseline(tmp_path, genome):
    samples, _ = genome
    m = DnaModality()
    tok = m.fit_tokenizer(samples, np.arange(3), {})
    train = m.pretraining.batch_source(
        tok, samples, np.array([0]), training=True, workdir=tmp_path / "t"
    )
    val = m.pretraining.batch_source(
        tok, samples, np.array([1, 2]), training=False, workdir=tmp_path / "v"
    )
    result = m.pretraining.count_baseline(tok, train, val, len(val))
    assert result["name"] == "markov-5" and 1.9 < result["bits_per_base"] < 2.1
    assert result["nats_per_token"] == pytest.approx(result["bits_per_base"] * np.log(2))
    assert m.pretraining.count_baseline(tok, object(), val, len(val)) is None
    # The first n_val held-out windows only: what the trainer's held-out loss read.
    few = m.pretraining.count_baseline(tok, train, val, 3)
    assert few["eval_bases"] == sum(val.window_bases(np.arange(3))[1]) - 3 * 5
    assert markov_baseline(train, val, order=1)["bits_per_base"] < 2.01


# --------------------------------------------------------------------------- embedding
def _dna_model(tmp_path: Path, window: int) -> Path:
    from healthfm.model.config import ModelConfig
    from healthfm.model.heads import FoundationModel
    from healthfm.model.pretrained import save_pretrained

    tok = KmerTokenizer(max_length=window + 1)
    torch.manual_seed(0)
    config = ModelConfig(
        modality="dna", vocab_size=tok.vocab_size, d_model=16, n_layers=1, n_heads=2,
        d_ff=32, max_len=window + 1, objective="masked",
    )  # fmt: skip
    return save_pretrained(FoundationModel(config), tmp_path / "model", tokenizer=tok)


@pytest.mark.parametrize("reader", ["stream", "2bit"])
def test_embed_genome_tiling_and_regions(tmp_path, reader):
    import pyarrow.parquet as pq

    from healthfm.stages.embed import embed

    rng = np.random.default_rng(11)
    records = {"a": random_bases(4500, rng), "b": random_bases(300, rng)}
    if reader == "2bit":
        path = write_2bit(tmp_path / "g.2bit", records)
    else:
        path = write_fasta(tmp_path / "g.fa", records)
    model = _dna_model(tmp_path, 128)
    out = embed(model, path, tmp_path / "x.parquet", {"window": 128, "window_stride": 1000})
    table = pq.read_table(out)
    # a: starts 0, 1000, ..., 4000 (the last cut at 4500); b: one window of 300 -> 128.
    assert table.column("key").to_pylist() == [
        "a:0-128", "a:1000-1128", "a:2000-2128", "a:3000-3128", "a:4000-4128", "b:0-128"
    ]  # fmt: skip
    tiled = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    assert not list(tmp_path.glob("*.parts")) and not list(tmp_path.rglob(".genome-*"))
    bed = tmp_path / "r.bed"
    bed.write_text("# regions\nb\t0\t300\tplasmid_start\na\t1000\t1100\tx\n")
    out = embed(model, path, tmp_path / "r.parquet", {"window": 128, "regions": str(bed)})
    regions = pq.read_table(out)
    assert regions.column("key").to_pylist() == ["b:0-128", "a:1000-1100"]
    assert regions.column("name").to_pylist() == ["plasmid_start", "x"]
    emb = np.stack(regions.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(emb[0], tiled[5], atol=1e-5)  # the same bases, the same vector
    with pytest.raises(ConfigError, match="longer than the model's context"):
        embed(model, path, tmp_path / "y.parquet", {"window": 256})


def test_bed_errors_name_file_column_and_row(tmp_path):
    from healthfm.dna.genome_embed import read_bed

    path = write_fasta(tmp_path / "g.fa", {"chr1": random_bases(5000), "chr2": "ACGT" * 10})
    index = read_genome(path).payload
    cases = [
        ("chr1\t10\n", "end", 0, "has 2 field"),
        ("chr1\t0\t10\nchr1\tx\t10\n", "start", 1, "'x' is not a non-negative integer"),
        ("chr1\t-5\t10\n", "start", 0, "not a non-negative integer"),
        ("track name=x\nchr3\t0\t10\n", "chrom", 1, "'chr3' is not in the genome"),
        ("chr1\t10\t10\n", "end", 0, "not after start"),
        ("chr2\t0\t41\n", "end", 0, "past the end of record 'chr2' \\(40 bases\\)"),
    ]
    for text, column, row, message in cases:
        bed = tmp_path / "r.bed"
        bed.write_text(text)
        with pytest.raises(DataError, match=message) as info:
            read_bed(bed, index, 100)
        assert (Path(info.value.file), info.value.column, info.value.row) == (bed, column, row)
    bed.write_text("# nothing\n\n")
    with pytest.raises(DataError, match="no regions"):
        read_bed(bed, index, 100)
    bed.write_text("chr1 100 5000 long\nchr2\t0\t40\n")
    rows = read_bed(bed, index, 100)
    assert rows.keys(index).tolist() == ["chr1:100-200", "chr2:0-40"]


def test_pretrain_on_a_genome_and_pickled_source(tmp_path, genome):
    import pickle

    from healthfm.stages.pretrain import pretrain
    from healthfm.train.trainer import TrainConfig

    samples, _ = genome
    m = DnaModality()
    tok = m.fit_tokenizer(samples, np.arange(3), {"window": 64})
    source = m.pretraining.batch_source(
        tok, samples, np.arange(3), training=True, workdir=tmp_path / "s"
    )
    copy = pickle.loads(pickle.dumps(source))  # DataLoader workers: no memory map pickled
    idx = np.arange(0, len(source), 97)
    a = source.batch(idx, torch.Generator().manual_seed(3))
    b = copy.batch(idx, torch.Generator().manual_seed(3))
    assert torch.equal(a["ids"], b["ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])
    config = TrainConfig(steps=2, batch_size=2, warmup_steps=1, report=False)
    out = pretrain(
        "dna", samples.source, tmp_path / "model", {"window": 64}, train_config=config,
        model_overrides={"d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 32},
    )  # fmt: skip
    import json

    assert json.loads((out / "config.json").read_text())["max_len"] == 65
    assert (tmp_path / "model.run" / "stores" / "train" / "bases.bin").is_file()
