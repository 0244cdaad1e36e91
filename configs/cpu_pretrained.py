"""A model for your own photographs on a CPU (train.py and benchmark.py, before configs/small_data.py): torchvision's
ImageNet MobileNetV2 as the backbone, 224 px with the paper's 7 x 7 grid, and a narrow head, so that a training step
costs little on a CPU while the backbone brings features a few hundred images cannot teach."""
backbone = "mobilenet_v2"
pretrained = True
image_size = 224
grid_size = 7
head_channels = 256
fc_dim = 1024
