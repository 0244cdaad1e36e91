"""`make demo`'s training recipe (train.py, after configs/demo_model.py): from scratch on the synthetic set, on a CPU.

The paper's SGD recipe stays near 0 mAP from scratch in the minutes a demo may take: AdamW, no augmentation
(the model underfits the few thousand images it sees) and a learning-rate drop for the last epoch instead.
The Makefile sets epochs and lr_milestones per model.
"""
protocol = "synthetic"
pretrained = False
optimizer = "adamw"
lr = 1e-3
warmup_lr = 1e-4
warmup_epochs = 0.1
lr_gamma = 0.2
weight_decay = 0.0
augment = False
batch_size = 16
micro_batch_size = 16
num_workers = "1"
eval_every = 1
device = "cpu"
