"""What a modality supplies, and the registry the shared stages look modalities up in.

The stages (:mod:`healthfm.stages`: pretrain, embed, evaluate, finetune) are shared code
that never branches on a modality's name. A modality is a set of *parts* the stages run:
a reader (→ :class:`Samples`), a split, a tokenizer or image preprocessor, a batch source
for training, the rows a task is scored on (:class:`EvaluationRows`), how those rows are
embedded by an :class:`~healthfm.encoders.Encoder`, baseline featurizers, an evaluation
protocol (data and small functions the shared evaluator runs), and a demo spec. What only
some modalities have is a capability object: :class:`Pretraining` (corpora, augmentation,
batch sources, count baselines), :class:`Embedding` (rows that are not samples, how
embeddings are written) and :class:`Commands` (sub-commands of their own).

A modality never imports the stages, the CLI or another modality; the defaults below serve
modalities whose samples are token sequences with one label each, and import nothing of
:mod:`healthfm.evaluate` (inference, :mod:`healthfm.inference`, sits below this contract).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from healthfm.errors import ConfigError, DataError
from healthfm.modalities import MODALITIES
from healthfm.options import Options
from healthfm.tokenizer import Tokenizer
from healthfm.tokens import TokenChunk, TokenStore, write_store

#: Modules that define modalities; importing one registers it.
MODALITY_MODULES = tuple(f"healthfm.{name}" for name in MODALITIES)
_MODALITIES: dict[str, Modality] = {}

SPLIT_NAMES = ("train", "val", "test")
#: The split every stage uses unless told otherwise (and the one a model folder records).
DEFAULT_SALT = "healthfm"
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)


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


@dataclass
class EvaluationRows:
    """The labelled rows a task is scored on, with their split (see
    :meth:`Modality.evaluation_rows`).

    One row per sample for most inputs; one per label row at its prediction time for EHR.

    Attributes
    ----------
    task
        Task name used in result rows.
    groups
        Split and bootstrap unit of each row (a sequence, a donor, a subject, a slide).
    y
        Class index per row (into ``classes``), the numeric target when ``regression``,
        or the follow-up time (days to the event or to censoring, float64) when
        ``survival``.
    classes
        Sorted class values (empty for a regression or a survival task).
    regression
        Whether the task is a regression (numeric target).
    split
        "train" / "val" / "test" per row.
    data_hash
        Provenance of the evaluated data.
    options
        The modality's typed options the rows were read with.
    info
        The modality's own typed record of the rows, for its own parts (EHR:
        :class:`healthfm.ehr.modality.LabelRowsInfo`, the label rows and the features of
        each vocabulary; pathology: :class:`healthfm.pathology.evaluation.TileRowsInfo`),
        None by default.
    survival
        Whether the task is time-to-event (:mod:`healthfm.evaluate.survival`): ``y`` holds
        times and ``event`` whether each row's event was observed.
    event
        Event indicator per row (bool) of a survival task, else None.
    """

    task: str
    groups: np.ndarray
    y: np.ndarray
    classes: np.ndarray
    regression: bool
    split: np.ndarray
    data_hash: str
    options: Any = None
    info: Any = None
    survival: bool = False
    event: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.y)

    def indices(self, name: str) -> np.ndarray:
        """Row positions of split ``name``."""
        return np.flatnonzero(self.split == name)


@dataclass
class Features:
    """One evaluated method's features of every row.

    Attributes
    ----------
    X
        Feature matrix (rows × features), float32.
    baseline
        Whether the method is a baseline.
    probe
        "linear" (logistic / ridge regression) or "gbm" (gradient-boosted trees).
    extra
        Fields added to the method's result rows.
    seconds
        Time spent computing the features (added to the rows' wall time).
    """

    X: np.ndarray
    baseline: bool
    probe: str = "linear"
    extra: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class DemoSpec:
    """What ``healthfm demo`` runs for a modality: pretrain, then evaluate, then any extra
    steps of its own (the shared runner in :mod:`healthfm.demo` executes it).

    Attributes
    ----------
    pretrain_input
        The bundled pretraining input: a path, a list of paths (a corpus, see
        :mod:`healthfm.corpus`), or a function ``f(out) -> path(s)`` that writes it.
    pretrain_held_out
        Corpus sources held out whole from pretraining (their held-out loss).
    task_pretrain
        ``(input, options, train)`` of a second model pretrained on the task's own train
        split only (the same preset), evaluated beside the corpus model: what pretraining
        on a corpus bought over pretraining on the task table. None: no second model.
    transfer
        More evaluations of the model(s), one step each: ``(input, options, sub-folder,
        seeds)`` (seeds None: the spec's) — a task none of the models was pretrained on
        (DNA: promoters), or another task of the same data (EHR: a time-to-event task next
        to the binary one).
    evaluate_input
        The bundled labelled input.
    train
        :class:`~healthfm.train.trainer.TrainConfig` fields (``warmup_steps`` defaults to a
        tenth of ``steps``, ``seed`` to 0).
    pretrain_options, evaluate_options
        Reader options of the two inputs.
    preset
        Backbone size.
    seeds, n_boot, batch_size
        Evaluation seeds, bootstrap resamples and inference batch size.
    evaluate_dir
        Sub-folder of the output for the evaluation ("" = the output folder itself).
    after
        Extra steps ``f(out, model_dir, say) -> result rows`` (``say(i, text)`` prints step
        ``i``; pathology: slide embedding and
        MIL), or None.
    description
        One line per step, printed as the demo runs.
    minutes
        The demo's measured wall time on an idle 2-core machine (the plan's ETA), or None.
    """

    pretrain_input: Any
    evaluate_input: Any
    train: dict[str, Any]
    pretrain_held_out: tuple[str, ...] = ()
    task_pretrain: tuple[Any, dict[str, Any], dict[str, Any]] | None = None
    transfer: tuple[tuple[Any, dict[str, Any], str, tuple[int, ...] | None], ...] = ()
    pretrain_options: dict[str, Any] = field(default_factory=dict)
    evaluate_options: dict[str, Any] = field(default_factory=dict)
    preset: str = "tiny"
    seeds: tuple[int, ...] | None = None
    n_boot: int = 1000
    batch_size: int = 128
    evaluate_dir: str = ""
    embed: tuple[tuple[Any, dict[str, Any], str], ...] = ()
    after: Callable[[Path, Path], list] | None = None
    description: tuple[str, ...] = ()
    minutes: float | None = None


@dataclass
class EmbeddingInput:
    """One output of ``healthfm embed``: what is read, where its embeddings go.

    Attributes
    ----------
    name
        Stable identifier of the input in a run's plan and manifest (its path).
    target
        The output file (parquet, ``.npy``, ``.h5ad``, a slide's ``.h5``).
    open
        Reads the input into :class:`Samples` (a slide: tiles it first).
    whole
        Embedded as one part, opened only by the process that embeds it (a slide); else
        every process opens it (a backed read) and its rows are cut into parts.
    """

    name: str
    target: Path
    open: Callable[[], Samples]
    whole: bool = False


#: A baseline featurizer: given all samples and the indices of the training split, return
#: a feature matrix for every sample (fitted on the training rows only).
BaselineFn = Callable[[Samples, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class TaskRule:
    """How ``evaluate`` tells a regression from a classification (see
    :meth:`Modality.evaluation_rows`).

    The stage builds it (:func:`healthfm.stages.evaluate.task_rule`): the rule reads the
    fine-tuned model folders, which is evaluation code the contract does not import.

    Attributes
    ----------
    regression
        ``regression(labels, categorical) -> bool``: whether these (non-test) labels are
        scored as a regression: the fine-tuned models' task when any are scored, else the
        labels' own (``categorical``: declared categorical, never a regression).
    finetuned
        Whether fine-tuned models are scored (their task then wins over ``--task-type``).
    """

    regression: Callable[[np.ndarray, bool], bool]
    finetuned: bool = False


class Pretraining:
    """How a modality is pretrained, past its tokenizer: the defaults serve token sequences.

    A modality whose pretraining differs (genome windows for DNA, image tiles cut from
    slides for pathology) subclasses it and names the subclass in
    :attr:`Modality.pretraining_class`; the pretrain and tokenize stages call
    ``modality.pretraining``.
    """

    def __init__(self, modality: Modality) -> None:
        self.modality = modality

    def expand_input(self, path: Path) -> list[Path]:
        """The sources one pretraining input stands for: itself by default (a DNA folder of
        FASTA files is one source per genome)."""
        return [Path(path)]

    def prepare_options(self, options: Options, workdir: Path) -> Options:
        """Reader options for a pretraining run whose working folder is ``workdir``
        (e.g. where tiles cut from slides go)."""
        return options

    def augmenter(self, tokenizer: Tokenizer) -> Callable | None:
        """Return a batch augmentation ``f(batch, generator) -> batch``, or ``None``."""
        return None

    def training_overrides(self, options: Options) -> dict[str, Any]:
        """:class:`~healthfm.train.trainer.TrainConfig` fields this modality's options set
        (e.g. the MAE mask ratio)."""
        return {}

    def batch_source(
        self,
        tokenizer: Tokenizer,
        samples: Samples,
        indices: np.ndarray,
        *,
        training: bool,
        workdir: Path,
    ) -> Any:
        """What the trainer draws batches of ``indices`` from: a token store at ``workdir``
        by default (reused when it already holds these samples' tokens), or any
        :class:`~healthfm.train.data.BatchSource` (image tiles)."""
        existing = reuse_store(workdir, tokenizer.hash, samples.data_hash)
        return existing or self.modality.tokenize(tokenizer, samples, workdir, indices)

    def info(
        self, tokenizer: Tokenizer, train_config: Any, summary: dict[str, Any]
    ) -> dict[str, Any]:
        """Extra fields for the model folder's ``training_info.json``."""
        return {}

    def count_baseline(
        self, tokenizer: Tokenizer, train: Any, val: Any, n_val: int
    ) -> dict[str, Any] | None:
        """A count model's held-out loss beside the pretraining held-out loss (``loss`` in
        nats per token, ``name``, ``what``), on the same held-out samples (the first
        ``n_val`` of ``val``). None: the stage's generic count baseline (token frequency for
        masked objectives, bigrams for causal ones)."""
        return None


class Embedding:
    """How ``healthfm embed`` (and evaluation) turn a modality's samples into vectors.

    The defaults serve token sequences: one input, one row per sample, tokenized into a
    token store and run through :func:`healthfm.inference.embed_store`. A modality whose
    rows are not its samples (EHR label rows, DNA genome windows) or whose data are not
    token sequences (image tiles) subclasses it and names the subclass in
    :attr:`Modality.embedding_class`; the stages call ``modality.embedding``.
    """

    def __init__(self, modality: Modality) -> None:
        self.modality = modality

    def inputs(
        self, path: str | Path, options: Options, out: Path, encoder: Any
    ) -> list[EmbeddingInput]:
        """The inputs ``healthfm embed`` writes, each with its output path: the input
        itself by default; one per slide for a folder of slides. Opening one (reading it,
        tiling a slide) is left to whichever process embeds it."""
        return [EmbeddingInput(str(path), Path(out), lambda: self.modality.read(path, options))]

    def prepare(self, encoder: Any, samples: Samples, options: Options) -> None:
        """Check opened samples against the encoder once per run (vocabulary coverage;
        EHR: read the label rows), before any part is embedded."""
        self.modality.check_input(samples, encoder.tokenizer)

    def n_rows(self, samples: Samples, options: Options) -> int:
        """How many vectors embedding ``samples`` gives (its samples; EHR: its label rows)."""
        return len(samples)

    def tokenize_part(
        self, encoder: Any, samples: Samples, indices: np.ndarray, options: Options, workdir: Path
    ) -> Any:
        """The reading and tokenizing of rows ``indices`` (CPU work the embed stage overlaps
        with the previous part's compute): a token store in ``workdir`` by default."""
        return self.modality.tokenize(encoder.tokenizer, samples, Path(workdir) / "store", indices)

    def embed_part(
        self,
        encoder: Any,
        samples: Samples,
        part: Any,
        options: Options,
        pooling: str | None,
        batch_size: int,
        bf16: bool = False,
        compile: bool = False,
    ) -> np.ndarray:
        """One float32 vector per row of a part :meth:`tokenize_part` prepared (batches by
        a token budget, shortest first; see :func:`healthfm.inference.embed_store`);
        ``compile``: through ``torch.compile``."""
        from healthfm.inference import embed_store

        return embed_store(encoder, part, pooling, batch_size, bf16, compile=compile)

    def embed_rows(
        self,
        encoder: Any,
        samples: Samples,
        rows: EvaluationRows,
        pooling: str | None,
        batch_size: int,
    ) -> np.ndarray:
        """The encoder's vector of every evaluation row (default: of every sample)."""
        return embed_samples(self.modality, encoder, samples, {}, pooling, batch_size)

    def write(
        self,
        out: Path,
        samples: Samples,
        embeddings: np.ndarray,
        attrs: dict[str, Any],
        options: Options,
    ) -> Path:
        """Write the embeddings: parquet (key, embedding, label) or ``.npy`` + keys.

        ``embeddings`` may be a read-only memory map larger than memory (the assembled
        parts of a sharded run): writers stream it in row blocks.
        """
        from healthfm.inference import save_embeddings

        labels = samples.labels
        columns = {"label": labels} if labels is not None else None
        return save_embeddings(
            out, samples.keys, embeddings, columns if out.suffix == ".parquet" else None
        )


class Commands:
    """A modality's own ``healthfm`` sub-commands (pathology: ``tile``, ``mil`` ...), named
    in :attr:`Modality.commands_class`; the CLI adds and runs them and names no modality."""

    def __init__(self, modality: Modality) -> None:
        self.modality = modality

    def add(self, subparsers: Any) -> None:
        """Add the sub-commands to the CLI's ``subparsers`` (the object
        ``ArgumentParser.add_subparsers`` returns)."""

    def run(self, args: argparse.Namespace) -> bool:
        """Run ``args.command`` if it is one of :meth:`add`'s; True when handled."""
        return False


class Modality(ABC):
    """A data modality: the parts the shared stages run (see the module docstring).

    The class holds the core every modality supplies; what only some modalities have is a
    capability object: :attr:`pretraining` (:class:`Pretraining`), :attr:`embedding`
    (:class:`Embedding`) and :attr:`commands` (:class:`Commands`, None when it has none).
    """

    name: ClassVar[str]
    #: Pretraining objective: "masked" (bidirectional) or "causal" (next token), or one a
    #: modality registers (``healthfm.model.heads.register_objective``).
    objective: ClassVar[str] = "masked"
    #: Default pooling of token states into one vector per sample.
    default_pooling: ClassVar[str] = "mean"
    #: Poolings ``evaluate --pooling auto`` chooses among, by the validation split's score.
    poolings: ClassVar[tuple[str, ...]] = ("mean", "cls")
    #: Which end of a sample longer than the context pretraining keeps: "head" (the start)
    #: or "tail" (the most recent tokens, for causal models of timelines).
    truncate: ClassVar[str] = "head"
    #: How the method name of a model's embedding reads in result rows:
    #: ``{preset}``, ``{pooling}`` and ``{probe}`` ("logreg" or "ridge") are filled in.
    embedding_method: ClassVar[str] = "{preset}-{pooling}+{probe}"
    #: Whether many distinct numeric labels make a regression (not for class folders).
    numeric_labels_regress: ClassVar[bool] = True
    #: The modality's typed options (reader, tokenizer, evaluation); its CLI flags.
    options_class: ClassVar[type[Options]] = Options
    #: What this modality's input is, in words ("a MEDS folder"), for messages.
    input_kind: ClassVar[str] = "its input"
    #: The capability classes; an instance holds one object of each (built with it).
    pretraining_class: ClassVar[type[Pretraining]] = Pretraining
    embedding_class: ClassVar[type[Embedding]] = Embedding
    commands_class: ClassVar[type[Commands] | None] = None

    def __init__(self) -> None:
        self.pretraining: Pretraining = self.pretraining_class(self)
        self.embedding: Embedding = self.embedding_class(self)
        self.commands: Commands | None = self.commands_class(self) if self.commands_class else None

    # ------------------------------------------------------------------ options, reading
    def options(self, values: Options | Mapping[str, Any] | None = None) -> Any:
        """Typed options from a dict (or as they are); an unknown name is a ``ConfigError``."""
        return self.options_class.from_dict(values)

    def looks_like(self, path: Path) -> bool | None:
        """A cheap sniff (names, suffixes, a few bytes; never a full read): whether ``path``
        looks like this modality's input; None when it cannot tell. The stages use it to
        say "this is a DNA model and the input looks like a MEDS folder" instead of a
        reader's message about the wrong kind of data."""
        return None

    @abstractmethod
    def read(self, path: str | Path, options: Options) -> Samples:
        """Read an input file into :class:`Samples`, validating it."""

    def split(
        self, samples: Samples, salt: str, fractions: tuple[float, float, float]
    ) -> np.ndarray:
        """Split name ("train" / "val" / "test") of every sample.

        Default: :func:`assign_splits` on the sample groups. A modality whose data carry
        their own splits (MEDS ``subject_splits.parquet``) returns those instead.
        """
        return assign_splits(samples.groups, fractions, salt)

    def split_source(self, samples: Samples) -> dict[str, Any]:
        """Where :meth:`split` takes the split from, recorded in a pretrained model folder:
        ``{"source": "hash"}`` by default; a modality whose data carry their own split
        file names it (and its SHA-256), so evaluating the model on a copy of the data
        without that file is refused instead of silently hash-split (leakage)."""
        return {"source": "hash"}

    # ------------------------------------------------------------------ tokens
    @abstractmethod
    def fit_tokenizer(self, samples: Samples, train_idx: np.ndarray, options: Options) -> Tokenizer:
        """Fit a tokenizer (or image preprocessor) on the training samples only."""

    def fit_corpus_tokenizer(
        self, parts: list[tuple[Samples, np.ndarray]], options: Options
    ) -> Tokenizer:
        """Fit one tokenizer on the training samples of several sources: ``parts`` holds
        each source's samples and its training indices. One source: :meth:`fit_tokenizer`;
        a modality whose vocabulary can span sources (genes, codes) overrides this."""
        if len(parts) == 1:
            return self.fit_tokenizer(parts[0][0], parts[0][1], options)
        raise ConfigError(
            f"the {self.name} modality cannot fit one tokenizer over {len(parts)} sources; "
            "pretrain on one input"
        )

    @abstractmethod
    def encode(
        self, tokenizer: Tokenizer, samples: Samples, indices: np.ndarray | None = None
    ) -> Iterator[TokenChunk]:
        """Tokenize the chosen samples (all by default) in chunks, in the given order."""

    def check_input(self, samples: Samples, tokenizer: Tokenizer) -> None:  # noqa: B027
        """Validate samples against a fitted tokenizer (e.g. vocabulary coverage)."""

    def tokenize(
        self,
        tokenizer: Tokenizer,
        samples: Samples,
        out: str | Path,
        indices: np.ndarray | None = None,
    ) -> TokenStore:
        """Tokenize ``samples`` (or the chosen ``indices``) into a token store at ``out``."""
        extra = {
            "modality": self.name,
            "source": str(samples.source),
            "data_hash": samples.data_hash,
        }
        return write_store(
            out, self.encode(tokenizer, samples, indices), tokenizer.hash, tokenizer.fields, extra
        )

    def model_defaults(
        self, tokenizer: Tokenizer, samples: Samples, options: Options
    ) -> dict[str, Any]:
        """Model-config fields this modality fixes (context length, value input ...); an
        ``extra`` dict is merged into ``ModelConfig.extra``."""
        return {}

    # ------------------------------------------------------------------ evaluation
    def evaluation_rows(
        self,
        samples: Samples,
        options: Options,
        salt: str,
        fractions: tuple[float, float, float],
        task_rule: TaskRule,
    ) -> EvaluationRows:
        """The labelled rows a task is scored on: one per sample by default, split by
        :meth:`split`; a regression when ``task_rule`` says so (the fine-tuned models'
        task, or many distinct numbers among the labels: the rule ``finetune`` uses)."""
        split = np.asarray(self.split(samples, salt, tuple(fractions))).astype(str)
        target = samples.info.get("survival")
        if target is not None:  # time and event columns: a time-to-event task
            return EvaluationRows(
                task=f"{Path(samples.source).stem}:{target['time_column']}",
                groups=samples.groups,
                y=target["time"],
                classes=np.array([]),
                regression=False,
                split=split,
                data_hash=samples.data_hash,
                options=options,
                survival=True,
                event=target["event"],
            )
        labels = require_labels(samples, np.where(split == "val", "train", split))
        pool = np.flatnonzero(split != "test")
        regression = self.numeric_labels_regress and task_rule.regression(
            labels[pool], bool(samples.info.get("categorical_labels"))
        )
        if regression:
            classes, y = np.array([]), labels_as_targets(samples, labels)
        else:
            classes, y = np.unique(labels, return_inverse=True)
        return EvaluationRows(
            task=f"{Path(samples.source).stem}:{samples.label_column}",
            groups=samples.groups,
            y=y,
            classes=classes,
            regression=regression,
            split=split,
            data_hash=samples.data_hash,
            options=options,
        )

    def evaluation_protocol(self, options: Options) -> Any:
        """The evaluation protocol the shared evaluator runs, or None (the default) for the
        shared linear probe (:class:`healthfm.evaluate.protocol.ProbeProtocol`)."""
        return None

    def baselines(self) -> dict[str, BaselineFn]:
        """Baseline featurizers by method name."""
        return {}

    def baseline_features(self, samples: Samples, rows: EvaluationRows) -> dict[str, Features]:
        """Every baseline's features of the evaluation rows, fitted on the non-test rows."""
        pool = np.flatnonzero(rows.split != "test")
        out = {}
        for name, featurize in self.baselines().items():
            t = time.perf_counter()
            X = np.asarray(featurize(samples, pool), dtype=np.float32)
            out[name] = Features(X, baseline=True, seconds=time.perf_counter() - t)
        return out

    # ------------------------------------------------------------------ fine-tuning
    def task_input(
        self,
        samples: Samples,
        options: Options,
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

    # ------------------------------------------------------------------ demo
    def demo_spec(self, quick: bool) -> DemoSpec | None:
        """What ``healthfm demo`` runs for this modality, or None when it has no demo."""
        return None


def embed_samples(
    modality: Modality,
    encoder: Any,
    samples: Samples,
    options: Options | Mapping[str, Any] | None,
    pooling: str | None,
    batch_size: int,
    bf16: bool = False,
) -> np.ndarray:
    """Every row's vector in one call (evaluation): the modality's
    :meth:`Embedding.prepare`, then all rows as one part."""
    embedding = modality.embedding
    options = modality.options(options)
    embedding.prepare(encoder, samples, options)
    rows = np.arange(embedding.n_rows(samples, options))
    with tempfile.TemporaryDirectory(prefix="healthfm-embed-") as tmp:
        part = embedding.tokenize_part(encoder, samples, rows, options, Path(tmp))
        return embedding.embed_part(encoder, samples, part, options, pooling, batch_size, bf16)


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


def check_input_modality(modality: Modality, path: str | Path, model: bool = True) -> None:
    """Refuse an input that does not look like ``modality``'s but looks like another's.

    Only when the modality's own sniff says no *and* another's says yes: an input none
    recognises is left to the reader, whose messages name file, column and row.

    Raises
    ------
    DataError
        Naming both modalities, e.g. "this is a dna model and the input looks like a MEDS
        folder (ehr)".
    """
    if not isinstance(path, str | Path):  # an in-memory input (an AnnData): nothing to sniff
        return
    path = Path(path)
    if not path.exists() or modality.looks_like(path) is not False:
        return
    others = [m for n, m in sorted(_MODALITIES.items()) if n != modality.name]
    matches = [m for m in others if m.looks_like(path)]
    if matches:
        what = f"a {modality.name} model" if model else f"the {modality.name} modality"
        kinds = " or ".join(f"{m.input_kind} ({m.name})" for m in matches)
        raise DataError(
            f"this is {what}, which reads {modality.input_kind}, and the input looks like "
            f"{kinds}: give {modality.input_kind}, or a model of that modality",
            file=path,
        )


def next_power_of_two(n: int) -> int:
    """The smallest power of two ``>= n`` (1 for ``n <= 1``): context lengths."""
    return 1 << max(int(n) - 1, 0).bit_length()


def _unit_interval(text: str, salt: str) -> float:
    digest = hashlib.blake2b(f"{salt}\x00{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def assign_splits(
    groups: np.ndarray,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    salt: str = DEFAULT_SALT,
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


#: Label strings that mean "no label" (pandas / R / spreadsheet spellings), lower case.
MISSING_LABELS = frozenset({"", "nan", "na", "n/a", "<na>", "none", "null", "nat", "?"})


def missing_labels(labels: np.ndarray) -> np.ndarray:
    """Boolean mask of labels that spell a missing value (``NaN``, ``NA``, empty ...)."""
    text = np.char.lower(np.char.strip(np.asarray(labels).astype(str)))
    return np.isin(text, list(MISSING_LABELS))


def require_labels(samples: Samples, splits: np.ndarray | None = None) -> np.ndarray:
    """Return the labels, or raise if there are none, any is missing (``NaN``, ``NA``,
    empty: never a class of its own), or there is only one class."""
    if samples.labels is None:
        raise DataError(
            "the input has no label column", file=samples.source, column=samples.label_column
        )
    missing = missing_labels(samples.labels)
    if missing.any():
        i = int(np.flatnonzero(missing)[0])
        raise DataError(
            f"{int(missing.sum())} sample(s) have a missing label ({str(samples.labels[i])!r} "
            f"for sample {str(samples.keys[i])!r}); a missing label is not a class: drop those "
            "rows or label them",
            file=samples.source,
            column=samples.label_column,
            row=i,
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


def survival_options(options: Any) -> tuple[str, str] | None:
    """``(time_column, event_column)`` of a modality's options, None when neither is set;
    ``--task-type survival`` without them, or only one of them, is a ``ConfigError``."""
    time_column = getattr(options, "time_column", None)
    event_column = getattr(options, "event_column", None)
    task_type = getattr(options, "task_type", "auto")
    if bool(time_column) != bool(event_column):
        given = "--time-column" if time_column else "--event-column"
        raise ConfigError(
            f"{given} needs its partner: a time-to-event task has a time column (days to "
            "the event or to censoring) and an event column (observed or not)",
            column="time_column" if not time_column else "event_column",
        )
    if not time_column:
        if task_type == "survival":
            raise ConfigError(
                "--task-type survival needs --time-column and --event-column", column="task_type"
            )
        return None
    return str(time_column), str(event_column)


def reuse_store(path: Path, tokenizer_hash: str, data_hash: str) -> TokenStore | None:
    """The token store at ``path`` if it holds ``data_hash``'s tokens by this tokenizer
    (a resumed run re-reads its input but need not re-tokenize it), else None."""
    if not (Path(path) / "meta.json").exists():
        return None
    try:
        store = TokenStore(path, tokenizer_hash)
    except DataError:
        return None
    return store if store.meta.get("data_hash") == data_hash else None
