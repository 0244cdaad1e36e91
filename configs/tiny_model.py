"""The smallest model the tests train (train.py and benchmark.py): seconds per step on a CPU."""
image_size = 128
grid_size = 4
head_channels = 32
fc_dim = 64
