"""TASN: Trilinear Attention Sampling Network, in pure, batched PyTorch.

Heliang Zheng, Jianlong Fu, Zheng-Jun Zha, Jiebo Luo. "Looking for the Devil in the Details:
Learning Trilinear Attention Sampling Network for Fine-grained Image Recognition". CVPR 2019,
arXiv:1903.06150. Official code: github.com/researchmm/tasn (MXNet, custom sampler op).

The file follows the paper (and ``spec/tasn.md``) top to bottom:

1. Sec. 3.1, trilinear attention (spec §1). A ResNet-18 with layer2's and layer4's strides
   removed (stride 8: 28 x 28 x 512 at 224 input) plus two multi-dilation 3x3 conv blocks
   (:class:`AttentionNet`, its own fc and CE) gives ``X`` (c x hw);
   ``M(X) = N2(N1(X) X^T) X`` (:func:`trilinear_attention`) gives c part maps. The
   structure-preserved map averages them (:func:`structure_map`), the detail-preserved map is
   one random map per image in training (:func:`detail_map`). Maps carry no gradient.
2. Sec. 3.2, attention-based sampler (spec §2): max-marginals (:func:`max_marginals`),
   zoom-bounded densities with one clipping threshold for x and y
   (:func:`zoom_bounded_densities`), inverse CDF
   (:func:`inverse_cdf`), a separable grid (:func:`attention_grid`) and bilinear sampling
   (:func:`attention_sample`). Vectorised over the batch; differentiable w.r.t. the image.
3. Sec. 3.3, part-net / master-net / distiller (spec §3): one ResNet-50 on
   ``[I_detail; I_structure]``, heads ``fc_part``, ``fc_master`` and a shared ``fc``; CE on
   every head (0.5 each), attention-net CE (1.0), soft-CE distillation T = 10 from the
   part-net (teacher) to the master-net (student) (:class:`TASN`).

**Coordinate convention (sampler).** Pixel ``k`` of an axis of length ``n`` covers the
continuous interval ``[k, k + 1)``; its centre is ``k + 0.5``. A density ``d`` (``n`` values,
summing to the output length ``m``) says how many output pixels each input pixel receives; its
cumulative sum ``F`` is piecewise linear with ``F(0) = 0``, ``F(n) = m``. Output pixel ``i``
(centre ``i + 0.5``) samples the input at ``x_i = F^{-1}(i + 0.5)``, linearly interpolated
inside the bin. ``F.grid_sample(align_corners=False)`` uses the same convention
(``g = 2 x / n - 1``: -1 and +1 are the outer edges of the border pixels), so a uniform map
reproduces ``F.interpolate(mode="bilinear", align_corners=False, antialias=False)`` exactly
(``padding_mode="border"`` matches its clamping at the edges). The official op
(``att_sampler-inl.h``) differs in its index math, which we do not copy: output ``i`` samples
where its cumulative sum reaches ``i * step`` (the left edge of the output pixel), nodes sit at
pixel centres (``align_corners=True`` units), the cumulative-sum buffer starts at 1 instead of
``d_0`` (it is created filled with ones and element 0 is never written) and ``i = 0`` reads one
element before the buffer. Together these put its samples 0.5 to about 2 output pixels from
ours (measured against a port of the op in ``tests/models/test_tasn.py``); the densities, hence
the zoom, are the same.

**Readings taken where the paper is silent (official code followed unless said otherwise).**

- N1's scale: ``X`` is multiplied by 7 before N1 (official; ``attention_scale``).
- Distinct maps (``distinct_maps=True``, the detail draw only): channels whose ``X`` rows
  are all zero give bit-identical maps. The training detail map draws uniformly among the
  groups of maps with exactly equal sums (official ``detail_att``: ``argsort`` of the sums,
  ``!=`` between neighbours). At test the detail map is the plain average of all maps
  (official: their sum).
- The structure map is the average of **all** c maps (paper Sec. 3.1; spec §1), in training
  and at test, not an average of one map per group of equal sums (docs/tasn.md): exact
  equality is not continuous: maps of near-zero channels differ from each other by
  1e-9 to 1e-6 (relative), so whether two of them tie depends on the float summation order,
  which changes with the batch size; a trained demo checkpoint gave logits differing by up to
  0.255 between batch 16 and batch 1, and its ONNX export failed parity. The official
  ``structure_att`` builds its 0/1 mask in sorted order and applies it in channel order: when
  all sums differ it is the sum of all maps (the same samples as our average: the sampler
  normalises the scale away); when sums tie it drops the channels whose index equals a tied
  sorted position, not the duplicates. Neither reading of the mask is continuous, so we take
  the paper's average of all maps.
- The structure map is upsampled to the image, then squared (official; "a larger value for
  important regions"); ``square_structure=False`` gives the paper's plain average. The detail
  map is not squared.
- Resizes use bilinear ``align_corners=False`` without antialiasing: the image to
  ``attention_size`` for the attention net, and the maps to the image size before the
  max-marginals. **Deviation**: the official ``BilinearResize2D`` is ``align_corners=True``
  (source = dst * (in - 1) / (out - 1)). For a 28 x 28 map upsampled to 512 the two put the
  sampling grid up to 8 px apart (1.2 px on average, random maps).
- Zoom bound (``clip="coupled"``, official): each of ``clip_iterations`` passes clips both
  marginal densities at ONE threshold, ``min(max_zoom, max_x, max_y)`` on the first pass
  (``max_zoom`` times the uniform density) and ``min(max_x, max_y)`` on the later ones, and
  spreads the clipped mass evenly. This keeps the zoom about equal on x and y (a 512 image
  with a part 10x longer than wide: 2.41 / 2.41), and the peak may end above ``max_zoom`` by
  the spread mass (4.25 for a round part). ``clip="per_axis"`` clips each axis at
  ``max_zoom`` on every pass, converging to it (2.41 / 4.00 on that part).
- Half-precision images are sampled in fp32 and returned in their dtype: a bf16 grid cannot
  address a 256-pixel axis to within a pixel and gave NaN on CPU.
- The attention net is a timm ResNet (post-activation, torchvision key names, so ImageNet
  ``resnet18`` files load into ``attention.body``); the official uses MXNet's pre-activation
  ResNet. Dilated convs: Kaiming-normal init, zero bias.
- Losses are means over the batch. The official symbols sum over the batch
  (``SoftmaxOutput`` with ``normalization="null"``, ``make_loss``), but ``mx.mod.Module``
  sets the optimizer's default ``rescale_grad = 1 / batch_size`` (96, all GPUs), so the
  gradient it applies is that of the batch mean: the same loss, and lr 0.1 means the same
  step. In eval mode with targets only the returned logits' CE is computed.
- Training ``logits`` (for accuracy logging) are the test-time ones: shared ``fc`` on the
  structure stream (official ``master_net_aux``, 87.0 on CUB); ``test_head="master"`` uses
  ``fc_master``. ``embedding`` is the L2-normalised pooled structure feature.
"""

from __future__ import annotations

import logging
from typing import Literal, Sequence, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..losses.distillation import soft_cross_entropy_distillation
from .backbone import create_backbone
from .explain import AttentionMap, check_pair
from .registry import FinegrainModel, build, register_model
from ..choices import check_choice

SamplerMap = Literal["attention", "uniform"]
"""``sampler_map``: the map the sampler zooms by (``uniform``: the no-zoom control)."""

TestHead = Literal["shared", "master"]
"""``test_head``: the head of the test logits."""

log = logging.getLogger("finegrain")

__all__ = ["AttentionNet", "TASN", "attention_grid", "attention_sample", "detail_map",
           "distinct_maps_mask", "inverse_cdf", "max_marginals", "structure_map",
           "trilinear_attention", "zoom_bounded_densities", "zoom_bounded_density"]


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


# ---------------------------------------------------------------------------------------------
# 1. Attention network and trilinear attention (paper Sec. 3.1, spec §1)
# ---------------------------------------------------------------------------------------------

def _remove_stride(block: nn.Module) -> None:
    """Turn the first block of a ResNet stage from stride 2 into stride 1 (same weights)."""
    for name, m in block.named_modules():
        if isinstance(m, nn.Conv2d) and tuple(m.stride) != (1, 1):
            m.stride = (1, 1)
        elif isinstance(m, (nn.AvgPool2d, nn.MaxPool2d)):  # 'avg_down' ResNet variants
            parent = block.get_submodule(name.rsplit(".", 1)[0]) if "." in name else block
            setattr(parent, name.rsplit(".", 1)[-1], nn.Identity())


class AttentionNet(nn.Module):
    """ResNet-18 at stride 8 + multi-dilation convs: the feature map ``X`` and its own logits.

    Official ``attention_net``: layer2's and layer4's strides removed (28 x 28 x 512 at 224
    input), then ``conv1`` (3x3, shared weights, dilations 1, 2; ReLU each; summed) and
    ``conv2`` (3x3, shared weights, dilations 1, 2, 3; ReLU each; summed). ``X`` is conv2's
    output; the classifier adds BN, ReLU, global average pooling and an fc.

    Args:
        backbone: timm ResNet name (``resnet18``).
        num_classes: classes of its classification head.
        backbone_kwargs: extra timm ``create_model`` arguments (``channels`` ... for tiny
            models).
    """

    def __init__(self, backbone: str = "resnet18", num_classes: int = 1000,
                 backbone_kwargs: dict | None = None):
        super().__init__()
        self.body, _ = create_backbone(backbone, **(backbone_kwargs or {}))
        for stage in ("layer2", "layer4"):
            if not hasattr(self.body, stage):
                raise ValueError(f"attention backbone {backbone!r} is not a timm ResNet "
                                 f"(no {stage}); use resnet18 / resnet34 / resnet50 ...")
            _remove_stride(getattr(self.body, stage)[0])
        c = self.body.num_features
        self.conv1 = nn.Conv2d(c, c, 3)  # applied with dilations 1, 2 (shared weights)
        self.conv2 = nn.Conv2d(c, c, 3)  # applied with dilations 1, 2, 3 (shared weights)
        for conv in (self.conv1, self.conv2):
            nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        self.bn = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, num_classes)
        self.num_features = c

    @staticmethod
    def _multi_dilation(x: torch.Tensor, conv: nn.Conv2d, dilations: Sequence[int]) -> torch.Tensor:
        """``sum_d relu(conv_d(x))`` with one weight shared by every dilation ``d``."""
        return sum(F.relu(F.conv2d(x, conv.weight, conv.bias, padding=d, dilation=d))
                   for d in dilations)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``X`` (B, c, h, w) at stride 8 and the logits (B, num_classes)."""
        x = self.body.forward_features(images)  # (B, c, H/8, W/8)
        x = self._multi_dilation(x, self.conv1, (1, 2))
        x = self._multi_dilation(x, self.conv2, (1, 2, 3))  # X, (B, c, h, w)
        logits = self.fc(F.relu(self.bn(x)).mean((2, 3)))
        return x, logits


def trilinear_attention(features: torch.Tensor, scale: float = 7.0) -> torch.Tensor:
    """Trilinear attention ``M(X) = N2(N1(X) X^T) X`` (paper Sec. 3.1, spec §1).

    ``X`` is ``features`` reshaped to (c, hw). N1 is a softmax over the hw positions of each
    channel of ``scale * X``; N2 a softmax over the channels of each row of the (c, c)
    matrix ``N1(X) X^T``; the final product uses the un-normalised ``X``. Each of the c output
    rows is a convex combination of the feature channels: one part proposal. Computed in fp32.

    Args:
        features: (B, c, h, w) feature maps.
        scale: factor on ``X`` before N1 (official: 7).

    Returns:
        (B, c, h, w) attention maps.
    """
    B, c, h, w = features.shape
    x = features.float().reshape(B, c, h * w)  # X, (B, c, hw)
    n1 = F.softmax(scale * x, dim=-1)  # N1(X): softmax over positions, (B, c, hw)
    n2 = F.softmax(n1 @ x.transpose(1, 2), dim=-1)  # N2(N1(X) X^T): over channels, (B, c, c)
    return (n2 @ x).reshape(B, c, h, w)  # M(X), (B, c, h, w)


def distinct_maps_mask(maps: torch.Tensor) -> torch.Tensor:
    """One ``True`` per group of maps with exactly equal sums (official ``detail_att``:
    ``np.argsort`` of the sums, a new group wherever a sorted sum ``!=`` its predecessor):
    duplicates, e.g. the maps of all-zero feature channels, count once. Equality is exact (a
    map differing by one ulp is its own group), so groups cannot chain.

    Args:
        maps: (B, c, h, w) attention maps.

    Returns:
        (B, c) bool mask, at least one ``True`` per image (the first channel of each group in
        a stable sort).
    """
    sums = maps.float().sum((2, 3))  # (B, c)
    sorted_sums, order = sums.sort(dim=1, stable=True)
    first = torch.ones_like(sorted_sums, dtype=torch.bool)  # first of each group, sorted order
    first[:, 1:] = sorted_sums[:, 1:] != sorted_sums[:, :-1]
    return torch.zeros_like(first).scatter(1, order, first)  # back to channel order


def structure_map(maps: torch.Tensor) -> torch.Tensor:
    """Structure-preserved map: the average of all c maps, (B, c, h, w) -> (B, h, w) (paper
    Sec. 3.1). The squaring is applied by the caller after upsampling (official). A continuous
    function of the maps, so the output does not depend on the batch it is computed in."""
    return maps.mean(1)


def detail_map(maps: torch.Tensor, distinct: bool = True,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Detail-preserved map for training: one map per image drawn uniformly (among the
    distinct ones if ``distinct``), (B, c, h, w) -> (B, h, w).

    Args:
        maps: (B, c, h, w) attention maps.
        distinct: draw among distinct maps only (official).
        generator: random generator (global RNG when None); must live on ``maps.device``.
    """
    B, c, h, w = maps.shape
    weights = distinct_maps_mask(maps).float() if distinct else maps.new_ones(B, c).float()
    idx = torch.multinomial(weights, 1, generator=generator)  # (B, 1) channel per image
    return maps.gather(1, idx[:, :, None, None].expand(B, 1, h, w))[:, 0]


# ---------------------------------------------------------------------------------------------
# 2. Attention-based sampler (paper Sec. 3.2, spec §2)
# ---------------------------------------------------------------------------------------------

def max_marginals(attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Max-marginals of a map (step 1): each column's max over the rows and each row's max
    over the columns.

    Args:
        attention: (B, H, W) map.

    Returns:
        ``(columns, rows)``: (B, W) and (B, H) profiles.
    """
    return attention.amax(1), attention.amax(2)


ClipRule = Literal["coupled", "per_axis"]
"""``clip``: how the zoom bound is applied to the two marginals."""

CLIP_RULES = get_args(ClipRule)


def _check_clip(max_zoom: float, clip: str) -> None:
    if max_zoom < 1:
        raise ValueError(f"max_zoom must be >= 1 (relative to the uniform density), got {max_zoom}")
    check_choice("clip", clip, ClipRule)


def _relative_density(profile: torch.Tensor) -> torch.Tensor:
    """A non-negative (B, n) profile scaled to mean 1 (the uniform density is 1); a profile
    summing to 0 becomes uniform. fp32."""
    p = profile.float().clamp_min(0)
    n = p.shape[-1]
    total = p.sum(-1, keepdim=True)  # (B, 1)
    return torch.where(total > 0, p * (n / total.clamp_min(torch.finfo(p.dtype).tiny)),
                       torch.ones_like(p))


def zoom_bounded_densities(profiles: Sequence[torch.Tensor], out_lens: Sequence[int],
                           max_zoom: float = 4.0, iterations: int = 5,
                           clip: ClipRule = "coupled") -> list[torch.Tensor]:
    """Normalise the marginals of one map into sampling densities with a bounded zoom (step 2).

    Each profile (length ``n``) is scaled to sum to its output length ``m`` (output pixels per
    input pixel; the uniform resize has density ``m / n``). Work in zoom units
    ``z = d n / m`` (1 = uniform). Each of ``iterations`` passes clips every ``z`` at a
    threshold ``t`` and spreads the clipped mass evenly, ``z += 1 - mean(z)``, so every pixel
    keeps a minimum density:

    - ``clip="coupled"`` (official ``AttSampler``): ONE threshold for all axes,
      ``t = min(max_zoom, max z_x, max z_y)`` on the first pass and ``t = min(max z_x, max z_y)``
      on the later ones, which pulls the peak zoom of the axes together (a narrow, elongated
      part is not magnified more across than along it). The later passes do not re-apply
      ``max_zoom``: the peak may end above it by the spread mass.
    - ``clip="per_axis"``: ``t = max_zoom`` on every pass and each axis on its own; the peak
      converges to ``max_zoom`` (each pass leaves at most a quarter of the excess at 4x).

    The official op is square-only and compares densities in output pixels per input pixel;
    for non-square sizes the axes are coupled in zoom units (relative to their own uniform
    density), which is the same thing when ``n`` and ``m`` match across axes. fp32.

    Args:
        profiles: (B, n_a) non-negative marginals, one per axis (x then y by convention).
        out_lens: output length m_a of each axis; result ``a`` sums to ``out_lens[a]``.
        max_zoom: zoom cap relative to the uniform density (official ``dense``: 4); >= 1.
        iterations: clipping passes (official: 5); 0 disables the cap.
        clip: ``"coupled"`` (official) or ``"per_axis"``.

    Returns:
        list of (B, n_a) densities, in the order of ``profiles``.
    """
    _check_clip(max_zoom, clip)
    zs = [_relative_density(p) for p in profiles]
    for j in range(iterations):  # a loop over passes; every image and axis at once
        if clip == "coupled":
            t = torch.stack([z.amax(-1) for z in zs]).amin(0)[:, None]  # (B, 1): min_a max z_a
            if j == 0:
                t = t.clamp(max=max_zoom)
            zs = [torch.minimum(z, t) for z in zs]
        else:
            zs = [z.clamp(max=max_zoom) for z in zs]
        zs = [z + (1.0 - z.mean(-1, keepdim=True)) for z in zs]  # spread the clipped mass
    return [z * (m / z.shape[-1]) for z, m in zip(zs, out_lens)]


def zoom_bounded_density(profile: torch.Tensor, out_len: int, max_zoom: float = 4.0,
                         iterations: int = 5) -> torch.Tensor:
    """One axis on its own (``clip="per_axis"`` of :func:`zoom_bounded_densities`): each pass
    clips at ``max_zoom * out_len / n`` and spreads the clipped mass evenly over the ``n``
    pixels. (B, n) -> (B, n) density summing to ``out_len``. A profile summing to 0 becomes
    uniform."""
    return zoom_bounded_densities([profile], [out_len], max_zoom, iterations, "per_axis")[0]


def inverse_cdf(density: torch.Tensor, out_len: int) -> torch.Tensor:
    """Output pixel centres -> input coordinates through the inverse CDF (step 3).

    With ``C_k = sum_{j<k} d_j``, output pixel ``i`` (centre ``u = i + 0.5``) falls in the bin
    ``k`` with ``C_k <= u < C_{k+1}`` and samples ``x = k + (u - C_k) / d_k`` (linear inside
    the bin), returned in ``grid_sample(align_corners=False)`` units ``2 x / n - 1``.

    Args:
        density: (B, n) density summing to ``out_len``.
        out_len: number of output pixels m.

    Returns:
        (B, m) strictly increasing coordinates in [-1, 1].
    """
    B, n = density.shape
    d = density.float()
    cdf = F.pad(d.cumsum(-1), (1, 0))  # C, (B, n + 1), C_0 = 0, C_n = out_len
    u = (torch.arange(out_len, device=d.device, dtype=d.dtype) + 0.5).expand(B, out_len)
    k = (torch.searchsorted(cdf, u.contiguous(), right=True) - 1).clamp(0, n - 1)  # (B, m)
    frac = (u - cdf.gather(1, k)) / d.gather(1, k).clamp_min(1e-12)
    x = k + frac.clamp(0, 1)  # continuous input coordinate, pixel k covers [k, k + 1)
    return x * (2.0 / n) - 1.0


def attention_grid(attention: torch.Tensor, img_size: int | Sequence[int],
                   out_size: int | Sequence[int], max_zoom: float = 4.0,
                   iterations: int = 5, clip: ClipRule = "coupled") -> torch.Tensor:
    """The separable sampling grid of an attention map (steps 1 to 3), no gradient, fp32.

    Args:
        attention: (B, h, w) non-negative map, bilinearly upsampled to ``img_size`` first
            if its size differs.
        img_size: (H, W) of the image to sample (or an int).
        out_size: (h_out, w_out) of the sampled image (or an int).
        max_zoom: zoom cap relative to the uniform resize (first pass when coupled).
        iterations: clipping passes.
        clip: ``"coupled"`` (official: one threshold for x and y) or ``"per_axis"``; see
            :func:`zoom_bounded_densities`.

    Returns:
        (B, h_out, w_out, 2) fp32 grid for ``F.grid_sample(align_corners=False)``:
        ``[..., 0]`` is x (depends on the column only), ``[..., 1]`` is y (on the row only).
    """
    _check_clip(max_zoom, clip)
    H, W = _pair(img_size)
    out_h, out_w = _pair(out_size)
    with torch.no_grad(), torch.autocast(attention.device.type, enabled=False):
        a = attention.detach().float()
        B = a.shape[0]
        if a.shape[-2:] != (H, W):
            a = F.interpolate(a[:, None], size=(H, W), mode="bilinear",
                              align_corners=False)[:, 0]  # (B, H, W)
        columns, rows = max_marginals(a)  # (B, W), (B, H)
        dx, dy = zoom_bounded_densities([columns, rows], [out_w, out_h], max_zoom,
                                        iterations, clip)
        gx, gy = inverse_cdf(dx, out_w), inverse_cdf(dy, out_h)  # (B, out_w), (B, out_h)
        return torch.stack([gx[:, None, :].expand(B, out_h, out_w),
                            gy[:, :, None].expand(B, out_h, out_w)], dim=-1)


def attention_sample(images: torch.Tensor, attention: torch.Tensor,
                     out_size: int | Sequence[int], max_zoom: float = 4.0,
                     iterations: int = 5, clip: ClipRule = "coupled") -> torch.Tensor:
    """Attention-based non-uniform sampling (paper Sec. 3.2, spec §2).

    Regions with high attention are magnified (about ``max_zoom`` times the uniform resize at
    most) while the whole image stays in view. Batched; no loop over images or pixels; the
    result is differentiable w.r.t. ``images`` and carries no gradient into ``attention``. A
    uniform map gives exactly ``F.interpolate(images, out_size, mode="bilinear",
    align_corners=False)`` (see the module docstring for the coordinate convention).
    Half-precision images are sampled in fp32 (a bf16 grid cannot address a 256-pixel axis
    to within a pixel) and returned in their own dtype.

    Args:
        images: (B, C, H, W) images (any float dtype).
        attention: (B, h, w) non-negative attention map (any resolution).
        out_size: int or (h_out, w_out) of the sampled images.
        max_zoom: zoom cap relative to the uniform resize (official: 4).
        iterations: clipping passes (official: 5).
        clip: ``"coupled"`` (official, default) or ``"per_axis"``; see
            :func:`zoom_bounded_densities`.

    Returns:
        (B, C, h_out, w_out) sampled images, dtype of ``images``.
    """
    if images.ndim != 4 or attention.ndim != 3 or images.shape[0] != attention.shape[0]:
        raise ValueError(f"expected images (B, C, H, W) and attention (B, h, w); got "
                         f"{tuple(images.shape)} and {tuple(attention.shape)}")
    grid = attention_grid(attention, images.shape[-2:], out_size, max_zoom, iterations, clip)
    x = images if images.dtype in (torch.float32, torch.float64) else images.float()
    with torch.autocast(images.device.type, enabled=False):
        out = F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border",
                            align_corners=False)
    return out.to(images.dtype)


# ---------------------------------------------------------------------------------------------
# 3. Part-net, master-net and feature distiller (paper Sec. 3.3, spec §3)
# ---------------------------------------------------------------------------------------------

class TASN(FinegrainModel):
    """Trilinear Attention Sampling Network.

    Training: the attention net maps the image (resized to ``attention_size``) to c part maps;
    the structure-preserved and detail-preserved samples (``sample_size``) go through one
    backbone as ``[I_detail; I_structure]``; losses (weighted, in fp32):
    ``ce_attention`` (1.0), ``ce_part`` = CE(fc_part(detail)), ``ce_master`` =
    CE(fc_master(structure)), ``ce_part_aux`` = CE(fc(detail)), ``ce_master_aux`` =
    CE(fc(structure)) (0.5 each), ``distill`` = soft CE(student fc_master(structure), teacher
    fc_part(detail), T=10) (1.0).

    Test: only the structure stream (attention net -> average map -> sampler -> backbone on
    B images), logits from the shared ``fc`` (or ``fc_master``).

    Args:
        num_classes: number of classes (every head, including the attention net's).
        backbone: timm name of the part-/master-net (``resnet50``); kept at ``backbone`` with
            timm key names, so ``pretrained=`` ImageNet files load into it.
        attention_backbone: timm ResNet name of the attention net (``resnet18``).
        sample_size: int or (H, W) of the sampled images the backbone sees (224, or 336).
        attention_size: int or (H, W) the image is resized to for the attention net (224).
        attention_scale: factor on ``X`` before N1 (official 7).
        square_structure: square the upsampled structure map (official True; paper False).
        distinct_maps: the training detail map draws among maps with distinct sums
            (official True); the structure map always averages all maps.
        max_zoom: sampler zoom cap relative to the uniform resize (official 4).
        clip_iterations: sampler clipping passes (official 5).
        clip: sampler clipping rule, ``"coupled"`` (official: one threshold for x and y) or
            ``"per_axis"`` (:func:`zoom_bounded_densities`).
        sampler_map: ``"attention"`` (the paper) or ``"uniform"``: the control that feeds the
            sampler a constant map (a plain resize, no zoom) while every other computation,
            the attention net and its loss included, stays the same (same compute).
        head_weight: weight of each of the four backbone CE heads (official 0.5).
        attention_weight: weight of the attention net's CE (official 1.0).
        distill_weight: weight lambda of the distillation loss (official 1.0).
        distill_temperature: distillation temperature T (official 10).
        detach_teacher: stop the distillation gradient into the part-net (official False).
        t2_scale: multiply the distillation loss by T^2 (official False).
        test_head: ``"shared"`` (official ``master_net_aux``) or ``"master"`` (``fc_master``).
        attention_pretrained: local ImageNet weights file (timm / torchvision ``resnet18``, or
            a finegrain file of a ResNet classifier: its ``backbone.`` prefix is dropped)
            loaded into ``attention.body`` here; missing / unexpected keys are logged.
        backbone_kwargs: extra timm arguments of the backbone (tiny demo configs).
        attention_backbone_kwargs: extra timm arguments of the attention net's ResNet.
    """

    family = "tasn"
    pretrained_note = ("ImageNet ResNet-50 (master-net) and ResNet-18 (attention net), timm or "
                       "torchvision files")

    def __init__(self, num_classes: int = 1000, backbone: str = "resnet50",
                 attention_backbone: str = "resnet18", sample_size: int | tuple[int, int] = 224,
                 attention_size: int | tuple[int, int] = 224, attention_scale: float = 7.0,
                 square_structure: bool = True, distinct_maps: bool = True,
                 max_zoom: float = 4.0, clip_iterations: int = 5, clip: ClipRule = "coupled",
                 sampler_map: SamplerMap = "attention",
                 head_weight: float = 0.5,
                 attention_weight: float = 1.0, distill_weight: float = 1.0,
                 distill_temperature: float = 10.0, detach_teacher: bool = False,
                 t2_scale: bool = False, test_head: TestHead = "shared",
                 attention_pretrained: str | None = None, backbone_kwargs: dict | None = None,
                 attention_backbone_kwargs: dict | None = None):
        super().__init__()
        check_choice("sampler_map", sampler_map, SamplerMap)
        self.sampler_map = sampler_map
        check_choice("test_head", test_head, TestHead)
        _check_clip(max_zoom, clip)
        self.num_classes = num_classes
        self.sample_size = _pair(sample_size)
        self.attention_size = _pair(attention_size)
        self.attention_scale = attention_scale
        self.square_structure = square_structure
        self.distinct_maps = distinct_maps
        self.max_zoom = max_zoom
        self.clip_iterations = clip_iterations
        self.clip = clip
        self.head_weight = head_weight
        self.attention_weight = attention_weight
        self.distill_weight = distill_weight
        self.distill_temperature = distill_temperature
        self.detach_teacher = detach_teacher
        self.t2_scale = t2_scale
        self.test_head = test_head

        self.attention = AttentionNet(attention_backbone, num_classes, attention_backbone_kwargs)
        self.backbone, info = create_backbone(backbone, **(backbone_kwargs or {}))
        dim = info.num_features
        self.fc_part = nn.Linear(dim, num_classes)  # part-net only (detail stream)
        self.fc_master = nn.Linear(dim, num_classes)  # master-net only (structure stream)
        self.fc = nn.Linear(dim, num_classes)  # shared by both streams
        if attention_pretrained is not None:
            self.load_attention_pretrained(attention_pretrained)

    def load_attention_pretrained(self, path: str) -> None:
        """Load an ImageNet ResNet file (timm / torchvision names) into ``attention.body``."""
        from .weights import load_into, load_state_dict_file
        sd = load_state_dict_file(path)
        if sd and all(k.startswith("backbone.") or k.startswith("head.") for k in sd):
            sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
        report = load_into(self.attention.body, sd, path, "attention.body")
        log.info(str(report))

    # -- Sec. 3.1: attention maps --------------------------------------------------------------
    def attention_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Resize to ``attention_size``, run the attention net, apply trilinear attention.

        Returns:
            ``(maps, logits)``: (B, c, h, w) detached trilinear maps, (B, num_classes)
            attention-net logits.
        """
        x = images
        # an exported graph serves every input size: the resize stays in it even when the
        # example is at attention_size (a branch on its size would be traced away)
        if torch.compiler.is_exporting() or tuple(x.shape[-2:]) != self.attention_size:
            x = F.interpolate(x, size=self.attention_size, mode="bilinear",
                              align_corners=False, antialias=False)
        features, logits = self.attention(x)  # (B, c, h, w), (B, num_classes)
        with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
            maps = trilinear_attention(features.detach(), self.attention_scale)
        return maps, logits

    def _to_image(self, attention: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """(B, h, w) -> (B, H, W), bilinear ``align_corners=False`` (the official
        ``BilinearResize2D`` to 512 is ``align_corners=True``: a documented deviation)."""
        return F.interpolate(attention[:, None].float(), size=images.shape[-2:],
                             mode="bilinear", align_corners=False)[:, 0]

    def structure_attention(self, maps: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Structure-preserved map at image resolution (B, H, W): average, upsample, square."""
        a = self._to_image(structure_map(maps), images)
        return a * a if self.square_structure else a

    def detail_attention(self, maps: torch.Tensor, images: torch.Tensor,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """Detail-preserved map at image resolution (B, H, W): a random map per image in
        training, the plain average of all maps in eval (official)."""
        a = detail_map(maps, self.distinct_maps, generator) if self.training else maps.mean(1)
        return self._to_image(a, images)

    def _sample(self, images: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        if self.sampler_map == "uniform":  # the control: same compute, no zoom
            attention = torch.ones_like(attention)
        return attention_sample(images, attention, self.sample_size, self.max_zoom,
                                self.clip_iterations, self.clip)

    # -- Sec. 3.3: part-net / master-net ------------------------------------------------------
    def output_keys(self) -> set[str]:
        return {"logits", "embedding"}

    def loss_names(self) -> set[str]:
        return {"ce_attention", "ce_part", "ce_master", "ce_part_aux", "ce_master_aux",
                "distill"}

    def training_only(self) -> tuple[str, ...]:
        """The attention net (its maps are detached: trained by ``ce_attention`` alone), the
        part-net's head (it reads the detail stream) and the test head not chosen."""
        return ("attention.", "fc_part.", "fc." if self.test_head == "master" else "fc_master.")

    def forward(self, images: torch.Tensor, targets: torch.Tensor | None = None) -> dict:
        """Classify ``images`` (B, 3, H, W); see the class docstring for the two modes.

        Returns:
            ``{"logits": (B, C), "embedding": (B, D)}``, plus ``"losses"`` and ``"logs"`` when
            ``targets`` (B,) are given.
        """
        B = images.shape[0]
        maps, att_logits = self.attention_maps(images)  # (B, c, h, w), (B, C)
        structure = self._sample(images, self.structure_attention(maps, images))  # (B, 3, s, s)
        if not self.training:
            feats_s = self.backbone(structure)  # (B, D), master path only
            logits = (self.fc if self.test_head == "shared" else self.fc_master)(feats_s)
            out = {"logits": logits, "embedding": F.normalize(feats_s.float(), dim=-1)}
            if targets is not None:
                ce = F.cross_entropy(logits.float(), targets)
                out["losses"], out["logs"] = {"ce": ce}, {"ce": ce.detach()}
            return out

        detail = self._sample(images, self.detail_attention(maps, images))  # (B, 3, s, s)
        feats = self.backbone(torch.cat([detail, structure]))  # (2B, D): [part; master]
        feats_d, feats_s = feats[:B], feats[B:]
        z_part, z_master = self.fc_part(feats_d).float(), self.fc_master(feats_s).float()
        z_part_aux, z_master_aux = self.fc(feats).float().split(B)  # shared fc on both
        logits = z_master_aux if self.test_head == "shared" else z_master
        out = {"logits": logits, "embedding": F.normalize(feats_s.float(), dim=-1)}
        if targets is None:
            return out
        raw = {
            "ce_attention": F.cross_entropy(att_logits.float(), targets),
            "ce_part": F.cross_entropy(z_part, targets),
            "ce_master": F.cross_entropy(z_master, targets),
            "ce_part_aux": F.cross_entropy(z_part_aux, targets),
            "ce_master_aux": F.cross_entropy(z_master_aux, targets),
            "distill": soft_cross_entropy_distillation(
                z_master, z_part, self.distill_temperature, self.detach_teacher, self.t2_scale),
        }
        weight = {"ce_attention": self.attention_weight, "distill": self.distill_weight}
        out["losses"] = {k: weight.get(k, self.head_weight) * v for k, v in raw.items()}
        out["logs"] = {k: v.detach() for k, v in raw.items()}
        return out

    # -- pictures --------------------------------------------------------------------------------
    @torch.no_grad()
    def explain(self, images: torch.Tensor, pair: torch.Tensor | None = None, *,
                channel: int | None = None, seed: int = 0) -> list[AttentionMap]:
        """Attention maps and sampled images for drawing. No pair-wise map.

        Args:
            images: (B, 3, H, W) images in the model's input normalisation.
            pair: not supported (an :class:`~finegrain.errors.InputError` when given).
            channel: part map used for the detail stream; None draws one per image (among the
                distinct maps) with a ``torch.Generator`` seeded by ``seed``.
            seed: seed of that draw (the pictures are reproducible).

        Returns:
            ``structure`` and ``detail``: (B, H, W) raw maps (the maps the sampler uses);
            ``structure_image`` and ``detail_image``: (B, 3, h_s, w_s) sampled images, in the
            input normalisation. Runs in eval mode (BatchNorm statistics untouched) and
            restores the previous mode.
        """
        check_pair(self, pair)
        was_training = self.training
        self.eval()
        try:
            return self._explain(images, channel, seed)
        finally:
            self.train(was_training)

    def _explain(self, images: torch.Tensor, channel: int | None,
                 seed: int) -> list[AttentionMap]:
        maps, _ = self.attention_maps(images)  # (B, c, h, w)
        structure = self.structure_attention(maps, images)  # (B, H, W)
        if channel is None:
            gen = torch.Generator(device=maps.device).manual_seed(seed)
            part = detail_map(maps, self.distinct_maps, gen)
        else:
            part = maps[:, channel]
        detail = self._to_image(part, images)
        return [AttentionMap("structure", structure), AttentionMap("detail", detail),
                AttentionMap("structure_image", self._sample(images, structure)),
                AttentionMap("detail_image", self._sample(images, detail))]


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

def _create_tasn(backbone: str, **kwargs) -> TASN:
    return build(TASN, backbone=backbone, **kwargs)


@register_model
def tasn_resnet50(**kwargs) -> TASN:
    """TASN with a ResNet-50 part-/master-net and a ResNet-18 attention net (the paper's)."""
    return _create_tasn("resnet50", **kwargs)


@register_model
def tasn_resnet18(**kwargs) -> TASN:
    """TASN with a ResNet-18 part-/master-net (tests, the demo)."""
    return _create_tasn("resnet18", **kwargs)
