"""Compare healthfm's CLMBR-T loader with femr's own code, on the bundled MEDS data.

femr is not a healthfm dependency (it pins flash-attn or xformers, which need CUDA). Read
its wheel without installing it, plus einops and msgpack::

    pip download --no-deps femr==0.2.0 -d /tmp/femr && unzip /tmp/femr/*.whl -d /tmp/femr/0.2.0
    pip install --target /tmp/femr/site einops msgpack
    PYTHONPATH=src:/tmp/femr/site python scripts/verify_clmbr_against_femr.py /tmp/femr/0.2.0 0.2.0

(``0.2.2`` as the second argument for femr 0.2.2/0.2.3 wheels.) It writes a tiny random
checkpoint in FEMR's layout (tests/encoders/test_clmbr.py), builds femr's ``FEMRModel``
from its config.json and loads its model.safetensors strictly, tokenizes 40 bundled
subjects with femr's ``FEMRTokenizer`` + ``FEMRBatchProcessor`` + ``LabeledPatientTask``,
and compares token ids and the representations at the admission_1y prediction times with
healthfm's ``featurize_labels``.

Stubbed: ``flash_attn`` (femr 0.2.0 on CPU runs its own ``flash_attn_fallback``; the
names are only imported), ``datasets`` and ``event_stream_data_standard`` (imported, not
used here), and xformers' ``BlockDiagonalMask(...).make_local_attention(w)`` for femr
0.2.3's CPU ``ref_attention``, whose materialisation is transcribed from xformers
(``fmha/attn_bias.py``: ``tril`` then ``triu(diagonal=1 - w)`` per block).
"""

import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import polars as pl
import torch

femr_dir, release = sys.argv[1], sys.argv[2]
sys.path.insert(0, femr_dir)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "encoders"))


import transformers  # noqa: E402
import transformers.modeling_utils  # noqa: E402, F401  (before the stubs: it probes flash_attn)


def stub(name, **attrs):
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    sys.modules[name] = m
    return m


fa_names = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
]
stub("flash_attn", **{n: None for n in fa_names})
stub("datasets", Dataset=object, DatasetDict=dict)
stub("event_stream_data_standard")


class AttentionBias:
    pass


class LocalMask(AttentionBias):
    def __init__(self, seqlens, window):
        self.seqlens, self.window = seqlens, window

    def materialize(self, shape, device="cpu", dtype=torch.float32):
        out = torch.full(shape, float("-inf"), dtype=dtype)
        s = 0
        for n in self.seqlens:
            block = torch.ones(n, n)
            m = torch.tril(block, diagonal=0)
            m = torch.triu(m, diagonal=-self.window + 1)
            out[..., s : s + n, s : s + n] = torch.log(m)
            s += n
        return out


class BlockDiagonalMask(AttentionBias):
    @classmethod
    def from_seqlens(cls, seqlens):
        obj = cls()
        obj.seqlens = list(seqlens)
        return obj

    def make_local_attention(self, window):
        return LocalMask(self.seqlens, window)


xf = stub("xformers")
ops = stub("xformers.ops", AttentionBias=AttentionBias)
fmha = stub("xformers.ops.fmha")
ab = stub("xformers.ops.fmha.attn_bias", BlockDiagonalMask=BlockDiagonalMask)
xf.ops, ops.fmha, fmha.attn_bias = ops, fmha, ab

import meds  # noqa: E402

# femr 0.2.3 pins meds 0.1.3, whose TypedDicts annotate its functions (0.4.1 is installed).
for _n in ("Patient", "Label", "Measurement", "Event"):
    if not hasattr(meds, _n):
        setattr(meds, _n, dict)
import femr.models.processor  # noqa: E402
import femr.models.tasks  # noqa: E402
import femr.models.tokenizer  # noqa: E402
import femr.models.transformer  # noqa: E402
import test_clmbr as T  # noqa: E402

from healthfm.ehr.embed import featurize_labels  # noqa: E402
from healthfm.ehr.reader import open_meds, read_labels, scan_meds  # noqa: E402
from healthfm.loader import load_encoder  # noqa: E402

tmp = Path(tempfile.mkdtemp())
folder = T.write_femr_folder(tmp / "ckpt", release=release, seed=5)
ours = load_encoder(f"clmbr-t-base:{folder}")
assert ours.release == release
# The installed transformers (5.x) cannot from_pretrained femr's model (no post_init);
# build it from config.json and load model.safetensors strictly (FEMR's own key names).
import json  # noqa: E402

from safetensors.torch import load_file  # noqa: E402

cfg_mod = getattr(femr.models, "config", femr.models.transformer)
config = cfg_mod.FEMRModelConfig(**json.loads((folder / "config.json").read_text()))
model = femr.models.transformer.FEMRModel(config)
model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
model.eval()
tok = femr.models.tokenizer.FEMRTokenizer.from_pretrained(str(folder))
print("femr", femr_dir, "release", release, "model", type(model).__name__)

df = T._events()
labels_all = pl.read_parquet(T.LABELS)
subjects = df["subject_id"].unique(maintain_order=True)[:40].to_list()
lab = labels_all.filter(pl.col("subject_id").is_in(subjects)).sort("subject_id", "prediction_time")
path = tmp / "labels.parquet"
lab.write_parquet(path)
ds = open_meds(T.CLINOSIM)
labels = read_labels(path, scan_meds(ds))
feats = featurize_labels(ds, ours.tokenizer, labels, ours, "last", 8)

max_tok, max_rep, n_labels, lengths = 0, 0.0, 0, []
for sid in subjects:
    one = df.filter(pl.col("subject_id") == sid)
    patient = T.femr_patient(one)
    mine = ours.tokenizer.encode_frame(one)
    rows = lab.filter(pl.col("subject_id") == sid)
    task_labels = [
        {"patient_id": sid, "prediction_time": t} for t in rows["prediction_time"].to_list()
    ]
    task = femr.models.tasks.LabeledPatientTask(task_labels)
    proc = femr.models.processor.FEMRBatchProcessor(tok, task=task)
    b = proc.convert_patient(patient)
    tr = b["transformer"]
    tokens = np.asarray(tr["tokens"]).reshape(-1)
    if release == "0.2.0":  # 0.2.0 pads each patient to its measurement count
        tokens = tokens[np.asarray(tr["valid_tokens"]).reshape(-1)]
    assert np.array_equal(tokens, mine.ids), sid
    lengths.append(len(tokens))
    with torch.no_grad():
        if release == "0.2.0":
            x = model.transformer(
                {
                    "tokens": torch.from_numpy(tr["tokens"]).long(),
                    "ages": torch.from_numpy(tr["ages"]),
                }
            ).reshape(-1, ours.dim)
        else:
            batch = {
                "tokens": torch.from_numpy(tokens).long(),
                "ages": torch.from_numpy(tr["ages"]),
                "normalized_ages": torch.from_numpy(tr["normalized_ages"].astype(np.float32)),
                "patient_lengths": torch.from_numpy(tr["patient_lengths"]),
            }
            x = model.transformer(batch)
    idx = np.asarray(tr["label_indices"])
    reps = x[idx].numpy()
    where = np.flatnonzero(labels.frame["subject_id"].to_numpy() == sid)
    assert len(where) == len(idx)
    if len(idx) == 0:
        continue
    max_rep = max(max_rep, float(np.abs(reps - feats.embeddings[where]).max()))
    n_labels += len(idx)
print(
    f"subjects {len(subjects)}, tokens per subject {min(lengths)}-{max(lengths)} "
    f"(attention_width {T.WIDTH}), labels {n_labels}: token ids identical, "
    f"max |ours - femr| representation = {max_rep:.2e}"
)
