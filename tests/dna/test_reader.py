"""Reading tables and FASTA: normalisation, keys, groups, labels, and every bad input."""

from __future__ import annotations

import gzip
from importlib.resources import files

import numpy as np
import pytest

from healthfm.dna.reader import is_fasta, read_fasta, read_table
from healthfm.errors import DataError
from healthfm.fsutil import sha256_file

DATA = files("healthfm") / "data" / "dna"
SPLICE_SHA256 = "7dafd72ae40aac1b7334912ee40a2d871d462d6b0b4517095c15e5f2a891c0ab"


def write(path, text: str | bytes):
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


# --- the bundled real data -----------------------------------------------------------
def test_splice_reads_with_class_counts():
    samples = read_table(DATA / "splice.tsv")
    assert len(samples) == 3188
    classes, counts = np.unique(samples.labels, return_counts=True)
    assert dict(zip(classes.tolist(), counts.tolist(), strict=True)) == {
        "EI": 764,
        "IE": 769,
        "N": 1655,
    }
    assert {len(s) for s in samples.payload} == {60}
    assert samples.keys[0] == "row0" and samples.keys[-1] == "row3187"
    assert samples.data_hash == SPLICE_SHA256
    assert samples.label_column == "label"
    # Groups are the sequences: 2,902 distinct, duplicates share one group.
    assert len(np.unique(samples.groups)) == 2902
    assert np.array_equal(samples.groups, samples.payload)
    # The ambiguity codes of the README survive.
    joined = "".join(samples.payload)
    assert {c: joined.count(c) for c in "NDSR"} == {"N": 58, "D": 2, "S": 1, "R": 1}


def test_promoters_reads():
    samples = read_table(DATA / "promoters.tsv")
    assert len(samples) == 106
    assert sorted(np.unique(samples.labels, return_counts=True)[1].tolist()) == [53, 53]
    assert {len(s) for s in samples.payload} == {57}


# --- tables ----------------------------------------------------------------------------
def test_table_normalises_and_keys(tmp_path):
    path = write(tmp_path / "x.csv", "id,seq,y\na,  acgu ,p\nb,NNrY,q\n")
    samples = read_table(path, sequence_column="seq", label_column="y", key_column="id")
    assert samples.payload.tolist() == ["ACGT", "NNRY"]
    assert samples.keys.tolist() == ["a", "b"]
    assert samples.labels.tolist() == ["p", "q"]
    assert samples.data_hash == sha256_file(path)
    assert samples.source == path


def test_table_without_labels_gz_and_sep(tmp_path):
    path = tmp_path / "x.tsv.gz"
    path.write_bytes(gzip.compress(b"sequence\tother\nACGT\t1\nTTTT\t2\n"))
    samples = read_table(path, label_column=None)
    assert samples.labels is None and samples.label_column is None
    assert samples.payload.tolist() == ["ACGT", "TTTT"]
    semi = write(tmp_path / "x.txt", "sequence;label\nAC;1\n")
    assert read_table(semi, sep=";").labels.tolist() == ["1"]


def test_invalid_character_names_row_char_and_position(tmp_path):
    path = write(tmp_path / "x.tsv", "sequence\tlabel\nACGT\ta\nACGT\ta\nAC-GT\tb\nAXGT\tb\n")
    with pytest.raises(DataError) as err:
        read_table(path)
    assert err.value.row == 2 and err.value.column == "sequence"
    assert (
        "'-'" in str(err.value) and "position 2" in str(err.value) and "2 row(s)" in str(err.value)
    )
    assert str(path) in str(err.value)


def test_invalid_non_ascii_character(tmp_path):
    path = write(tmp_path / "x.tsv", "sequence\tlabel\nACGT\ta\nACéT\tb\n")
    with pytest.raises(DataError, match="'É' at position 2") as err:
        read_table(path)
    assert err.value.row == 1


def test_empty_file(tmp_path):
    with pytest.raises(DataError, match="empty file"):
        read_table(write(tmp_path / "x.tsv", ""))
    with pytest.raises(DataError, match="no data rows"):
        read_table(write(tmp_path / "y.tsv", "sequence\tlabel\n"))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_table(tmp_path / "nope.tsv")


def test_missing_sequence_column_lists_columns(tmp_path):
    path = write(tmp_path / "x.tsv", "seq\tlabel\nACGT\ta\n")
    with pytest.raises(
        DataError, match=r"no sequence column 'sequence'.*\['seq', 'label'\]"
    ) as err:
        read_table(path)
    assert err.value.column == "sequence"


def test_misnamed_label_column(tmp_path):
    path = write(tmp_path / "x.tsv", "sequence\tclass\nACGT\ta\n")
    with pytest.raises(DataError, match=r"no label column 'label'.*\['sequence', 'class'\]") as err:
        read_table(path)
    assert err.value.column == "label"


def test_missing_key_column(tmp_path):
    path = write(tmp_path / "x.tsv", "sequence\tlabel\nACGT\ta\n")
    with pytest.raises(DataError, match="no key column 'id'"):
        read_table(path, key_column="id")


def test_duplicate_and_missing_keys(tmp_path):
    path = write(tmp_path / "x.tsv", "id\tsequence\na\tAC\nb\tAC\na\tGG\n")
    with pytest.raises(DataError, match="duplicate key 'a'") as err:
        read_table(path, label_column=None, key_column="id")
    assert err.value.row == 0
    path = write(tmp_path / "y.tsv", "id\tsequence\na\tAC\n\tGG\n")
    with pytest.raises(DataError, match="missing key") as err:
        read_table(path, label_column=None, key_column="id")
    assert err.value.row == 1


def test_null_label(tmp_path):
    path = write(tmp_path / "x.tsv", "sequence\tlabel\nACGT\ta\nACGT\t\nAC\t  \n")
    with pytest.raises(DataError, match="missing label; 2 row") as err:
        read_table(path)
    assert err.value.row == 1 and err.value.column == "label"


def test_empty_sequence(tmp_path):
    path = write(tmp_path / "x.tsv", "sequence\tlabel\nACGT\ta\n\tb\n")
    with pytest.raises(DataError, match="empty sequence") as err:
        read_table(path)
    assert err.value.row == 1
    path = write(tmp_path / "y.tsv", "sequence\tlabel\nACGT\ta\n   \tb\n")
    with pytest.raises(DataError, match="empty sequence") as err:
        read_table(path)
    assert err.value.row == 1


def test_non_utf8_table(tmp_path):
    path = write(tmp_path / "x.tsv", b"sequence\tlabel\nACGT\ta\nACGT\t\xff\n")
    with pytest.raises(DataError, match=r"not UTF-8.*0xff at byte offset 27 \(line 3\)") as err:
        read_table(path)
    assert err.value.row == 1


def test_unparseable_table(tmp_path):
    path = write(tmp_path / "x.csv", 'sequence,label\n"ACGT,a\nAC,b,c,d\n')
    with pytest.raises(DataError):
        read_table(path)


# --- FASTA -----------------------------------------------------------------------------
FASTA = ">s1 first record\nacgt\nNNAC\n\n>s2\r\nGGUU\r\n>s3\nT\n"


def test_fasta_reads_ids_and_sequences(tmp_path):
    samples = read_fasta(write(tmp_path / "x.fa", FASTA))
    assert samples.keys.tolist() == ["s1", "s2", "s3"]
    assert samples.payload.tolist() == ["ACGTNNAC", "GGTT", "T"]
    assert samples.labels is None and samples.label_column is None
    assert np.array_equal(samples.groups, samples.payload)


def test_fasta_with_labels_in_any_order(tmp_path):
    fa = write(tmp_path / "x.fasta.gz", gzip.compress(FASTA.encode()))
    labels = write(tmp_path / "labels.csv", "id,label\ns3,c\ns1,a\ns2,b\n")
    samples = read_fasta(fa, labels=labels)
    assert samples.labels.tolist() == ["a", "b", "c"]
    assert samples.label_column == "label"
    other = write(tmp_path / "l.tsv", "name\ty\ns1\t1\ns2\t2\ns3\t3\n")
    assert read_fasta(fa, labels=other, label_column="y", id_column="name").labels.tolist() == [
        "1",
        "2",
        "3",
    ]


def test_fasta_unequal_counts(tmp_path):
    fa = write(tmp_path / "x.fa", FASTA)
    labels = write(tmp_path / "labels.tsv", "id\tlabel\ns1\ta\ns2\tb\n")
    with pytest.raises(DataError, match=r"has 3 records but the labels file has 2 rows.*'s3'"):
        read_fasta(fa, labels=labels)


def test_fasta_id_missing_from_labels(tmp_path):
    fa = write(tmp_path / "x.fa", FASTA)
    labels = write(tmp_path / "labels.tsv", "id\tlabel\ns1\ta\ns2\tb\nS3\tc\n")
    with pytest.raises(DataError, match=r"record 2 \(id 's3'\).*no row in the labels file") as err:
        read_fasta(fa, labels=labels)
    assert err.value.row == "s3" and err.value.column == "id"


def test_fasta_labels_file_problems(tmp_path):
    fa = write(tmp_path / "x.fa", FASTA)
    with pytest.raises(DataError, match=r"no label column 'label'.*\['id', 'class'\]"):
        read_fasta(fa, labels=write(tmp_path / "a.tsv", "id\tclass\ns1\ta\n"))
    with pytest.raises(DataError, match="no id column 'id'"):
        read_fasta(fa, labels=write(tmp_path / "b.tsv", "name\tlabel\ns1\ta\n"))
    with pytest.raises(DataError, match="missing label") as err:
        read_fasta(fa, labels=write(tmp_path / "c.tsv", "id\tlabel\ns1\ta\ns2\t\ns3\tc\n"))
    assert err.value.row == 1
    with pytest.raises(DataError, match="duplicate id 's1'"):
        read_fasta(fa, labels=write(tmp_path / "d.tsv", "id\tlabel\ns1\ta\ns1\tb\ns3\tc\n"))


def test_fasta_duplicate_ids(tmp_path):
    with pytest.raises(DataError, match="duplicate FASTA id 'a'") as err:
        read_fasta(write(tmp_path / "x.fa", ">a\nAC\n>b\nGG\n>a x\nTT\n"))
    assert err.value.row == 0


def test_fasta_empty_sequence_and_bad_char(tmp_path):
    with pytest.raises(DataError, match=r"empty sequence \(id 'b'\)") as err:
        read_fasta(write(tmp_path / "x.fa", ">a\nAC\n>b\n>c\nGG\n"))
    assert err.value.row == 1
    with pytest.raises(DataError, match=r"invalid character '\*' at position 5.*id 'c'") as err:
        read_fasta(write(tmp_path / "y.fa", ">a\nAC\n>b\nGG\n>c\nGGG\nTT*\n"))
    assert err.value.row == 2


def test_fasta_empty_and_not_fasta(tmp_path):
    with pytest.raises(DataError, match="empty file"):
        read_fasta(write(tmp_path / "x.fa", "\n\n"))
    with pytest.raises(DataError, match="first non-blank line must start with '>'"):
        read_fasta(write(tmp_path / "y.fa", "ACGT\n>a\nAC\n"))
    with pytest.raises(DataError, match="header without an id") as err:
        read_fasta(write(tmp_path / "z.fa", ">a\nAC\n> \nGG\n"))
    assert err.value.row == 1


def test_fasta_non_utf8(tmp_path):
    with pytest.raises(DataError, match=r"not UTF-8.*record 1") as err:
        read_fasta(write(tmp_path / "x.fa", b">a\nAC\n>b \xe9\nGG\n"))
    assert err.value.row == 1


def test_is_fasta():
    assert is_fasta("a.fa") and is_fasta("a.FASTA.gz") and is_fasta("dir/x.fna")
    assert not is_fasta("a.tsv") and not is_fasta("a.csv.gz") and not is_fasta("fasta")
