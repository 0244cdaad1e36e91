"""Tests' training settings (train.py, after configs/tiny_model.py): the synthetic set from scratch, on the CPU."""
protocol = "synthetic"
pretrained = False
warmup_epochs = 0.5
eval_every = 0
num_workers = "0"
device = "cpu"
