"""Tiles → patch tokens for the core backbone, and H&E augmentations.

A tile of ``image_size`` pixels is cut into non-overlapping ``patch_size`` patches in
raster order; each patch (``patch_size² · 3`` normalized pixel values) is one token,
given to the backbone through its continuous ``inputs`` path (a linear patch embedder,
as in ViT). A ``[CLS]`` token goes in front. Token ids are ``CLS`` then ``PATCH_ID``, so
the token table only tells the model "this is a patch"; positions come from the
backbone's rotary encoding over the raster index (``1 + row · grid + col``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from healthfm.errors import ConfigError
from healthfm.tokenizer import CLS_ID, N_SPECIAL, Tokenizer, register_tokenizer

#: Token id of an image patch (the first id after the shared specials).
PATCH_ID = N_SPECIAL
#: ImageNet normalization, the convention of pathology ViTs (UNI, Phikon, Virchow).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@register_tokenizer
class PatchTokenizer(Tokenizer):
    """Cuts RGB tiles into patch tokens.

    Parameters
    ----------
    image_size
        Tiles are resized to this side (pixels) before patching.
    patch_size
        Patch side; must divide ``image_size``.
    mean, std
        Per-channel normalization of pixel values in [0, 1].
    """

    type: ClassVar[str] = "pathology.patches"
    modality: ClassVar[str] = "pathology"

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        if patch_size < 1 or image_size % patch_size:
            raise ConfigError(f"patch size {patch_size} must divide the image size {image_size}")
        self.image_size = int(image_size)
        self.patch_size = int(patch_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    @property
    def vocab_size(self) -> int:
        return N_SPECIAL + 1

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def n_tokens(self) -> int:
        """Tokens per tile (patches + CLS)."""
        return self.grid**2 + 1

    @property
    def input_dim(self) -> int:
        """Values per patch token."""
        return self.patch_size**2 * 3

    def config(self) -> dict[str, Any]:
        return {
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> PatchTokenizer:
        return cls(
            config["image_size"], config["patch_size"], tuple(config["mean"]), tuple(config["std"])
        )

    def to_float(self, tiles: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, H, W, 3)`` → float ``(B, 3, S, S)`` in [0, 1], resized to ``image_size``."""
        x = tiles.permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(
                x,
                size=(self.image_size, self.image_size),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            ).clamp_(0.0, 1.0)
        return x

    def encode_images(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Float ``(B, 3, S, S)`` images in [0, 1] → a backbone batch.

        Returns ``ids`` (B, T) = CLS, PATCH…, ``attention_mask`` (all True) and
        ``inputs`` (B, T, patch²·3) with zeros at the CLS position.
        """
        b, c, h, w = images.shape
        p = self.patch_size
        gh, gw = h // p, w // p
        n = gh * gw
        # One strided copy of the pixels into the patch rows (as patchify orders them),
        # then normalisation in place; no full-size temporaries (3x faster than
        # normalise -> patchify -> concatenate).
        inputs = images.new_empty(b, n + 1, p * p * c)
        inputs[:, 0] = 0
        inputs[:, 1:].view(b, gh, gw, p, p, c).copy_(
            images[:, :, : gh * p, : gw * p].reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1)
        )
        pixels = inputs[:, 1:].view(b, n, p * p, c)  # the channel is a patch vector's last axis
        pixels.sub_(torch.tensor(self.mean, dtype=images.dtype))
        pixels.div_(torch.tensor(self.std, dtype=images.dtype))
        ids = torch.full((b, n + 1), PATCH_ID, dtype=torch.long)
        ids[:, 0] = CLS_ID
        return {
            "ids": ids,
            "attention_mask": torch.ones(b, n + 1, dtype=torch.bool),
            "inputs": inputs,
        }

    def encode_tiles(self, tiles: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 ``(B, H, W, 3)`` tiles → a backbone batch (no augmentation)."""
        return self.encode_images(self.to_float(tiles))


@register_tokenizer
class CroppedPatchTokenizer(PatchTokenizer):
    """Tiles resized to ``image_size``, center-cropped to ``crop_size``, then cut into
    patches: a transformers image processor's ``size`` + ``crop_size`` (DINOv2's
    ``BitImageProcessor`` resizes to 256 and crops 224).

    ``image_size`` is the size tiles are decoded at (what the tile source reads);
    patches, tokens and the grid are those of the crop.
    """

    type: ClassVar[str] = "pathology.patches_cropped"

    def __init__(
        self,
        image_size: int,
        crop_size: int,
        patch_size: int,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        if not 0 < crop_size <= image_size:
            raise ConfigError(f"crop {crop_size} must be within the resized tile {image_size}")
        super().__init__(crop_size, patch_size, mean, std)
        self.crop_size = int(crop_size)
        self.image_size = int(image_size)

    @property
    def grid(self) -> int:
        return self.crop_size // self.patch_size

    def config(self) -> dict[str, Any]:
        return {**super().config(), "crop_size": self.crop_size}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> CroppedPatchTokenizer:
        return cls(
            config["image_size"],
            config["crop_size"],
            config["patch_size"],
            tuple(config["mean"]),
            tuple(config["std"]),
        )

    def encode_images(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Center-crop (offset ``round((size - crop) / 2)``, torchvision's), then
        normalise and patch."""
        h, w = images.shape[-2:]
        top, left = round((h - self.crop_size) / 2), round((w - self.crop_size) / 2)
        crop = images[..., top : top + self.crop_size, left : left + self.crop_size]
        return super().encode_images(crop.contiguous())


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """``(B, C, S, S)`` → ``(B, (S/p)², p·p·C)`` in raster order (row-major patches)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: torch.Tensor, patch: int, channels: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    b, n, _ = patches.shape
    g = round(n**0.5)
    x = patches.reshape(b, g, g, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, g * patch, g * patch)


def resize_batch(tiles: torch.Tensor, size: int) -> torch.Tensor:
    """Resize uint8 ``(B, H, W, 3)`` tiles to ``size`` (antialiased bilinear), staying uint8."""
    x = tiles.permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


# ------------------------------------------------------------------------ augmentation

# Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin, DAB), as in scikit-image.
_RGB_FROM_HED = torch.tensor(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64
)
_RGB_FROM_HED = _RGB_FROM_HED / _RGB_FROM_HED.norm(dim=1, keepdim=True)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)


def hed_jitter(
    images: torch.Tensor, generator: torch.Generator, sigma: float = 0.05, bias: float = 0.05
) -> torch.Tensor:
    """Perturb haematoxylin / eosin / DAB concentrations per image (Tellez et al. 2018).

    Optical density ``OD = -log(I)`` is unmixed into stain concentrations, each scaled
    by ``U(1 - sigma, 1 + sigma)`` and shifted by ``U(-bias, bias)``, then mixed back.
    """
    b = images.shape[0]
    dtype = images.dtype
    od = -torch.log(images.clamp(min=1.0 / 255.0)).permute(0, 2, 3, 1)  # B,H,W,3
    stains = od @ _HED_FROM_RGB.to(dtype)
    alpha = 1 + (torch.rand(b, 1, 1, 3, generator=generator, dtype=dtype) * 2 - 1) * sigma
    beta = (torch.rand(b, 1, 1, 3, generator=generator, dtype=dtype) * 2 - 1) * bias
    od = (stains * alpha + beta) @ _RGB_FROM_HED.to(dtype)
    return torch.exp(-od).clamp(0.0, 1.0).permute(0, 3, 1, 2).contiguous()


def augment_images(
    images: torch.Tensor,
    generator: torch.Generator,
    hed: float = 0.05,
    brightness: float = 0.1,
    contrast: float = 0.1,
) -> torch.Tensor:
    """H&E augmentations, all drawn from ``generator`` (exactly reproducible).

    Random horizontal / vertical flips and 90° rotations (tissue has no orientation),
    HED stain jitter, and brightness / contrast jitter, per image, vectorized over the
    batch (each of the 8 dihedral transforms is applied to its images at once).
    """
    b = images.shape[0]
    flip = torch.rand(b, generator=generator) < 0.5
    rot = torch.randint(0, 4, (b,), generator=generator)
    out = images.clone()
    out[flip] = out[flip].flip(-1)
    for k in range(1, 4):
        sel = rot == k
        if sel.any():
            out[sel] = torch.rot90(out[sel], k, dims=(-2, -1))
    if hed > 0:
        out = hed_jitter(out, generator, sigma=hed, bias=hed)
    if brightness <= 0 and contrast <= 0:
        return out
    bright = 1 + (torch.rand(b, 1, 1, 1, generator=generator) * 2 - 1) * brightness
    cont = 1 + (torch.rand(b, 1, 1, 1, generator=generator) * 2 - 1) * contrast
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    return ((out - mean) * cont + mean * bright).clamp_(0.0, 1.0)


def tiles_fingerprint(tokenizer: PatchTokenizer, extra: dict[str, Any]) -> str:
    """A fingerprint of the tile encoding and the data, for checkpoints."""
    from healthfm.fsutil import json_hash

    return json_hash({"tokenizer": tokenizer.hash, **extra})


def as_uint8_tiles(array: np.ndarray) -> torch.Tensor:
    """A uint8 numpy ``(B, H, W, 3)`` array as a tensor (no copy when contiguous)."""
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.uint8))
