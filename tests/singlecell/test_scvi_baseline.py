"""The optional scVI latent-space baseline (the ``scvi`` extra)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from healthfm.errors import ConfigError
from healthfm.modality import get_modality
from healthfm.singlecell.baselines import scvi_available, scvi_latent


def _counts(n: int = 120, genes: int = 40, seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    return sp.csr_matrix(rng.poisson(rng.gamma(1.0, 1.0, size=(n, genes))).astype(np.float32))


def test_listed_only_when_installed():
    names = get_modality("singlecell").baselines()
    assert {"hvg-pca+logreg", "lognorm+logreg"} <= set(names)
    assert ("scvi+logreg" in names) == scvi_available()


@pytest.mark.skipif(scvi_available(), reason="scvi-tools is installed")
def test_missing_extra_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match=r"pip install 'healthfm\[scvi\]'"):
        scvi_latent(_counts(), np.arange(80))


def test_trained_on_the_training_cells_only():
    pytest.importorskip("scvi")
    counts = _counts()
    train = np.arange(80)
    z = scvi_latent(counts, train, max_epochs=3)
    assert z.shape == (120, 10) and np.isfinite(z).all()
    # Other counts in the held-out cells leave the training cells' latent as it was.
    other = counts.tolil()
    other[80:] = _counts(seed=5)[80:]
    z2 = scvi_latent(other.tocsr(), train, max_epochs=3)
    np.testing.assert_allclose(z[:80], z2[:80], atol=1e-5)
