"""Classification pretraining of a detector's backbone (the paper's first stage): the classifier, its
ImageFolder data and transforms, and its training and evaluation loops.

The classifier is the backbone followed by global average pooling and one fully connected layer, as the
paper pretrains its first 20 convolutions. Its state dict names the backbone's tensors `backbone.*`, as
`YOLOv1` does, so a detector takes them over unchanged (yolo.checkpoint.load_backbone_weights).
"""
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional
from torchvision import datasets
from torchvision.transforms import v2
from tqdm import tqdm

from yolo.distributed import all_reduce_sum, is_main_process
from yolo.engine import autocast_context
from yolo.model import IMAGENET_MEAN, IMAGENET_STD, build_backbone

# The usual ImageNet evaluation: resize the short side to 256, centre crop 224 (scaled with image_size).
EVAL_RESIZE_RATIO = 256 / 224


class BackboneClassifier(nn.Module):
    """`backbone` -> global average pool -> Linear(channels, num_classes), on RGB inputs in [0, 1]."""

    def __init__(self, backbone: str, num_classes: int):
        super().__init__()
        self.backbone_name = backbone
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.backbone, channels = build_backbone(backbone)
        self.classifier = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, a=0.1, mode="fan_out", nonlinearity="leaky_relu")
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.backbone((images - self.mean) / self.std)
        return self.classifier(features.mean(dim=(2, 3)))


def train_transform(image_size: int) -> v2.Compose:
    """Random resized crop (8-100 % of the area, aspect 3/4-4/3) and horizontal flip: the standard recipe."""
    return v2.Compose([v2.ToImage(), v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip(),
                       v2.ToDtype(torch.float32, scale=True)])


def eval_transform(image_size: int) -> v2.Compose:
    return v2.Compose([v2.ToImage(), v2.Resize(round(image_size * EVAL_RESIZE_RATIO), antialias=True),
                       v2.CenterCrop(image_size), v2.ToDtype(torch.float32, scale=True)])


def image_folders(data_dir: str | Path, image_size: int) -> tuple[datasets.ImageFolder, datasets.ImageFolder]:
    """The train and val ImageFolder sets of `data_dir` (one folder per class in each), with the same classes."""
    folders = {}
    for split, transform in (("train", train_transform(image_size)), ("val", eval_transform(image_size))):
        root = Path(data_dir) / split
        try:
            folders[split] = datasets.ImageFolder(root, transform=transform)
        except (FileNotFoundError, OSError) as error:
            raise FileNotFoundError(f"{root}: not an image-folder split ({error}). data_dir must hold train/ and "
                                    f"val/, each with one folder of images per class.") from None
    if folders["train"].classes != folders["val"].classes:
        missing = sorted(set(folders["train"].classes) ^ set(folders["val"].classes))
        raise FileNotFoundError(f"{data_dir}: train/ and val/ must hold the same class folders; only one of them "
                                f"has {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}.")
    return folders["train"], folders["val"]


def classification_loss(model: nn.Module, batch, *, label_smoothing: float, device: torch.device,
                        dtype: torch.dtype) -> tuple[dict, int]:
    """The cross-entropy (mean over the images) of one classification micro-batch, and its number of images:
    yolo.engine.train_one_epoch's `forward_loss` for pretraining."""
    images, labels = batch
    images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    with autocast_context(device, dtype):
        logits = model(images)
    loss = functional.cross_entropy(logits.float(), labels.to(device, non_blocking=True),
                                    label_smoothing=label_smoothing)
    return {"cross_entropy": loss}, len(images)


@torch.inference_mode()
def evaluate_classifier(model: nn.Module, loader, *, device: torch.device, dtype: torch.dtype) -> dict:
    """Mean cross-entropy, top-1 and top-5 accuracy (fractions) over every process's share of the set."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits, images
    for images, labels in tqdm(loader, desc="validate", leave=False, dynamic_ncols=True,
                               disable=None if is_main_process() else True):
        images = images.to(device).contiguous(memory_format=torch.channels_last)
        labels = labels.to(device)
        with autocast_context(device, dtype):
            logits = model(images).float()
        ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = ranked == labels[:, None]
        sums += torch.stack([functional.cross_entropy(logits, labels, reduction="sum").double(),
                             hits[:, 0].sum().double(), hits.any(dim=1).sum().double(),
                             sums.new_tensor(len(labels))])
    totals = all_reduce_sum(sums)
    images = totals[3].item()
    return {"loss": totals[0].item() / images, "top1": totals[1].item() / images, "top5": totals[2].item() / images}
