import pytest
import torch
import torchvision

from yolo.model import PretrainedWeightsError, YOLOv1


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50", "mobilenet_v2", "darknet"])
@pytest.mark.parametrize("image_size", [448, 224])
def test_output_shape_and_range(backbone, image_size):
    torch.manual_seed(0)
    model = YOLOv1(backbone, image_size=image_size, head_channels=64, fc_dim=128).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, image_size, image_size))
    assert out.shape == (2, 7, 7, 30)
    assert out.min() >= 0 and out.max() <= 1
    assert torch.isfinite(out).all()


def test_full_size_model_at_448():
    model = YOLOv1("resnet18").eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 448, 448))
    assert out.shape == (1, 7, 7, 30)


def test_small_grid_and_other_class_counts():
    model = YOLOv1("resnet18", num_classes=5, grid_size=4, num_boxes=3, image_size=128,
                   head_channels=32, fc_dim=64)
    assert model(torch.rand(1, 3, 128, 128)).shape == (1, 4, 4, 3 * 5 + 5)


def parameter_count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("backbone, reference_millions", [("resnet18", 255.8), ("resnet50", 282.3)])
def test_parameter_counts_match_reference(backbone, reference_millions):
    assert parameter_count(YOLOv1(backbone)) / 1e6 == pytest.approx(reference_millions, rel=2e-3)


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v2", "darknet"])
def test_no_parameter_is_shared(backbone):
    model = YOLOv1(backbone, head_channels=32, fc_dim=32)
    named = list(model.named_parameters(remove_duplicate=False))
    storages = {p.untyped_storage().data_ptr() for _, p in named}
    assert len(storages) == len(named)


def test_darknet_has_the_papers_twenty_backbone_convolutions():
    model = YOLOv1("darknet", head_channels=32, fc_dim=32)
    convs = [m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 20
    assert [c.kernel_size[0] for c in convs[:2]] == [7, 3]
    assert convs[-1].out_channels == 1024


def test_normalisation_is_inside_the_model():
    """A constant image of the ImageNet mean is all zeros after normalisation, whatever its size."""
    model = YOLOv1("resnet18", grid_size=4, image_size=128, head_channels=16, fc_dim=16).eval()
    seen = {}
    model.backbone.register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0]))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1).expand(1, 3, 128, 128)
    model(mean)
    assert seen["x"].abs().max() < 1e-6


def test_bad_image_size_names_the_allowed_sizes():
    with pytest.raises(ValueError, match="448"):
        YOLOv1(image_size=320)
    with pytest.raises(ValueError, match="128 and 256"):
        YOLOv1(grid_size=4, image_size=192)


def test_unknown_backbone_lists_the_known_ones():
    with pytest.raises(ValueError, match="resnet18, resnet50, mobilenet_v2, darknet, fast"):
        YOLOv1("vgg16")


def test_wrong_input_shape_is_a_clear_error():
    model = YOLOv1(grid_size=4, image_size=128, head_channels=16, fc_dim=16)
    with pytest.raises(ValueError, match="128"):
        model(torch.rand(1, 3, 224, 224))


def test_head_initialisation_starts_near_half():
    """In training mode (BatchNorm on batch statistics) the first outputs are all close to 0.5."""
    torch.manual_seed(0)
    model = YOLOv1(grid_size=4, image_size=128, head_channels=64, fc_dim=256).train()
    with torch.no_grad():
        out = model(torch.rand(4, 3, 128, 128))
    assert (out - 0.5).abs().max() < 0.1
    head_convs = [m for m in model.head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(conv.bias is None for conv in head_convs)


@pytest.mark.parametrize("backbone, block, last_norm", [("resnet18", "BasicBlock", "bn2"),
                                                       ("resnet50", "Bottleneck", "bn3")])
def test_zero_init_residual_starts_every_block_as_the_identity(backbone, block, last_norm):
    torch.manual_seed(0)
    plain, zeroed = (YOLOv1(backbone, grid_size=4, image_size=128, head_channels=64, fc_dim=256,
                            zero_init_residual=zero) for zero in (False, True))
    blocks = [module for module in zeroed.backbone.modules() if type(module).__name__ == block]
    assert len(blocks) == {"resnet18": 8, "resnet50": 16}[backbone]
    assert all((getattr(module, last_norm).weight == 0).all() for module in blocks)
    assert all((getattr(module, last_norm).weight == 1).all()
               for module in plain.backbone.modules() if type(module).__name__ == block)
    # a block that starts at zero passes its input through (after its ReLU), whatever its convolutions hold
    block = next(module for module in blocks if module.downsample is None).eval()
    features = torch.rand(2, block.conv1.in_channels, 8, 8)
    with torch.no_grad():
        assert torch.equal(block(features), features)


@pytest.mark.parametrize("backbone, pretrained", [("darknet", False), ("fast", False), ("resnet18", True),
                                                  ("mobilenet_v2", False)])
def test_zero_init_residual_without_blocks_to_start_is_a_clear_error(backbone, pretrained):
    with pytest.raises(ValueError, match="zero_init_residual starts the residual blocks of a ResNet"):
        YOLOv1(backbone, grid_size=4, image_size=128, pretrained=pretrained, zero_init_residual=True)


def test_pretrained_weights_load_from_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = torchvision.models.resnet18(weights=None).state_dict()
    reference["conv1.weight"].fill_(0.25)
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference, cache / weights.url.rsplit("/", 1)[-1])

    model = YOLOv1("resnet18", pretrained=True, grid_size=4, image_size=128, head_channels=16, fc_dim=16)
    assert torch.equal(model.backbone[0].weight, reference["conv1.weight"])
    assert torch.equal(model.backbone[4][0].conv1.weight, reference["layer1.0.conv1.weight"])


def test_mobilenet_v2_is_torchvisions_features_and_loads_its_imagenet_weights_from_the_hub_cache(tmp_path,
                                                                                                   monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = torchvision.models.mobilenet_v2(weights=None).state_dict()
    reference["features.0.0.weight"].fill_(0.25)
    reference["features.18.1.running_var"].fill_(3.0)
    weights = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
    assert weights.url.endswith("/mobilenet_v2-b0353104.pth")
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference, cache / "mobilenet_v2-b0353104.pth")

    model = YOLOv1("mobilenet_v2", pretrained=True, grid_size=4, image_size=128, head_channels=16, fc_dim=16)
    backbone = {f"features.{name}": tensor for name, tensor in model.backbone.state_dict().items()}
    assert backbone.keys() == {name for name in reference if name.startswith("features.")}
    assert all(torch.equal(backbone[name], reference[name]) for name in backbone)
    assert model.head[0][0].in_channels == 1280
    with torch.no_grad():
        assert model.backbone(torch.rand(1, 3, 128, 128)).shape == (1, 1280, 4, 4)  # stride 32
    # From scratch the backbone gets the model's own initialisation, not the file's.
    assert not torch.equal(YOLOv1("mobilenet_v2", grid_size=4, image_size=128, head_channels=16,
                                  fc_dim=16).backbone[0][0].weight, reference["features.0.0.weight"])


@pytest.mark.parametrize("backbone, file_name", [("resnet50", "resnet50-0676ba61.pth"),
                                                 ("mobilenet_v2", "mobilenet_v2-b0353104.pth")])
def test_pretrained_weights_offline_error_says_what_to_do(tmp_path, monkeypatch, backbone, file_name):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(url, *args, **kwargs):
        import urllib.error
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(PretrainedWeightsError) as error:
        YOLOv1(backbone, pretrained=True)
    message = str(error.value)
    assert message.startswith(f"Could not load the ImageNet weights of {backbone} (https://download.pytorch.org/")
    assert "pretrained=False" in message and str(tmp_path / "hub" / "checkpoints" / file_name) in message


def test_darknet_has_no_pretrained_weights():
    with pytest.raises(ValueError, match="pretrained=False"):
        YOLOv1("darknet", pretrained=True)


def conv_bn_parameters(layout):
    """Parameters of (kernel, in, out) convolutions without bias, each followed by BatchNorm (weight, bias)."""
    return sum(kernel * kernel * in_channels * out + 2 * out for kernel, in_channels, out in layout)


def linear_parameters(in_features, out_features):
    return in_features * out_features + out_features


# The paper's Figure 3, first 20 convolutions (the pretrained part), as (kernel, in, out).
DARKNET_BACKBONE = [(7, 3, 64), (3, 64, 192), (1, 192, 128), (3, 128, 256), (1, 256, 256), (3, 256, 512),
                    *[(1, 512, 256), (3, 256, 512)] * 4, (1, 512, 512), (3, 512, 1024),
                    (1, 1024, 512), (3, 512, 1024), (1, 1024, 512), (3, 512, 1024)]
# Fast YOLO as yolo/model.py lays it out: six pretrained 3x3 convolutions, three in the head.
FAST_BACKBONE = [(3, 3, 16), (3, 16, 32), (3, 32, 64), (3, 64, 128), (3, 128, 256), (3, 256, 512)]
FAST_HEAD = [(3, 512, 1024), (3, 1024, 1024), (3, 1024, 256)]


def test_darknet_parameter_count_is_the_papers_architecture():
    """20 pretrained convolutions, 4 added 3x3 1024 convolutions, then 7 x 7 x 1024 -> 4096 -> 7 x 7 x 30."""
    model = YOLOv1("darknet")
    assert parameter_count(model.backbone) == conv_bn_parameters(DARKNET_BACKBONE) == 22_412_224
    head = conv_bn_parameters([(3, 1024, 1024)] * 4) + linear_parameters(7 * 7 * 1024, 4096) \
        + linear_parameters(4096, 7 * 7 * 30)
    assert parameter_count(model) == conv_bn_parameters(DARKNET_BACKBONE) + head == 271_716_734
    assert len([m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]) == 24


def test_fast_yolo_parameter_count_and_its_nine_convolutions():
    model = YOLOv1("fast")
    assert parameter_count(model.backbone) == conv_bn_parameters(FAST_BACKBONE) == 1_573_776
    head = conv_bn_parameters(FAST_HEAD) + linear_parameters(7 * 7 * 256, 7 * 7 * 30)
    assert parameter_count(model) == conv_bn_parameters(FAST_BACKBONE) + head == 36_534_606
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 9 and all(conv.kernel_size == (3, 3) for conv in convs)
    with torch.no_grad():
        assert model.eval()(torch.rand(1, 3, 448, 448)).shape == (1, 7, 7, 30)


def test_fast_yolo_has_no_pretrained_weights_either():
    with pytest.raises(ValueError, match="pretrain.py"):
        YOLOv1("fast", pretrained=True)
