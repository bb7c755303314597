"""The one list of modalities (a leaf: it imports nothing).

:mod:`healthfm.modality` imports these packages to register them, and the import contracts
in ``pyproject.toml`` (checked by ``tests/test_layers.py`` against this list) keep them
independent of each other and below the stages. A fifth modality is one name here, its
package ``healthfm/<name>/`` (the class in ``<name>/modality.py``), and the contracts'
module lists.
"""

from __future__ import annotations

#: Package names under ``healthfm`` that define a modality, sorted.
MODALITIES: tuple[str, ...] = ("dna", "ehr", "pathology", "singlecell")
