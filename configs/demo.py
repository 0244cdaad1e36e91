"""`make demo`'s training recipe (train.py, after configs/demo_model.py): from scratch on the synthetic set, on a CPU.

The paper's SGD recipe stays near 0 mAP from scratch in the minutes a demo may take. Instead: AdamW at 3e-4
(at 1e-3 the class term stays high for epochs; 5e-4 and 2e-4 gave lower mAP), no augmentation (in ~10,000
images it slows learning more than it prevents overfitting), and the learning rate x 0.2 for the last fifth or
quarter of the run (each drop lifts mAP at once). The drop is a fraction of the run, so that `--epochs=N` keeps
it near the end; the Makefile sets epochs, the fraction and zero_init_residual per model. docs/demo_tuning.md
gives the measurements behind each choice.
"""
protocol = "synthetic"
data_dir = "data/synthetic"  # what `make demo` generates (the Makefile passes its DEMO_DATA)
pretrained = False
optimizer = "adamw"
lr = 3e-4
warmup_lr = 3e-5
warmup_epochs = 0.05
lr_milestones = (0.8,)         # the drop after 0.8 of the run: epoch 4 of resnet18's 5 in make demo
lr_milestones_unit = "fraction"
lr_gamma = 0.2
weight_decay = 0.0
augment = False
batch_size = 16
micro_batch_size = 16
num_workers = "1"
eval_every = 1
device = "cpu"
