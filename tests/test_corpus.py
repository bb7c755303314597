"""The corpus spec: inputs, globs, manifests, held-out sources, sampling probabilities."""

from __future__ import annotations

import json

import numpy as np
import pytest

from healthfm.corpus import (
    CorpusSpec,
    corpus_from_inputs,
    read_manifest,
    sampling_probabilities,
    source_name,
)
from healthfm.errors import ConfigError


def _files(tmp_path, *names):
    for name in names:
        (tmp_path / name).write_text(">r\nACGT\n")
    return [tmp_path / n for n in names]


def test_one_input_is_single_and_several_are_named_apart(tmp_path):
    a, b = _files(tmp_path, "g.fa.gz", "g.fna")
    assert corpus_from_inputs(a).single
    corpus = corpus_from_inputs([a, b])
    assert not corpus.single
    assert [s.name for s in corpus.sources] == ["g", "g-2"]
    assert source_name("x/Klebs_HS11286.fna.gz") == "Klebs_HS11286"


def test_globs_expand_sorted_and_a_pattern_matching_nothing_is_refused(tmp_path):
    _files(tmp_path, "b.fa", "a.fa", "c.txt")
    corpus = corpus_from_inputs([str(tmp_path / "*.fa")])
    assert [s.path.name for s in corpus.sources] == ["a.fa", "b.fa"]
    with pytest.raises(ConfigError, match="no file matches"):
        corpus_from_inputs([str(tmp_path / "*.fq")])


def test_a_missing_input_among_several_is_named(tmp_path):
    (a,) = _files(tmp_path, "a.fa")
    with pytest.raises(ConfigError, match="does not exist") as err:
        corpus_from_inputs([a, tmp_path / "nope.fa"])
    assert err.value.row == 1


def test_toml_manifest_with_weights_options_splits_and_temperature(tmp_path):
    _files(tmp_path, "a.fa", "b.fa", "c.fa")
    manifest = tmp_path / "corpus.toml"
    manifest.write_text(
        'temperature = 0.5\n[[source]]\npath = "*.fa"\nweight = 2\n'
        "[source.options]\nwindow = 512\n"
        '[[source]]\npath = "a.fa"\nname = "held"\nsplit = "val"\n'
    )
    corpus = corpus_from_inputs([manifest])
    assert corpus.temperature == 0.5 and corpus.manifest == manifest
    assert [s.name for s in corpus.sources] == ["a", "b", "c", "held"]
    assert [s.weight for s in corpus.sources] == [2.0, 2.0, 2.0, 1.0]
    assert corpus.sources[0].options == {"window": 512}
    assert corpus.sources[-1].split == "val"


def test_json_manifest_and_holdout_by_name(tmp_path):
    _files(tmp_path, "a.fa", "b.fa")
    manifest = tmp_path / "c.json"
    manifest.write_text(json.dumps({"source": [{"path": "a.fa"}, {"path": "b.fa"}]}))
    corpus = corpus_from_inputs([manifest], held_out=["b"])
    assert [s.split for s in corpus.sources] == ["auto", "val"]
    with pytest.raises(ConfigError, match="names no source"):
        corpus_from_inputs([manifest], held_out=["zzz"])


@pytest.mark.parametrize(
    ("text", "column"),
    [
        ('[[source]]\npath = "a.fa"\nweight = -1\n', "weight"),
        ('[[source]]\npath = "a.fa"\nsplit = "test"\n', "split"),
        ('[[source]]\npath = "a.fa"\nextra = 1\n', "extra"),
        ('[[source]]\nname = "x"\n', "path"),
        ('[[source]]\npath = "missing.fa"\n', "path"),
        ('temperature = 0\n[[source]]\npath = "a.fa"\n', "temperature"),
        ("colour = 1\n", "colour"),
    ],
)
def test_bad_manifests_name_the_field(tmp_path, text, column):
    _files(tmp_path, "a.fa")
    manifest = tmp_path / "corpus.toml"
    manifest.write_text(text)
    with pytest.raises(ConfigError) as err:
        read_manifest(manifest)
    assert err.value.column == column
    assert str(manifest) in str(err.value)


def test_unparsable_manifest(tmp_path):
    manifest = tmp_path / "corpus.toml"
    manifest.write_text("[[source]\npath=")
    with pytest.raises(ConfigError, match="cannot be parsed"):
        read_manifest(manifest)


def test_sampling_probabilities_by_size_temperature_and_weight():
    sizes = [900, 100, 0]
    assert np.allclose(sampling_probabilities(sizes, [1, 1, 1]), [0.9, 0.1, 0.0])
    flat = sampling_probabilities(sizes, [1, 1, 1], temperature=1e6)
    assert np.allclose(flat[:2], [0.5, 0.5], atol=1e-4) and flat[2] == 0
    assert np.allclose(sampling_probabilities(sizes, [1, 9, 1]), [0.5, 0.5, 0.0])
    with pytest.raises(ConfigError):
        sampling_probabilities([0, 0], [1, 1])


def test_corpus_spec_passes_through():
    corpus = CorpusSpec(())
    assert corpus_from_inputs(corpus) is corpus
