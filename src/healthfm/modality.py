"""What a modality supplies, and the registry the shared pipeline looks modalities up in.

Shared code (CLI, pipeline, trainer, evaluation) never branches on a modality's name: it
asks the registered :class:`Modality` for a reader, a tokenizer, model defaults, an
objective, an augmentation and baseline featurizers.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from healthfm.errors import ConfigError, DataError
from healthfm.tokenizer import Tokenizer
from healthfm.tokens import TokenChunk

#: Modules that define modalities; importing one registers it.
MODALITY_MODULES = ("healthfm.dna", "healthfm.ehr", "healthfm.pathology", "healthfm.singlecell")
_MODALITIES: dict[str, Modality] = {}

SPLIT_NAMES = ("train", "val", "test")


@dataclass
class Samples:
    """Labelled (or unlabelled) samples read from one input, before tokenization.

    Attributes
    ----------
    source
        The file or folder they were read from.
    keys
        One identifier per sample (sequence id, barcode, tile path).
    groups
        Split unit of each sample: samples sharing a group always land in the same split
        (identical sequences, one donor's cells, one slide's tiles).
    labels
        Label of each sample as strings, or ``None`` when the input has no label column.
    payload
        The modality's own records (sequences, a count matrix, image paths).
    data_hash
        SHA-256 of the input, for provenance.
    label_column
        Name of the label column, for messages.
    """

    source: Path
    keys: np.ndarray
    groups: np.ndarray
    labels: np.ndarray | None
    payload: Any
    data_hash: str
    label_column: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class TaskInput:
    """The rows a task head is trained and scored on (see :meth:`Modality.task_input`).

    Attributes
    ----------
    samples
        One entry per row: ``keys``, ``groups`` (split and bootstrap unit, e.g. the
        subject), ``labels`` (numpy array), ``source`` / ``label_column`` for messages.
    split_names
        "train" / "val" / "test" per row.
    source
        A :class:`healthfm.train.data.BatchSource` whose ``batch(indices)`` collates rows.
    info
        Anything the modality wants recorded (e.g. the label file).
    """

    samples: Samples
    split_names: np.ndarray
    source: Any
    info: dict[str, Any] = field(default_factory=dict)


#: A baseline featurizer: given all samples and the indices of the training split, return
#: a feature matrix for every sample (fitted on the training rows only).
BaselineFn = Callable[[Samples, np.ndarray], np.ndarray]


class Modality(ABC):
    """A data modality: reader, tokenizer, objective, model defaults and baselines."""

    name: ClassVar[str]
    #: Pretraining objective: "masked" (bidirectional) or "causal" (next token).
    objective: ClassVar[str] = "masked"
    #: Default pooling of token states into one vector per sample.
    default_pooling: ClassVar[str] = "mean"
    #: Which end of a sample longer than the context pretraining keeps: "head" (the start)
    #: or "tail" (the most recent tokens, for causal models of timelines).
    truncate: ClassVar[str] = "head"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:  # noqa: B027
        """Add reader and tokenizer options to a CLI sub-command."""

    @abstractmethod
    def read(self, path: str | Path, options: dict[str, Any]) -> Samples:
        """Read an input file into :class:`Samples`, validating it."""

    @abstractmethod
    def fit_tokenizer(self, samples: Samples, train_idx: np.ndarray, options: dict) -> Tokenizer:
        """Fit a tokenizer on the training samples only."""

    @abstractmethod
    def encode(
        self, tokenizer: Tokenizer, samples: Samples, indices: np.ndarray | None = None
    ) -> Iterator[TokenChunk]:
        """Tokenize the chosen samples (all by default) in chunks, in the given order."""

    def check_input(self, samples: Samples, tokenizer: Tokenizer) -> None:  # noqa: B027
        """Validate samples against a fitted tokenizer (e.g. vocabulary coverage)."""

    def augmenter(self, tokenizer: Tokenizer) -> Callable | None:
        """Return a batch augmentation ``f(batch, generator) -> batch``, or ``None``."""
        return None

    def model_defaults(self, tokenizer: Tokenizer, samples: Samples) -> dict[str, Any]:
        """Model-config fields this modality fixes (context length, value input...)."""
        return {}

    def baselines(self) -> dict[str, BaselineFn]:
        """Baseline featurizers by method name."""
        return {}

    def split(
        self, samples: Samples, salt: str, fractions: tuple[float, float, float]
    ) -> np.ndarray:
        """Split name ("train" / "val" / "test") of every sample.

        Default: :func:`assign_splits` on the sample groups. A modality whose data carry
        their own splits (MEDS ``subject_splits.parquet``) returns those instead.
        """
        return assign_splits(samples.groups, fractions, salt)

    def pretrain_command(
        self, input_path: Path, out: Path, options: dict, **kwargs: Any
    ) -> Path | None:
        """Modality-specific ``healthfm pretrain`` (data that is not a token store, e.g.
        image tiles); None means "use the shared one". ``kwargs`` are those of
        :func:`healthfm.pipeline.pretrain`."""
        return None

    def embed_command(
        self, model: Any, input_path: Path, out: Path, options: dict, **kwargs: Any
    ) -> Path | None:
        """Modality-specific ``healthfm embed``; None means "use the shared one"."""
        return None

    def evaluate_command(
        self, model_dir: Path | None, input_path: Path, out_dir: Path, options: dict, **kwargs: Any
    ) -> list | None:
        """Modality-specific ``healthfm evaluate``; None means "use the shared one"."""
        return None

    def task_input(
        self,
        samples: Samples,
        options: dict,
        model: Any,
        salt: str,
        fractions: tuple[float, float, float],
    ) -> TaskInput | None:
        """Labelled rows, their splits and a batch source, for fine-tuning and its scoring.

        None (the default) means "one row per sample": the shared code splits with
        :meth:`split`, takes ``samples.labels`` and tokenizes the samples into a token
        store. A modality whose rows are not its samples (EHR label rows at prediction
        times) or whose data are not token sequences (image tiles) returns its own.
        """
        return None

    def extra_evaluations(self, context: dict[str, Any]) -> list:
        """Extra result rows computed by the shared ``evaluate`` (kNN, clustering ...).

        ``context`` holds ``features`` ({method: (X, is_baseline, extra)}), ``y`` (class
        index per sample), ``classes``, ``splits`` ({name: indices}), ``seeds``, ``n_boot``,
        ``task``, ``samples``, ``model_hash``.
        """
        return []

    def demo_spec(self, quick: bool) -> dict[str, Any] | None:
        """What ``healthfm demo`` runs for this modality through the shared pipeline.

        Keys: ``input`` (bundled path), ``options``, ``preset``, ``steps``, ``batch_size``,
        ``lr``, ``seeds``. Modalities whose demo is not the generic
        pretrain → probe path override :meth:`run_demo` instead.
        """
        return None

    def run_demo(self, out: Path, quick: bool) -> Any:
        """Run this modality's demo; the default uses :meth:`demo_spec`."""
        from healthfm.demo import generic_demo

        spec = self.demo_spec(quick)
        if spec is None:
            raise ConfigError(f"modality {self.name!r} has no demo")
        return generic_demo(self, spec, out)

    def add_commands(self, subparsers: Any) -> None:  # noqa: B027
        """Add this modality's own ``healthfm`` sub-commands (``tile`` ...) to the CLI's
        ``subparsers`` (the object ``ArgumentParser.add_subparsers`` returns)."""

    def run_command(self, args: argparse.Namespace) -> bool:
        """Run ``args.command`` if it is one of :meth:`add_commands`'s; True when handled."""
        return False


def register_modality(modality: Modality) -> Modality:
    """Register a modality instance under its name."""
    _MODALITIES[modality.name] = modality
    return modality


def load_all() -> None:
    """Import every modality module so that all are registered."""
    for module in MODALITY_MODULES:
        importlib.import_module(module)


def get_modality(name: str) -> Modality:
    """Return the registered modality ``name``."""
    load_all()
    if name not in _MODALITIES:
        raise ConfigError(f"unknown modality {name!r}; known: {', '.join(sorted(_MODALITIES))}")
    return _MODALITIES[name]


def modality_names() -> list[str]:
    """Names of all registered modalities."""
    load_all()
    return sorted(_MODALITIES)


def _unit_interval(text: str, salt: str) -> float:
    digest = hashlib.blake2b(f"{salt}\x00{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def assign_splits(
    groups: np.ndarray,
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
    salt: str = "healthfm",
) -> np.ndarray:
    """Assign each sample to "train", "val" or "test" by a hash of its group.

    The assignment depends only on the group's value and the salt, never on row order or
    on the other rows, so ``pretrain`` and ``evaluate`` run on the same file (or on a
    file with rows added) agree on which samples are held out, and samples of one group
    (duplicate sequences, one donor) never straddle two splits.

    Parameters
    ----------
    groups
        Group value of each sample (converted to ``str``).
    fractions
        Expected train / val / test fractions.
    salt
        Changes the assignment; keep it fixed between pretraining and evaluation.

    Returns
    -------
    numpy.ndarray
        Array of split names, one per sample.
    """
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise ConfigError(
            f"split fractions must be three non-negative numbers summing to 1: {fractions}"
        )
    uniq, inverse = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    # One hash per distinct group (not per sample); only splitting uses it.
    u = np.fromiter((_unit_interval(g, salt) for g in uniq), dtype=np.float64, count=len(uniq))
    cut1, cut2 = fractions[0], fractions[0] + fractions[1]
    split_of_group = np.where(u < cut1, "train", np.where(u < cut2, "val", "test"))
    return split_of_group[inverse]


def split_indices(splits: np.ndarray) -> dict[str, np.ndarray]:
    """Indices of each split name."""
    return {name: np.flatnonzero(splits == name) for name in SPLIT_NAMES}


def labels_as_targets(samples: Samples, labels: np.ndarray) -> np.ndarray:
    """The labels as float64 regression targets; a missing, non-numeric or infinite one is
    a ``DataError`` naming its row."""
    values = np.empty(len(labels), dtype=np.float64)
    try:
        values[:] = labels
    except (TypeError, ValueError):
        values = np.array([_as_number(v) for v in labels.tolist()], dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise DataError(
            f"regression target {str(labels[bad[0]])!r} of sample {str(samples.keys[bad[0]])!r} is not a "
            f"finite number ({bad.size} such sample(s))",
            file=samples.source,
            column=samples.label_column,
            row=int(bad[0]),
        )
    return values


def _as_number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def require_labels(samples: Samples, splits: np.ndarray | None = None) -> np.ndarray:
    """Return the labels, or raise if there are none or only one class."""
    if samples.labels is None:
        raise DataError(
            "the input has no label column", file=samples.source, column=samples.label_column
        )
    classes = np.unique(samples.labels)
    if len(classes) < 2:
        raise DataError(
            f"the label column has a single class ({classes[0]!r}); a classifier needs two or more",
            file=samples.source,
            column=samples.label_column,
        )
    if splits is not None:
        for name in ("train", "test"):
            present = np.unique(samples.labels[splits == name])
            if len(present) < 2:
                raise DataError(
                    f"the {name} split holds {len(present)} class(es); it needs two or more "
                    "(too few samples, or too few groups)",
                    file=samples.source,
                    column=samples.label_column,
                )
    return samples.labels
