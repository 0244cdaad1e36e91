"""The YOLOv1 network: an ImageNet ResNet or MobileNetV2, the paper's Darknet or Fast YOLO's backbone, then the
YOLOv1 head.

Output layout per grid cell: [x, y, w, h, conf] for each of the B predictors, then C class
probabilities, all passed through a sigmoid (see yolo/boxes.py for what x, y, w, h mean).

The backbone is the part a classifier pretrains (pretrain.py); the head is what detection adds to it.
"""
import urllib.error

import torch
import torchvision
from torch import nn

BACKBONES = ("resnet18", "resnet50", "mobilenet_v2", "darknet", "fast")
BACKBONE_STRIDE = 32
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's ImageNet weights of the backbones that have them. ResNet50 keeps IMAGENET1K_V1 (what
# torchvision's old `pretrained=True` gave, so what the seed used).
IMAGENET_WEIGHTS = {
    "resnet18": torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
    "resnet50": torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
    "mobilenet_v2": torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1,
}


def conv_bn_act(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    """Conv (no bias: BatchNorm follows) -> BatchNorm -> LeakyReLU(0.1), 'same' padding."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.LeakyReLU(0.1, inplace=True),
    )


def darknet_backbone() -> nn.Sequential:
    """The first 20 convolutions of the paper's Figure 3 (stride 32, 1024 channels).

    Every repeated block is built afresh, so the four [1x1 256, 3x3 512] blocks have their own weights.
    """
    layers = [conv_bn_act(3, 64, 7, stride=2), nn.MaxPool2d(2), conv_bn_act(64, 192, 3), nn.MaxPool2d(2)]
    layers += [conv_bn_act(192, 128, 1), conv_bn_act(128, 256, 3), conv_bn_act(256, 256, 1),
               conv_bn_act(256, 512, 3), nn.MaxPool2d(2)]
    for _ in range(4):
        layers += [conv_bn_act(512, 256, 1), conv_bn_act(256, 512, 3)]
    layers += [conv_bn_act(512, 512, 1), conv_bn_act(512, 1024, 3), nn.MaxPool2d(2)]
    for in_channels in (1024, 1024):
        layers += [conv_bn_act(in_channels, 512, 1), conv_bn_act(512, 1024, 3)]
    return nn.Sequential(*layers)


FAST_WIDTHS = (16, 32, 64, 128, 256, 512)
FAST_HEAD_WIDTHS = (1024, 1024, 256)


def fast_backbone() -> nn.Sequential:
    """The pretrained part of Fast YOLO: six 3x3 convolutions 16-32-64-128-256-512, each of the first five
    followed by a 2x2 max pool (stride 32, 512 channels).

    The paper says only that Fast YOLO has 9 convolutional layers instead of 24, with fewer filters. The
    widths are those of darknet's yolov1 "tiny" configuration (16 doubling to 1024, then 256); that
    configuration has 8 convolutions, so a second 3x3 1024 in the head makes the paper's 9 (`fast_head`).
    """
    layers = []
    for index, (in_channels, out_channels) in enumerate(zip((3, *FAST_WIDTHS), FAST_WIDTHS)):
        layers.append(conv_bn_act(in_channels, out_channels, 3))
        if index < len(FAST_WIDTHS) - 1:
            layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def fast_head(in_channels: int, head_stride: int, grid_size: int, outputs_per_cell: int) -> nn.Sequential:
    """Fast YOLO's detection layers: 3x3 convolutions 1024 (with the head's stride), 1024 and 256, then one
    fully connected layer straight to the S x S x (5B + C) outputs, as in darknet's tiny configuration
    (no 4096-wide hidden layer: that layer alone would hold most of the model's parameters)."""
    first, second, last = FAST_HEAD_WIDTHS
    return nn.Sequential(
        conv_bn_act(in_channels, first, 3, stride=head_stride),
        conv_bn_act(first, second, 3),
        conv_bn_act(second, last, 3),
        nn.Flatten(),
        nn.Linear(grid_size * grid_size * last, grid_size * grid_size * outputs_per_cell),
    )


class PretrainedWeightsError(RuntimeError):
    """ImageNet weights that cannot be had (offline, or a damaged cache file); the message says what to do."""


def load_imagenet_weights(name: str) -> dict:
    """torchvision's ImageNet state dict for `name`, from the torch hub cache or the network."""
    weights = IMAGENET_WEIGHTS[name]
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except (urllib.error.URLError, OSError, RuntimeError) as error:
        cache = torch.hub.get_dir() + "/checkpoints/" + weights.url.rsplit("/", 1)[-1]
        raise PretrainedWeightsError(
            f"Could not load the ImageNet weights of {name} ({weights.url}): {error}. "
            f"Either train from scratch with pretrained=False (--pretrained=false), or download that file "
            f"on a machine with internet access and place it at {cache} (the torch hub cache; set TORCH_HOME "
            f"to move it)."
        ) from error


def resnet_backbone(name: str, pretrained: bool, zero_init_residual: bool = False) -> tuple[nn.Sequential, int]:
    """A torchvision ResNet without its average pool and classifier, and its output channels."""
    resnet = getattr(torchvision.models, name)(weights=None, zero_init_residual=zero_init_residual)
    if pretrained:
        resnet.load_state_dict(load_imagenet_weights(name))
    layers = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool,
                           resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)
    return layers, resnet.fc.in_features


def mobilenet_v2_backbone(pretrained: bool) -> tuple[nn.Sequential, int]:
    """torchvision's MobileNetV2 without its classifier (its `features`: stride 32, 1280 channels)."""
    mobilenet = torchvision.models.mobilenet_v2(weights=None)
    if pretrained:
        mobilenet.load_state_dict(load_imagenet_weights("mobilenet_v2"))
    return mobilenet.features, mobilenet.last_channel


def build_backbone(name: str, pretrained: bool = False, zero_init_residual: bool = False) -> tuple[nn.Sequential, int]:
    """The backbone `name` (stride 32) and its output channels; `pretrained`: torchvision's ImageNet weights
    (ResNets and MobileNetV2); `zero_init_residual`: torchvision's option of that name (ResNets from scratch
    only)."""
    if name not in BACKBONES:
        raise ValueError(f"Unknown backbone {name!r}; known backbones: {', '.join(BACKBONES)}.")
    if zero_init_residual and (pretrained or not name.startswith("resnet")):
        raise ValueError(f"zero_init_residual starts the residual blocks of a ResNet trained from scratch; "
                         f"{name} with pretrained={pretrained} has none to start: use zero_init_residual=False.")
    if pretrained and name in ("darknet", "fast"):
        raise ValueError(f"No ImageNet weights exist for the {name} backbone here; use pretrained=False, or "
                         f"pretrain it with pretrain.py and pass its last.pt as backbone_weights.")
    if name == "darknet":
        return darknet_backbone(), 1024
    if name == "fast":
        return fast_backbone(), FAST_WIDTHS[-1]
    if name == "mobilenet_v2":
        return mobilenet_v2_backbone(pretrained)
    return resnet_backbone(name, pretrained, zero_init_residual)


class YOLOv1(nn.Module):
    """YOLOv1 for `image_size` x `image_size` RGB inputs in [0, 1] (normalised inside the model).

    `head_channels` and `fc_dim` are the paper's 1024 and 4096 by default; smaller values give a
    narrow head for quick CPU runs. The `fast` backbone comes with Fast YOLO's own head (`fast_head`),
    which these two do not shape. `zero_init_residual` (ResNets from scratch) starts the last BatchNorm of
    every residual block at zero, so that each block starts as the identity (torchvision's option).
    """

    def __init__(self, backbone: str = "resnet18", num_classes: int = 20, grid_size: int = 7,
                 num_boxes: int = 2, image_size: int = 448, pretrained: bool = False,
                 head_channels: int = 1024, fc_dim: int = 4096, zero_init_residual: bool = False):
        super().__init__()
        feature_size, remainder = divmod(image_size, BACKBONE_STRIDE)
        if remainder or feature_size not in (grid_size, 2 * grid_size):
            allowed = (BACKBONE_STRIDE * grid_size, 2 * BACKBONE_STRIDE * grid_size)
            raise ValueError(
                f"image_size={image_size} does not fit grid_size={grid_size}: image_size / {BACKBONE_STRIDE} must "
                f"be grid_size or 2 x grid_size, so the allowed sizes are {allowed[0]} and {allowed[1]}.")
        self.backbone_name = backbone
        self.num_classes = num_classes
        self.grid_size = grid_size
        self.num_boxes = num_boxes
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

        self.backbone, backbone_channels = build_backbone(backbone, pretrained, zero_init_residual)
        head_stride = feature_size // grid_size
        outputs_per_cell = 5 * num_boxes + num_classes
        if backbone == "fast":
            self.head = fast_head(backbone_channels, head_stride, grid_size, outputs_per_cell)
        else:
            self.head = nn.Sequential(
                conv_bn_act(backbone_channels, head_channels, 3),
                conv_bn_act(head_channels, head_channels, 3, stride=head_stride),
                conv_bn_act(head_channels, head_channels, 3),
                conv_bn_act(head_channels, head_channels, 3),
                nn.Flatten(),
                nn.Linear(grid_size * grid_size * head_channels, fc_dim),
                nn.LeakyReLU(0.1, inplace=True),
                nn.Linear(fc_dim, grid_size * grid_size * outputs_per_cell),
            )
        self._init_weights(skip_backbone=pretrained)

    def _init_weights(self, skip_backbone: bool) -> None:
        """He initialisation for LeakyReLU, zero biases, and a small last layer.

        The small last layer makes every initial output close to sigmoid(0) = 0.5: boxes start at their
        cell's centre with half the image size, which gives small, balanced first gradients. BatchNorm keeps
        the weights it was built with (1, or 0 where `zero_init_residual` asked for it).
        """
        modules = self.head.modules() if skip_backbone else self.modules()
        for module in modules:
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, a=0.1, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(module, nn.Linear):
                nn.init.kaiming_uniform_(module.weight, a=0.1, nonlinearity="leaky_relu")
                nn.init.zeros_(module.bias)
        last = self.head[-1]
        nn.init.normal_(last.weight, std=0.01)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1:] != (3, self.image_size, self.image_size):
            raise ValueError(f"Expected images of shape (N, 3, {self.image_size}, {self.image_size}), "
                             f"got {tuple(images.shape)}.")
        features = self.backbone((images - self.mean) / self.std)
        out = torch.sigmoid(self.head(features))
        return out.view(-1, self.grid_size, self.grid_size, 5 * self.num_boxes + self.num_classes)
