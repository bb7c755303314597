"""Published pathology tile encoders (Phikon, Phikon-v2, UNI, UNI2-h, H-optimus-0,
Virchow2) on one native Vision Transformer that reads their authors' folders.

One network, :class:`VisionTransformer`, holds its parameters under timm's state-dict
names (``patch_embed.proj``, ``cls_token``, ``reg_token``, ``pos_embed``,
``blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,ls2.gamma}``,
``norm``) and covers the variants these models use:

* patch size 16 or 14, a class token, 0, 4 or 8 register tokens;
* position embeddings that cover the prefix tokens (original ViT, Virchow2) or only the
  patches (timm's ``no_embed_class``: UNI2-h, H-optimus-0), resampled bicubically when the
  input grid differs (timm's ``dynamic_img_size``; HF's ``interpolate_pos_encoding`` for
  the transformers layouts, which does not antialias);
* layer scale (``ls1.gamma``/``ls2.gamma``, DINOv2's ``layer_scale*.lambda1``);
* a GELU MLP or timm's packed SwiGLU (``SwiGLUPacked``/``GluMlp(gate_last=False)``: ``fc1``
  is ``2·h`` wide, its first half gated by SiLU, times the second half).

Readers map the transformers ``ViTModel`` (Phikon) and ``Dinov2Model`` (Phikon-v2)
layouts onto it (q, k, v fused into ``qkv``); timm-format folders (``config.json`` with
``architecture``/``model_args``, ``pytorch_model.bin`` or ``model.safetensors``) load as
they are. timm itself is never needed (it needs torchvision); where it imports,
:func:`timm_reference` builds timm's own model from the same folder, for comparison.

The encoders' tokenizer is the pathology modality's
:class:`~healthfm.pathology.tokenizer.PatchTokenizer` at the authors' image size, patch
size and normalisation, so embedding, evaluation and slide embedding run through the
shared stages unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from healthfm.encoders.published import (
    PublishedEncoder,
    find_file,
    folder_hash,
    load_weights,
    read_json,
    read_state_dict,
)
from healthfm.encoders.registry import EncoderEntry, register_entry
from healthfm.errors import ConfigError, ModelError, require

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: H-optimus-0's own normalisation (bioptimus/releases, models/h-optimus/v0/README.md).
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


# ---------------------------------------------------------------------------- network


@dataclass(frozen=True)
class ViTConfig:
    """The architecture of one ViT variant (timm's ``VisionTransformer`` arguments).

    Attributes
    ----------
    img_size, patch_size
        Native input side and patch side (the position table's grid is their ratio).
    dim, depth, heads
        Width, blocks, attention heads.
    mlp_hidden
        ``fc1`` output width (for the packed SwiGLU: twice the gated width).
    glu
        Packed SwiGLU MLP (SiLU gate on the first half) instead of a GELU MLP.
    layer_scale
        Per-channel residual scales (``ls1``/``ls2``).
    reg_tokens
        Register tokens after the class token.
    class_token
        Whether a class token leads the sequence.
    no_embed_class
        Position embeddings cover patches only (added before the prefix is prepended).
    eps
        LayerNorm epsilon.
    hf_interpolation
        Resample the position table as transformers does (bicubic, no antialias, class
        position kept) rather than as timm does (bicubic, antialiased).
    """

    img_size: int = 224
    patch_size: int = 16
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_hidden: int = 3072
    glu: bool = False
    layer_scale: bool = False
    reg_tokens: int = 0
    class_token: bool = True
    no_embed_class: bool = False
    eps: float = 1e-6
    hf_interpolation: bool = False

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def prefix(self) -> int:
        """Tokens before the patches (class + registers)."""
        return int(self.class_token) + self.reg_tokens


class _LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, 1e-5)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, glu: bool) -> None:
        super().__init__()
        if glu and hidden % 2:
            raise ConfigError(f"a packed SwiGLU needs an even fc1 width, not {hidden}")
        self.glu = glu
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden // 2 if glu else hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        if self.glu:
            # timm's GluMlp(gate_last=False): act(first half) * second half.
            gate, value = x.chunk(2, dim=-1)
            x = F.silu(gate) * value
        else:
            x = F.gelu(x)
        return self.fc2(x)


class _Block(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.attn = _Attention(cfg.dim, cfg.heads)
        self.ls1 = _LayerScale(cfg.dim) if cfg.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.mlp = _Mlp(cfg.dim, cfg.mlp_hidden, cfg.glu)
        self.ls2 = _LayerScale(cfg.dim) if cfg.layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class _PatchEmbed(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.dim, cfg.patch_size, stride=cfg.patch_size)


class VisionTransformer(nn.Module):
    """timm's ``VisionTransformer`` forward (pre-norm blocks, final ``norm``), natively.

    ``forward(images)`` takes normalised ``(B, 3, H, W)`` images; ``forward_patches``
    takes the patch vectors healthfm's patch tokenizer cuts (``(B, N, p·p·3)`` in raster
    order, pixels row-major and channels last in each patch), so tiles never need to be
    put back together. Both return every token's state ``(B, prefix + N, dim)``.
    """

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = _PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim)) if cfg.class_token else None
        self.reg_token = (
            nn.Parameter(torch.zeros(1, cfg.reg_tokens, cfg.dim)) if cfg.reg_tokens else None
        )
        n_pos = cfg.grid**2 + (0 if cfg.no_embed_class else cfg.prefix)
        self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, cfg.dim))
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.reset_own_parameters()

    def reset_own_parameters(self) -> None:
        """timm's initialisation of the tokens and position table (trunc-normal 0.02,
        class token 1e-6)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)

    def _positions(self, grid: tuple[int, int]) -> torch.Tensor:
        """The position table for a ``grid`` of patches (resampled when it differs)."""
        cfg = self.cfg
        pos = self.pos_embed
        keep = 0 if cfg.no_embed_class else cfg.prefix
        if grid == (cfg.grid, cfg.grid):
            return pos
        prefix, patches = pos[:, :keep], pos[:, keep:]
        patches = patches.float().reshape(1, cfg.grid, cfg.grid, -1).permute(0, 3, 1, 2)
        # timm's resample_abs_pos_embed antialiases; transformers' interpolate_pos_encoding
        # does not (and PyTorch's antialiased bicubic uses another kernel): follow each.
        patches = F.interpolate(
            patches,
            size=grid,
            mode="bicubic",
            align_corners=False,
            antialias=not cfg.hf_interpolation,
        )
        patches = patches.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1).to(pos.dtype)
        return torch.cat([prefix, patches], dim=1)

    def _tokens(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Patch embeddings ``(B, N, dim)`` → the sequence with prefix and positions."""
        b = x.shape[0]
        prefix = []
        if self.cls_token is not None:
            prefix.append(self.cls_token.expand(b, -1, -1).to(x.dtype))
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(b, -1, -1).to(x.dtype))
        pos = self._positions(grid).to(x.dtype)
        if self.cfg.no_embed_class:
            return torch.cat([*prefix, x + pos], dim=1)
        return torch.cat([*prefix, x], dim=1) + pos

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Token states of normalised ``(B, 3, H, W)`` images."""
        p = self.cfg.patch_size
        grid = (images.shape[-2] // p, images.shape[-1] // p)
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)
        return self._encode(self._tokens(x, grid))

    def forward_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """Token states of a square grid of patch vectors ``(B, N, p·p·3)``."""
        p = self.cfg.patch_size
        _, n, d = patches.shape
        side = math.isqrt(n)
        if side * side != n or d != p * p * 3:
            raise ConfigError(
                f"{n} patches of {d} values are not a square grid of {p}x{p} RGB patches"
            )
        w = self.patch_embed.proj.weight  # (dim, 3, p, p) → (dim, p·p·3), channels last
        w = w.permute(0, 2, 3, 1).reshape(w.shape[0], d)
        x = F.linear(patches.to(w.dtype), w, self.patch_embed.proj.bias)
        return self._encode(self._tokens(x, (side, side)))


# ---------------------------------------------------------------------------- layouts


def _strip(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Drop a model-class prefix (``vit.``, ``dinov2.``) when every key carries it."""
    keys = list(state)
    if keys and all(k.startswith(prefix) for k in keys):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return dict(state)


def _hf_blocks(
    state: dict[str, torch.Tensor], depth: int, names: Mapping[str, str], path: Path
) -> dict[str, torch.Tensor]:
    """The transformers encoder layers under timm names (q, k, v fused into ``qkv``)."""
    out: dict[str, torch.Tensor] = {}
    for i in range(depth):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        attn = src + "attention.attention."
        for kind in ("weight", "bias"):
            parts = [attn + f"{m}.{kind}" for m in ("query", "key", "value")]
            missing = [p for p in parts if p not in state]
            if missing:
                raise ModelError(
                    f"weights do not fit this architecture: missing {missing[0]}", file=path
                )
            out[dst + f"attn.qkv.{kind}"] = torch.cat([state.pop(p) for p in parts])
        for hf_name, timm_name in names.items():
            for kind in ("weight", "bias", "lambda1"):
                key = src + f"{hf_name}.{kind}"
                if key in state:
                    out[dst + timm_name + ("gamma" if kind == "lambda1" else kind)] = state.pop(key)
    return out


_VIT_NAMES = {
    "layernorm_before": "norm1.",
    "attention.output.dense": "attn.proj.",
    "layernorm_after": "norm2.",
    "intermediate.dense": "mlp.fc1.",
    "output.dense": "mlp.fc2.",
}
_DINOV2_NAMES = {
    "norm1": "norm1.",
    "attention.output.dense": "attn.proj.",
    "layer_scale1": "ls1.",
    "norm2": "norm2.",
    "mlp.fc1": "mlp.fc1.",
    "mlp.fc2": "mlp.fc2.",
    "layer_scale2": "ls2.",
}


def hf_to_timm(
    state: Mapping[str, torch.Tensor], depth: int, kind: str, path: Path
) -> dict[str, torch.Tensor]:
    """A transformers ``ViTModel`` (``kind="vit"``) or ``Dinov2Model`` (``"dinov2"``)
    state dict under the native ViT's (timm's) names.

    Pretraining leftovers (the pooler, DINOv2's mask token) are dropped; anything else
    not mapped stays, so the strict load names it.
    """
    state = _strip(_strip(state, "vit."), "dinov2.")
    names = _VIT_NAMES if kind == "vit" else _DINOV2_NAMES
    out = _hf_blocks(state, depth, names, path)
    renames = {
        "embeddings.cls_token": "cls_token",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    }
    for key, value in state.items():
        if key.startswith("pooler.") or key == "embeddings.mask_token":
            continue
        out[renames.get(key, key)] = value
    return out


# timm's registered architectures these folders name (vision_transformer.py model_args).
_TIMM_ARCHS: dict[str, dict[str, Any]] = {
    "vit_base_patch16_224": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16_224": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "vit_huge_patch14_224": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
    "vit_giant_patch14_224": dict(
        patch_size=14, embed_dim=1408, depth=40, num_heads=16, mlp_ratio=48 / 11
    ),
    "vit_giant_patch14_dinov2": dict(
        patch_size=14,
        embed_dim=1536,
        depth=40,
        num_heads=24,
        init_values=1e-5,
        mlp_ratio=2.66667 * 2,
        mlp_layer="swiglu_packed",
        img_size=518,
    ),
    "vit_giant_patch14_reg4_dinov2": dict(
        patch_size=14,
        embed_dim=1536,
        depth=40,
        num_heads=24,
        init_values=1e-5,
        mlp_ratio=2.66667 * 2,
        mlp_layer="swiglu_packed",
        reg_tokens=4,
        no_embed_class=True,
        img_size=518,
    ),
}


_TIMM_INFERENCE_FREE = {
    "drop_rate",
    "pos_drop_rate",
    "patch_drop_rate",
    "proj_drop_rate",
    "attn_drop_rate",
    "drop_path_rate",
    "weight_init",
    "fix_init",
    "pretrained_cfg",
    "pretrained_cfg_overlay",
}
_TIMM_DEFAULTS = {
    "pre_norm": False,
    "final_norm": True,
    "fc_norm": None,
    "qk_norm": False,
    "proj_bias": True,
    "pos_embed": "learn",
    "dynamic_img_pad": False,
}


def timm_config(args: Mapping[str, Any]) -> ViTConfig:
    """:class:`ViTConfig` of timm ``VisionTransformer`` keyword arguments.

    ``mlp_layer`` is ``"swiglu_packed"`` for timm's ``SwiGLUPacked`` /
    ``GluMlp(act_layer=SiLU, gate_last=False)`` (a class cannot be written into a
    ``config.json``, so the entry supplies it as its authors' code does).
    """
    unknown = set(args) - {
        "img_size",
        "patch_size",
        "embed_dim",
        "depth",
        "num_heads",
        "mlp_ratio",
        "init_values",
        "reg_tokens",
        "no_embed_class",
        "class_token",
        "mlp_layer",
        "act_layer",
        "num_classes",
        "global_pool",
        "dynamic_img_size",
        "qkv_bias",
        "in_chans",
    }
    # Dropout and initialisation settings do not change inference; structural switches
    # are accepted at timm's defaults (the published models use no other).
    unknown -= _TIMM_INFERENCE_FREE
    unknown -= {k for k, default in _TIMM_DEFAULTS.items() if args.get(k, default) == default}
    if unknown:
        raise ConfigError(f"timm arguments not supported by the native ViT: {sorted(unknown)}")
    if not args.get("qkv_bias", True) or int(args.get("in_chans", 3)) != 3:
        raise ConfigError("the native ViT covers qkv_bias=True, 3 input channels")
    dim = int(args.get("embed_dim", 768))
    glu = args.get("mlp_layer") in ("swiglu_packed", "SwiGLUPacked", "GluMlp")
    img = args.get("img_size", 224)
    img = int(img[0] if isinstance(img, (list, tuple)) else img)
    return ViTConfig(
        img_size=img,
        patch_size=int(args.get("patch_size", 16)),
        dim=dim,
        depth=int(args.get("depth", 12)),
        heads=int(args.get("num_heads", 12)),
        mlp_hidden=int(dim * float(args.get("mlp_ratio", 4.0))),  # timm: int(dim * ratio)
        glu=glu,
        layer_scale=args.get("init_values") is not None,
        reg_tokens=int(args.get("reg_tokens", 0)),
        class_token=bool(args.get("class_token", True)),
        no_embed_class=bool(args.get("no_embed_class", False)),
    )


# ---------------------------------------------------------------------------- encoder


@dataclass(frozen=True)
class PathologySpec:
    """What one published tile encoder is: its layout, the authors' arguments and
    preprocessing, its pooling."""

    name: str
    layout: str  # "vit" (transformers ViTModel), "dinov2" (Dinov2Model), "timm"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    image_size: int = 224
    #: Center crop after the resize (a preprocessor_config.json's crop_size); None: none.
    crop_size: int | None = None
    pooling: str = "cls"
    poolings: tuple[str, ...] = ("cls", "mean")
    #: timm layout: the authors' create_model/VisionTransformer arguments (config.json's
    #: model_args and architecture override what a folder states).
    timm_args: tuple[tuple[str, Any], ...] = ()
    architecture: str | None = None
    #: Extra weight file names the authors distribute (H-optimus-0's checkpoint.pth).
    weight_files: tuple[str, ...] = WEIGHT_FILES


class PathologyViT(PublishedEncoder):
    """A published pathology tile encoder (an :class:`~healthfm.encoders.Encoder`).

    Its batches are the pathology modality's patch batches (``inputs`` holds a leading
    zero row for the class token, then the patches); ``forward_features`` returns every
    token's state (class, registers, patches) after the final norm.

    Poolings
    --------
    ``cls``: the class token (timm's ``global_pool="token"``, transformers'
    ``last_hidden_state[:, 0]``); ``mean``: mean of the patch tokens, registers excluded
    (timm's ``"avg"``); ``cls+mean``: their concatenation (Virchow2's authors').
    """

    poolings = ("cls", "mean")

    def __init__(
        self, spec: PathologySpec, vit: VisionTransformer, folder: Path, model_hash: str | None
    ) -> None:
        # Imported here: listing the registry must not import the pathology modality.
        from healthfm.pathology.tokenizer import CroppedPatchTokenizer, PatchTokenizer

        cfg = vit.cfg
        if spec.crop_size and spec.crop_size != spec.image_size:
            tokenizer: PatchTokenizer = CroppedPatchTokenizer(
                spec.image_size, spec.crop_size, cfg.patch_size, spec.mean, spec.std
            )
        else:
            tokenizer = PatchTokenizer(spec.image_size, cfg.patch_size, spec.mean, spec.std)
        dim = cfg.dim * (2 if spec.pooling == "cls+mean" else 1)
        super().__init__(
            spec.name,
            "pathology",
            dim,
            spec.pooling,
            tokenizer.n_tokens,
            tokenizer,
            folder,
            model_hash,
        )
        self.spec = spec
        self.poolings = spec.poolings
        self.vit = vit

    def forward_features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = batch.get("inputs")
        if inputs is None:
            raise ConfigError(
                f"{self.name} embeds image tiles: its batches come from the pathology "
                "modality's patch tokenizer (an 'inputs' tensor of patch pixels)"
            )
        return self.vit.forward_patches(inputs[:, 1:])

    def embed(self, batch: dict[str, torch.Tensor], pooling: str | None = None) -> torch.Tensor:
        pooling = self.check_pooling(pooling)
        tokens = self.forward_features(batch)
        cls = tokens[:, 0]
        patches = tokens[:, self.vit.cfg.prefix :].mean(dim=1)
        if pooling == "cls":
            return cls
        if pooling == "mean":
            return patches
        return torch.cat([cls, patches], dim=-1)

    def reset_own_parameters(self) -> None:
        self.vit.reset_own_parameters()


def _hf_config(folder: Path, kind: str, name: str) -> tuple[ViTConfig, Path]:
    """The native ViT's configuration from a transformers ``config.json``."""
    path = folder / "config.json"
    config = read_json(find_file(folder, ["config.json"], name))
    if not isinstance(config, dict) or config.get("model_type") != kind:
        got = config.get("model_type") if isinstance(config, dict) else None
        raise ModelError(
            f"{name} reads a transformers '{kind}' folder; this config.json's model_type "
            f"is {got!r} (a folder of another model?)",
            file=path,
            column="model_type",
        )
    act = config.get("hidden_act", "gelu")
    if act != "gelu":
        raise ModelError(f"hidden_act {act!r} is not supported (gelu only)", file=path)
    if config.get("qkv_bias") is False or int(config.get("num_channels", 3)) != 3:
        raise ModelError("only qkv_bias=True and 3 channels are supported", file=path)
    try:
        dim = int(config["hidden_size"])
        if kind == "vit":
            hidden = int(config["intermediate_size"])
            glu, layer_scale = False, False
        else:
            if config.get("use_swiglu_ffn"):
                raise ModelError("DINOv2's SwiGLU FFN is read in timm layout only", file=path)
            hidden = int(dim * float(config.get("mlp_ratio", 4)))
            glu, layer_scale = False, True
        cfg = ViTConfig(
            img_size=int(config["image_size"]),
            patch_size=int(config["patch_size"]),
            dim=dim,
            depth=int(config["num_hidden_layers"]),
            heads=int(config["num_attention_heads"]),
            mlp_hidden=hidden,
            glu=glu,
            layer_scale=layer_scale,
            eps=float(config.get("layer_norm_eps", 1e-12 if kind == "vit" else 1e-6)),
            hf_interpolation=True,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"config.json lacks or mis-states {exc}", file=path) from exc
    return cfg, path


def _timm_folder_config(folder: Path, spec: PathologySpec) -> tuple[ViTConfig, list[Path]]:
    """The native ViT's configuration of a timm-format folder: the architecture's
    registered arguments, then the authors' (the entry's), then ``config.json``'s."""
    files: list[Path] = []
    args: dict[str, Any] = {}
    arch = spec.architecture
    path = folder / "config.json"
    if path.is_file():
        config = read_json(path)
        files.append(path)
        if not isinstance(config, dict) or (
            "architecture" not in config and "model_args" not in config
        ):
            got = config.get("model_type") if isinstance(config, dict) else None
            raise ModelError(
                f"{spec.name} reads a timm-format folder (config.json with 'architecture' "
                f"and 'model_args'); this config.json is not one (model_type {got!r}: a "
                "folder of another model?)",
                file=path,
            )
        arch = config.get("architecture", arch)
        model_args = config.get("model_args", {})
        if not isinstance(model_args, dict):
            raise ModelError("model_args is not an object", file=path, column="model_args")
        args.update(_TIMM_ARCHS.get(arch, {}))
        args.update(dict(spec.timm_args))
        # A class (mlp_layer, act_layer) cannot be stated in JSON: the entry's stands.
        args.update({k: v for k, v in model_args.items() if k not in ("mlp_layer", "act_layer")})
    else:
        args.update(_TIMM_ARCHS.get(arch, {}))
        args.update(dict(spec.timm_args))
    where = path if path.is_file() else folder
    try:
        cfg = timm_config(args)
        published = timm_config({**_TIMM_ARCHS.get(spec.architecture, {}), **dict(spec.timm_args)})
    except ConfigError as exc:
        raise ModelError(exc.message, file=where) from exc
    # Sizes may differ (a reduced or fine-tuned copy); the variant's structure may not: a
    # folder whose config states other registers, position layout or MLP is another model.
    for field in (
        "patch_size",
        "reg_tokens",
        "class_token",
        "no_embed_class",
        "glu",
        "layer_scale",
    ):
        if getattr(cfg, field) != getattr(published, field):
            raise ModelError(
                f"this folder's config.json gives {field}={getattr(cfg, field)!r}; "
                f"{spec.name} has {field}={getattr(published, field)!r} (a folder of another "
                "model?)",
                file=where,
                column=field,
            )
    return cfg, files


def _side(value: Any, what: str, path: Path) -> int:
    """One square side of an image processor's ``size``/``crop_size`` entry."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        if "shortest_edge" in value:
            return int(value["shortest_edge"])
        if "height" in value and value.get("height") == value.get("width"):
            return int(value["height"])
    raise ModelError(f"{what} {value!r} is not a square size", file=path, column=what)


def _published_preprocessing(folder: Path, spec: PathologySpec) -> PathologySpec:
    """The folder's stated preprocessing, where it states one: a timm ``pretrained_cfg``'s
    mean/std, or a transformers ``preprocessor_config.json``'s mean/std, resize
    (``size``) and center crop (``crop_size``); the entry's (the authors') otherwise."""
    mean = std = None
    cfg = folder / "config.json"
    pre = folder / "preprocessor_config.json"
    where = cfg
    if spec.layout == "timm" and cfg.is_file():
        pretrained = read_json(cfg).get("pretrained_cfg") or {}
        mean, std = pretrained.get("mean"), pretrained.get("std")
    elif spec.layout != "timm" and pre.is_file():
        where = pre
        processor = read_json(pre)
        if not isinstance(processor, dict):
            raise ModelError("not a JSON object", file=pre)
        if processor.get("do_normalize", True):
            mean, std = processor.get("image_mean"), processor.get("image_std")
        if processor.get("do_resize", True) and processor.get("size") is not None:
            resize = _side(processor["size"], "size", pre)
            crop = None
            if processor.get("do_center_crop") and processor.get("crop_size") is not None:
                crop = _side(processor["crop_size"], "crop_size", pre)
            if crop is not None and crop > resize:
                raise ModelError(f"crop_size {crop} exceeds size {resize}", file=pre)
            spec = replace(spec, image_size=resize, crop_size=crop)
    if mean is None or std is None:
        return spec
    try:
        mean_t, std_t = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"mean/std are not numbers ({exc})", file=where) from exc
    if len(mean_t) != 3 or len(std_t) != 3:
        raise ModelError("mean/std must have 3 channels", file=where)
    return replace(spec, mean=mean_t, std=std_t)


def load_pathology_vit(folder: str | Path, spec: PathologySpec) -> PathologyViT:
    """Load one published tile encoder from its authors' folder.

    Parameters
    ----------
    folder
        The downloaded model folder (the Hugging Face repository's files).
    spec
        The entry's facts (layout, the authors' arguments and preprocessing).

    Raises
    ------
    ModelError
        A missing folder or file, a config of another layout, weights that do not fit
        (naming the file and tensor), or a weights file that wants to run code.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"{spec.name}: model folder does not exist", file=folder)
    if spec.layout in ("vit", "dinov2"):
        cfg, cfg_path = _hf_config(folder, spec.layout, spec.name)
        weights = find_file(folder, spec.weight_files, spec.name)
        state = hf_to_timm(read_state_dict(weights), cfg.depth, spec.layout, weights)
        files = [cfg_path, weights]
    else:
        cfg, files = _timm_folder_config(folder, spec)
        weights = find_file(folder, spec.weight_files, spec.name)
        # Classifier heads of a fine-tuned checkpoint are not part of the encoder.
        state = read_state_dict(weights)
        files.append(weights)
    spec = _published_preprocessing(folder, spec)
    side = spec.crop_size or spec.image_size
    if side % cfg.patch_size:
        raise ModelError(
            f"input size {side} is not a multiple of patch size {cfg.patch_size}", file=folder
        )
    vit = VisionTransformer(cfg)
    ignore = ("head.", "fc_norm.", "norm_pre.") if spec.layout == "timm" else ()
    # timm writes Identity modules' absence; norm_pre/fc_norm only exist when used, and
    # the published models use neither (a checkpoint that has them is refused below).
    if spec.layout == "timm":
        extra = [k for k in state if k.startswith(("fc_norm.", "norm_pre."))]
        if extra:
            raise ModelError(
                f"weights hold {extra[0]}: pre-norm / fc-norm ViTs are not among the "
                "published pathology encoders (a folder of another model?)",
                file=weights,
            )
    load_weights(vit, state, weights, ignore=ignore)
    return PathologyViT(spec, vit.eval(), folder, folder_hash(files)).eval()


def timm_reference(folder: str | Path, spec: PathologySpec) -> nn.Module:
    """timm's own ``VisionTransformer`` of a timm-format folder, for comparison where
    timm imports (it needs torchvision): the optional back end.

    Raises
    ------
    ConfigError
        When timm does not import (naming the extra).
    """
    timm = require("timm", "timm")
    folder = Path(folder)
    cfg, _ = _timm_folder_config(folder, spec)
    kwargs: dict[str, Any] = dict(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.dim,
        depth=cfg.depth,
        num_heads=cfg.heads,
        mlp_ratio=cfg.mlp_hidden / cfg.dim,
        init_values=1e-5 if cfg.layer_scale else None,
        reg_tokens=cfg.reg_tokens,
        class_token=cfg.class_token,
        no_embed_class=cfg.no_embed_class,
        num_classes=0,
        dynamic_img_size=True,
    )
    if cfg.glu:
        kwargs.update(mlp_layer=timm.layers.SwiGLUPacked, act_layer=nn.SiLU)
    model = timm.models.VisionTransformer(**kwargs)
    weights = find_file(folder, spec.weight_files, spec.name)
    model.load_state_dict(read_state_dict(weights), strict=False)
    return model.eval()


# ---------------------------------------------------------------------------- entries

SPECS: dict[str, PathologySpec] = {
    "phikon": PathologySpec("phikon", "vit"),
    "phikon-v2": PathologySpec("phikon-v2", "dinov2"),
    "uni": PathologySpec(
        "uni",
        "timm",
        architecture="vit_large_patch16_224",
        timm_args=(("img_size", 224), ("patch_size", 16), ("init_values", 1e-5)),
    ),
    "uni2-h": PathologySpec(
        "uni2-h",
        "timm",
        architecture="vit_giant_patch14_224",
        timm_args=(
            ("img_size", 224),
            ("patch_size", 14),
            ("depth", 24),
            ("num_heads", 24),
            ("init_values", 1e-5),
            ("embed_dim", 1536),
            ("mlp_ratio", 2.66667 * 2),
            ("no_embed_class", True),
            ("mlp_layer", "swiglu_packed"),
            ("reg_tokens", 8),
        ),
    ),
    "h-optimus-0": PathologySpec(
        "h-optimus-0",
        "timm",
        mean=HOPTIMUS_MEAN,
        std=HOPTIMUS_STD,
        architecture="vit_giant_patch14_reg4_dinov2",
        timm_args=(("img_size", 224), ("init_values", 1e-5)),
        weight_files=(*WEIGHT_FILES, "checkpoint.pth"),
    ),
    "virchow2": PathologySpec(
        "virchow2",
        "timm",
        pooling="cls+mean",
        # One output width per encoder: the CLS-only vector is the first 1280 columns.
        poolings=("cls+mean",),
        architecture="vit_huge_patch14_224",
        timm_args=(
            ("img_size", 224),
            ("init_values", 1e-5),
            ("reg_tokens", 4),
            ("mlp_ratio", 5.3375),
            ("mlp_layer", "swiglu_packed"),
        ),
    ),
}


def _loader(name: str):
    def load(path: Path) -> PathologyViT:
        return load_pathology_vit(path, SPECS[name])

    load.__name__ = f"load_{name.replace('-', '_')}"
    return load


_TILE = "tiles resized to 224x224 (antialiased bilinear), then"
_HF_NOTE = "https://huggingface.co/"

register_entry(
    EncoderEntry(
        name="phikon",
        modality="pathology",
        architecture="ViT-B/16 (transformers ViTModel, iBOT), 224 px, 12 layers, 768 wide",
        files=("config.json", "model.safetensors|pytorch_model.bin"),
        preprocessing=f"{_TILE} ImageNet mean/std; a preprocessor_config.json's size, "
        "crop and mean/std when the folder has one",
        pooling="cls (last_hidden_state[:, 0])",
        dim=768,
        licence="Owkin non-commercial licence (non-profit research only)",
        gated=False,
        source=_HF_NOTE + "owkin/phikon",
        citation="Filiot et al. 2023, Scaling self-supervised learning for histopathology "
        "with masked image modeling (medRxiv 2023.07.21.23292757)",
        loader=_loader("phikon"),
    )
)
register_entry(
    EncoderEntry(
        name="phikon-v2",
        modality="pathology",
        architecture="ViT-L/16 (transformers Dinov2Model, layer scale), 224 px, 24 layers, "
        "1024 wide",
        files=("config.json", "model.safetensors|pytorch_model.bin"),
        preprocessing=f"{_TILE} ImageNet mean/std; a preprocessor_config.json's size, "
        "crop and mean/std when the folder has one",
        pooling="cls (last_hidden_state[:, 0])",
        dim=1024,
        licence="Owkin non-commercial licence (non-profit research only)",
        gated=False,
        source=_HF_NOTE + "owkin/phikon-v2",
        citation="Filiot et al. 2024, Phikon-v2, a large and public feature extractor for "
        "biomarker prediction (arXiv:2409.09173)",
        loader=_loader("phikon-v2"),
    )
)
register_entry(
    EncoderEntry(
        name="uni",
        modality="pathology",
        architecture="timm vit_large_patch16_224 (ViT-L/16, layer scale 1e-5), 224 px",
        files=("config.json", "pytorch_model.bin|model.safetensors"),
        preprocessing=f"{_TILE} ImageNet mean/std",
        pooling="cls (timm global_pool='token')",
        dim=1024,
        licence="CC-BY-NC-ND 4.0 (academic research only)",
        gated=True,
        source=_HF_NOTE + "MahmoodLab/UNI (access request)",
        citation="Chen et al. 2024, Towards a general-purpose foundation model for "
        "computational pathology, Nature Medicine",
        loader=_loader("uni"),
    )
)
register_entry(
    EncoderEntry(
        name="uni2-h",
        modality="pathology",
        architecture="timm ViT-H/14: 24 layers, 1536 wide, 24 heads, 8 registers, packed "
        "SwiGLU (fc1 8192), layer scale, no_embed_class, 224 px",
        files=("config.json", "pytorch_model.bin|model.safetensors"),
        preprocessing=f"{_TILE} ImageNet mean/std",
        pooling="cls (timm global_pool='token')",
        dim=1536,
        licence="CC-BY-NC-ND 4.0 (academic research only)",
        gated=True,
        source=_HF_NOTE + "MahmoodLab/UNI2-h (access request)",
        citation="Chen et al. 2024, Nature Medicine (UNI; UNI2-h released 2025)",
        loader=_loader("uni2-h"),
    )
)
register_entry(
    EncoderEntry(
        name="h-optimus-0",
        modality="pathology",
        architecture="timm vit_giant_patch14_reg4_dinov2 (ViT-g/14: 40 layers, 1536 wide, "
        "4 registers, packed SwiGLU, layer scale), 224 px",
        files=("config.json", "pytorch_model.bin|model.safetensors|checkpoint.pth"),
        preprocessing=f"{_TILE} mean (0.707223, 0.578729, 0.703617), "
        "std (0.211883, 0.230117, 0.177517); tiles at 0.5 µm/px",
        pooling="cls (timm global_pool='token')",
        dim=1536,
        licence="Apache-2.0",
        gated=False,
        source=_HF_NOTE + "bioptimus/H-optimus-0 (or bioptimus' checkpoint.pth)",
        citation="Saillard et al. 2024, H-optimus-0 (github.com/bioptimus/releases)",
        loader=_loader("h-optimus-0"),
    )
)
register_entry(
    EncoderEntry(
        name="virchow2",
        modality="pathology",
        architecture="timm vit_huge_patch14_224 (ViT-H/14: 32 layers, 1280 wide, 4 "
        "registers, packed SwiGLU mlp_ratio 5.3375, layer scale), 224 px",
        files=("config.json", "pytorch_model.bin|model.safetensors"),
        preprocessing=f"{_TILE} ImageNet mean/std (the authors resize bicubically)",
        pooling="cls+mean: class token ⊕ mean of patch tokens (registers excluded)",
        dim=2560,
        licence="CC-BY-NC-ND 4.0 (non-commercial research only)",
        gated=True,
        source=_HF_NOTE + "paige-ai/Virchow2 (access request)",
        citation="Zimmermann et al. 2024, Virchow2: scaling self-supervised mixed "
        "magnification models in pathology (arXiv:2408.00738)",
        loader=_loader("virchow2"),
    )
)
