"""The demo's model shape (train.py and benchmark.py): 128 px, a 4 x 4 grid and a narrow Fast-YOLO-like head,
so that a training step costs a fraction of the full model's on a CPU."""
image_size = 128
grid_size = 4
head_channels = 128
fc_dim = 512
