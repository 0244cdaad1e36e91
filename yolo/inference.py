"""Inference mode: the model folded and laid out for speed, batched preprocessing, end-to-end detection.

`Detector` is what evaluation, detection and benchmarking share: uint8 images in, one (K, 6) array of
VOC-pixel detections per image out. Its model is `prepare_for_inference(model)`: BatchNorm folded into
the convolution before it (one op instead of two, no statistics to read), weights and activations
channels-last (oneDNN's and cuDNN's native layout, so no reorder around every convolution), the fastest
dtype the device computes natively, and no autograd. `yolo.api.open_detector` gives the Detector of a model
file: a checkpoint runs in PyTorch, an export.py .onnx file in ONNX Runtime (yolo/onnx_model.py).
"""
import copy
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.models.resnet import BasicBlock, Bottleneck

from yolo.device import inference_dtype
from yolo.photometric import model_input
from yolo.postprocess import (EVAL_SCORE_THRESHOLD, MAX_DETECTIONS, NMS_IOU, decode_boxes_and_scores,
                              select_detections, to_voc_arrays)

RESNET_CONV_BN_PAIRS = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm into the convolution before it, in place (the model must be in eval mode).

    Knows the two places the model has such pairs: consecutive Sequential entries (conv_bn_act, the
    ResNet stem and downsample branches) and the convN/bnN attributes of ResNet blocks. A BatchNorm left
    over is an error rather than a silent slow path.
    """
    if model.training:
        raise ValueError("fold_batch_norms needs a model in eval mode: it folds the running statistics.")
    for module in list(model.modules()):
        if isinstance(module, nn.Sequential):
            names = list(module._modules)
            pairs = zip(names, names[1:])
        elif isinstance(module, (BasicBlock, Bottleneck)):
            pairs = (pair for pair in RESNET_CONV_BN_PAIRS if hasattr(module, pair[0]))
        else:
            continue
        for conv_name, bn_name in pairs:
            conv, bn = getattr(module, conv_name), getattr(module, bn_name)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(module, bn_name, nn.Identity())
    left_over = [name for name, module in model.named_modules() if isinstance(module, nn.BatchNorm2d)]
    if left_over:
        raise ValueError(f"fold_batch_norms found no convolution to fold these BatchNorms into: {left_over}")
    return model


def prepare_for_inference(model: nn.Module, dtype: str | torch.dtype = "auto",
                          device: torch.device | str | None = None, compile: bool = False) -> nn.Module:
    """A copy of `model` for inference only: BatchNorm folded, channels-last, in `dtype`, eval, no gradients.

    `device` defaults to the model's. The argument is left untouched (training can go on with it).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    inference_model = fold_batch_norms(copy.deepcopy(model).eval())
    inference_model.to(device=device, dtype=inference_dtype(dtype, device), memory_format=torch.channels_last)
    inference_model.requires_grad_(False)
    if not compile:
        return inference_model
    # Freezing turns the weights into constants, so Inductor can prepack them for oneDNN / cuDNN and fold
    # them further; one graph per batch size (dynamic=False) keeps the fastest kernels for each.
    return torch.compile(inference_model, dynamic=False, options={"freezing": True})


def preprocess(images: torch.Tensor | Sequence[torch.Tensor], image_size: int, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 RGB images -> the model's input: (N, 3, image_size, image_size) in [0, 1], channels-last; with
    `dtype` uint8, the resized pixels themselves (what an .onnx graph taking uint8 reads).

    `images` is a uint8 (N, 3, H, W) batch or a list of uint8 (3, H_i, W_i) images of any sizes. The resize
    is the evaluation transform's (bilinear with antialiasing, aspect ratio not kept): on the CPU it runs
    on the uint8 pixels exactly as `yolo.transforms.EvalTransform` does, so both give the model the same input.
    """
    device = torch.device(device)
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"Expected a uint8 (N, 3, H, W) batch or a list of (3, H, W) images, "
                             f"got a tensor of shape {tuple(images.shape)}.")
        groups = [images]
    else:
        groups = [image.unsqueeze(0) for image in images]
    batch = torch.empty(sum(len(group) for group in groups), 3, image_size, image_size, dtype=dtype,
                        device=device).contiguous(memory_format=torch.channels_last)
    start = 0
    for group in groups:
        if group.dtype != torch.uint8:
            raise ValueError(f"preprocess takes uint8 images, got {group.dtype}.")
        group = group.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        # CUDA has no uint8 antialiased resize: there it runs on floats (within one grey level of the CPU's).
        if device.type == "cuda":
            group = group.float()
        resized = F.interpolate(group, size=(image_size, image_size), mode="bilinear", antialias=True)
        if dtype == torch.uint8:
            batch[start:start + len(group)] = resized if resized.dtype == torch.uint8 else resized.round().clamp(0, 255)
        else:
            batch[start:start + len(group)] = resized.to(torch.float32).div_(255)
        start += len(group)
    return batch


class Detector:
    """End-to-end detection with an inference-mode copy of a YOLOv1.

    Call it with uint8 images (a (N, 3, H, W) batch or a list of (3, H_i, W_i) images) to get one
    (K, 6) float64 array per image: VOC pixel x1, y1, x2, y2, score, class id, as `yolo.metrics` takes them.
    Images already preprocessed to the model's input size (e.g. by EvalTransform) work too, given their
    original (height, width) sizes.
    """

    def __init__(self, model: nn.Module, dtype: str | torch.dtype = "auto", device: torch.device | str | None = None,
                 compile: bool = False, score_threshold: float = EVAL_SCORE_THRESHOLD, nms_iou: float = NMS_IOU,
                 max_detections: int = MAX_DETECTIONS, prepare: bool = True):
        """`prepare=False` runs `model` itself, as it is (its weights, layout and mode: the caller puts it in eval
        mode), where a folded copy would hold the model's memory a second time: validation during training.
        `dtype` must then be its parameters' and `device` theirs."""
        self.image_size, self.grid_size, self.num_classes = model.image_size, model.grid_size, model.num_classes
        parameter = next(model.parameters())
        self.device = torch.device(device) if device is not None else parameter.device
        self.dtype = inference_dtype(dtype, self.device)
        self.input_dtype = self.dtype  # what `preprocess` makes for it
        if prepare:
            self.model = prepare_for_inference(model, self.dtype, self.device, compile)
        elif (parameter.dtype, parameter.device) != (self.dtype, self.device):
            raise ValueError(f"An unprepared model runs in its own dtype and on its own device ({parameter.dtype} on "
                             f"{parameter.device}), not {self.dtype} on {self.device}.")
        else:
            self.model = model
        self.score_threshold, self.nms_iou, self.max_detections = score_threshold, nms_iou, max_detections

    @torch.inference_mode()
    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        """The network's raw output (N, S, S, 5B + C) for a batch at the model's input size: uint8 pixels
        (as EvalTransform gives them) or floats in [0, 1]."""
        return self.model(model_input(batch, self.device).to(self.dtype))

    @torch.inference_mode()
    def infer(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The network's raw output for a batch at the model's input size (as `predict`) and its candidate boxes
        and class scores (`decode_boxes_and_scores`): what an exported .onnx graph returns."""
        predictions = self.predict(batch)
        return (predictions, *decode_boxes_and_scores(predictions, self.num_classes))

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor | Sequence[torch.Tensor],
                 original_sizes: Sequence[tuple[int, int]] | None = None) -> list[np.ndarray]:
        if images[0].dtype == torch.uint8:
            if original_sizes is None:
                original_sizes = [tuple(image.shape[-2:]) for image in images]
            images = preprocess(images, self.image_size, self.input_dtype, self.device)
        elif original_sizes is None:
            raise ValueError("Preprocessed images need their original (height, width) sizes.")
        _, boxes, scores = self.infer(images)
        return self.detections(boxes, scores, original_sizes)

    def detections(self, boxes: torch.Tensor, scores: torch.Tensor,
                   original_sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """NMS-filtered (K, 6) VOC-pixel arrays from the candidates `infer` gives, for images of those sizes."""
        detections = select_detections(boxes, scores, self.score_threshold, self.nms_iou, self.max_detections)
        return to_voc_arrays(detections, [(int(height), int(width)) for height, width in original_sizes])
