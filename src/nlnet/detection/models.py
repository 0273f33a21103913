"""§6 (Tables 5–6): Mask R-CNN and keypoint R-CNN with non-local blocks, on torchvision's models.

* **Backbone** (Table 5): a ResNet-FPN laid out exactly like torchvision's
  ``BackboneWithFPN`` (same parameter names, so torchvision/ImageNet weights load unchanged) with
  one 2D non-local block (embedded Gaussian, sub-sampled keys) *right before the last residual
  block of res4* (``layer3``).  Its parameters live under ``backbone.nonlocal_res4``.
* **Keypoint head** (Table 6): torchvision's stack of 8 conv3×3+ReLU with a non-local block after
  every 2 convolutions (4 blocks, under ``roi_heads.keypoint_head.nonlocal_blocks``).
* **Padding**: torchvision batches images of different sizes into one zero-padded tensor.  A
  non-local block would let every position attend to that padding, so the backbone receives the
  images' sizes and gives the block a key padding mask at the feature map's resolution: the
  block's output over an image's region then equals its output on that region alone.

The detector classes only change *how the backbone is called* (with the image sizes); the rest is
torchvision's Mask R-CNN / keypoint R-CNN.  Baselines are the same classes without blocks, so a
baseline checkpoint loads into the non-local model with only the blocks missing — and the blocks
start as the identity (BN γ = 0, §4.1), so the loaded model computes exactly the baseline.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import KeypointRCNN, MaskRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads
from torchvision.ops import FrozenBatchNorm2d

from nlnet.block import NonLocalBlock

# Prefixes of the parameters that exist only in the non-local models (what a baseline lacks).
NONLOCAL_PREFIXES: tuple[str, ...] = (
    "backbone.nonlocal_res4.",
    "roi_heads.keypoint_head.nonlocal_blocks.",
)

_DEPTHS = {50: "resnet50", 101: "resnet101"}
BACKBONE_NORMS: dict[str, type[nn.Module]] = {
    "frozen_bn": FrozenBatchNorm2d,
    "batch": nn.BatchNorm2d,
}


def default_nonlocal_kwargs() -> dict[str, Any]:
    """The detection block of §6: 2D, embedded Gaussian, sub-sampled keys, BN with γ = 0."""
    return {"pairwise": "embedded_gaussian", "subsample": True}


def padding_mask(
    image_sizes: Sequence[tuple[int, int]] | None,
    input_hw: tuple[int, int],
    feature_hw: tuple[int, int],
    *,
    min_valid: int = 1,
    device: torch.device | None = None,
) -> Tensor | None:
    """(B, h, w) bool mask, True where a feature-map cell lies in an image's zero padding.

    An image of size (H_i, W_i) in a batch padded to ``input_hw`` covers the first
    ⌈H_i·h/H⌉ × ⌈W_i·w/W⌉ cells of an (h, w) feature map: a strided conv/pool with "same" padding
    maps n input pixels to ⌈n/stride⌉ outputs, and a cell whose receptive field starts inside
    the image belongs to it.  ``min_valid`` keeps at least that many cells per axis (so a very
    thin image still has keys after the block's 2×2 sub-sampling).  Returns ``None`` when no
    image has padding.
    """
    if image_sizes is None:
        return None
    big_h, big_w = input_hw
    h, w = feature_hw
    valid = []
    for ih, iw in image_sizes:
        if not (0 < ih <= big_h and 0 < iw <= big_w):
            raise ValueError(
                f"image size {(ih, iw)} does not fit in the batched input {(big_h, big_w)}"
            )
        vh = min(h, max(math.ceil(ih * h / big_h), min(min_valid, h)))
        vw = min(w, max(math.ceil(iw * w / big_w), min(min_valid, w)))
        valid.append((vh, vw))
    if all(v == (h, w) for v in valid):
        return None
    rows = torch.arange(h, device=device)
    cols = torch.arange(w, device=device)
    vh_t = torch.tensor([v[0] for v in valid], device=device)
    vw_t = torch.tensor([v[1] for v in valid], device=device)
    inside = (rows[None, :, None] < vh_t[:, None, None]) & (
        cols[None, None, :] < vw_t[:, None, None]
    )
    return ~inside


class NonLocalResNetFPN(nn.Module):
    """ResNet-FPN backbone (torchvision's parameter layout) with an optional non-local block.

    Args:
        depth: 50 or 101.
        nonlocal_res4: insert one :class:`~nlnet.block.NonLocalBlock` (``dim=2``) right before the
            last residual block of res4 (``layer3``), as in Table 5.
        trainable_layers: how many ResNet stages, from the last, are trained (torchvision's
            ``trainable_layers``; 3 = freeze the stem and res2, the usual fine-tuning recipe).
            The non-local block is always trainable.
        norm: the ResNet's normalisation: ``"frozen_bn"`` (ImageNet statistics kept fixed, the
            standard fine-tuning recipe) or ``"batch"`` (ordinary BatchNorm, for training
            without ImageNet weights).
        nonlocal_kwargs: extra arguments for the block (default :func:`default_nonlocal_kwargs`).

    ``forward(x, image_sizes=None)`` returns torchvision's FPN feature dict.  ``image_sizes``
    (each image's (H, W) inside the padded batch ``x``) gives the block its key padding mask.
    """

    def __init__(
        self,
        depth: int = 50,
        *,
        nonlocal_res4: bool = False,
        trainable_layers: int = 3,
        norm: str = "frozen_bn",
        nonlocal_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if norm not in BACKBONE_NORMS:
            raise ValueError(
                f"unknown backbone norm {norm!r}; expected one of {list(BACKBONE_NORMS)}"
            )
        if depth not in _DEPTHS:
            raise ValueError(f"ResNet depth must be one of {sorted(_DEPTHS)}, got {depth!r}")
        if not 0 <= trainable_layers <= 5:
            raise ValueError(f"trainable_layers must be in [0, 5], got {trainable_layers!r}")
        base = resnet_fpn_backbone(
            backbone_name=_DEPTHS[depth],
            weights=None,
            trainable_layers=trainable_layers,
            norm_layer=BACKBONE_NORMS[norm],
        )
        self.depth = depth
        self.body = base.body  # IntermediateLayerGetter: conv1 … layer4, torchvision's names
        self.fpn = base.fpn
        self.out_channels: int = base.out_channels
        self.nonlocal_res4: NonLocalBlock | None = None
        if nonlocal_res4:
            kwargs = {**default_nonlocal_kwargs(), **(nonlocal_kwargs or {})}
            res4_channels = self.body.layer3[-1].conv3.out_channels
            self.nonlocal_res4 = NonLocalBlock(res4_channels, dim=2, **kwargs)

    def forward(
        self, x: Tensor, image_sizes: Sequence[tuple[int, int]] | None = None
    ) -> dict[str, Tensor]:
        input_hw = (x.shape[-2], x.shape[-1])
        features: OrderedDict[str, Tensor] = OrderedDict()
        for name, module in self.body.items():
            if name == "layer3" and self.nonlocal_res4 is not None:
                for block in module[:-1]:
                    x = block(x)
                mask = padding_mask(
                    image_sizes,
                    input_hw,
                    (x.shape[-2], x.shape[-1]),
                    min_valid=max(self.nonlocal_res4.subsample or (1,)),
                    device=x.device,
                )
                x = self.nonlocal_res4(x, key_padding_mask=mask)
                x = module[-1](x)
            else:
                x = module(x)
            if name in self.body.return_layers:
                features[self.body.return_layers[name]] = x
        return self.fpn(features)


class NonLocalKeypointHead(KeypointRCNNHeads):
    """torchvision's keypoint head (8 × conv3×3+ReLU, same parameter names) with a non-local block
    after every ``every`` convolutions (Table 6: 4 blocks, one after each pair of convs).

    RoI features are not padded, so the blocks need no mask.
    """

    def __init__(
        self,
        in_channels: int,
        layers: Sequence[int] = (512,) * 8,
        *,
        every: int = 2,
        nonlocal_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(in_channels, list(layers))
        if every <= 0 or len(layers) % every:
            raise ValueError(
                f"every={every!r} must be a positive divisor of the {len(layers)} head convolutions"
            )
        kwargs = {**default_nonlocal_kwargs(), **(nonlocal_kwargs or {})}
        self.every = every
        self.nonlocal_blocks = nn.ModuleList(
            NonLocalBlock(layers[i], dim=2, **kwargs) for i in range(every - 1, len(layers), every)
        )

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        convs_done = 0
        for name, layer in self._modules.items():
            if name == "nonlocal_blocks":
                continue
            assert layer is not None
            x = layer(x)
            if isinstance(layer, nn.ReLU):
                convs_done += 1
                if convs_done % self.every == 0:
                    x = self.nonlocal_blocks[convs_done // self.every - 1](x)
        return x


class _SizeAwareForward:
    """GeneralizedRCNN.forward, except that the backbone also receives the images' sizes.

    torchvision calls ``backbone(images.tensors)`` and so loses the sizes the padding mask needs;
    everything else (transform, RPN, RoI heads, post-processing) is torchvision's.
    """

    transform: nn.Module
    backbone: nn.Module
    rpn: nn.Module
    roi_heads: nn.Module
    training: bool

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Losses (training; ``targets`` required) or detections in input-image coordinates."""
        if self.training and targets is None:
            raise ValueError("targets are required in training mode (model.train())")
        if targets is not None:
            for i, t in enumerate(targets):
                boxes = t.get("boxes")
                if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4:
                    raise ValueError(
                        f"target {i}: 'boxes' must be a float tensor of shape (N, 4), got "
                        f"{getattr(boxes, 'shape', type(boxes).__name__)}"
                    )
        original_sizes: list[tuple[int, int]] = []
        for img in images:
            if img.dim() != 3:
                raise ValueError(f"expected (C, H, W) images, got shape {tuple(img.shape)}")
            original_sizes.append((int(img.shape[-2]), int(img.shape[-1])))
        image_list, targets = self.transform(images, targets)
        if targets is not None:
            for i, t in enumerate(targets):
                b = t["boxes"]
                if bool((b[:, 2:] <= b[:, :2]).any()):
                    raise ValueError(f"target {i} has a box of zero width or height: {b.tolist()}")
        features = self.backbone(image_list.tensors, image_sizes=image_list.image_sizes)
        proposals, proposal_losses = self.rpn(image_list, features, targets)
        detections, detector_losses = self.roi_heads(
            features, proposals, image_list.image_sizes, targets
        )
        if self.training:
            return {**detector_losses, **proposal_losses}
        return self.transform.postprocess(detections, image_list.image_sizes, original_sizes)


class NonLocalMaskRCNN(_SizeAwareForward, MaskRCNN):
    """torchvision's :class:`MaskRCNN` whose backbone sees the image sizes (Table 5)."""


class NonLocalKeypointRCNN(_SizeAwareForward, KeypointRCNN):
    """torchvision's :class:`KeypointRCNN` whose backbone sees the image sizes (Table 6)."""


def build_maskrcnn(
    depth: int = 50,
    *,
    num_classes: int = 91,
    nonlocal_backbone: bool = False,
    trainable_backbone_layers: int = 3,
    backbone_norm: str = "frozen_bn",
    nonlocal_kwargs: dict[str, Any] | None = None,
    **detector_kwargs: Any,
) -> NonLocalMaskRCNN:
    """Mask R-CNN R{depth}-FPN, with one non-local block in res4 when ``nonlocal_backbone``.

    ``detector_kwargs`` go to torchvision's ``MaskRCNN`` (``min_size``, ``max_size``,
    ``rpn_post_nms_top_n_test``, ``box_detections_per_img``, ...).
    """
    backbone = NonLocalResNetFPN(
        depth,
        nonlocal_res4=nonlocal_backbone,
        trainable_layers=trainable_backbone_layers,
        norm=backbone_norm,
        nonlocal_kwargs=nonlocal_kwargs,
    )
    return NonLocalMaskRCNN(backbone, num_classes=num_classes, **detector_kwargs)


def build_keypointrcnn(
    depth: int = 101,
    *,
    num_classes: int = 2,
    num_keypoints: int = 17,
    nonlocal_head: bool = False,
    nonlocal_backbone: bool = False,
    trainable_backbone_layers: int = 3,
    backbone_norm: str = "frozen_bn",
    nonlocal_kwargs: dict[str, Any] | None = None,
    **detector_kwargs: Any,
) -> NonLocalKeypointRCNN:
    """Keypoint R-CNN R{depth}-FPN; Table 6's "+4 in head" (``nonlocal_head``) and "+1 in
    backbone" (``nonlocal_backbone``, the same place as in Table 5)."""
    backbone = NonLocalResNetFPN(
        depth,
        nonlocal_res4=nonlocal_backbone,
        trainable_layers=trainable_backbone_layers,
        norm=backbone_norm,
        nonlocal_kwargs=nonlocal_kwargs,
    )
    head = (
        NonLocalKeypointHead(backbone.out_channels, nonlocal_kwargs=nonlocal_kwargs)
        if nonlocal_head
        else None
    )
    return NonLocalKeypointRCNN(
        backbone,
        num_classes=num_classes,
        num_keypoints=num_keypoints,
        keypoint_head=head,
        **detector_kwargs,
    )
