"""A recipe for a dataset of your own (tens to a few thousand images), with train.py's model or a model preset.

From the ImageNet backbone: AdamW at 3e-4 after a one-epoch warm-up (the paper's SGD at 1e-2 is tuned for
VOC's 16k images and 145 epochs), the paper's augmentation (a small set is learnt by heart quickly without
it), validation every 5 epochs, and the learning rate x 0.1 for the last quarter of the run: the milestone is
a fraction of `epochs`, so --epochs=N moves it with the run's length.
"""
protocol = "custom"
optimizer = "adamw"
lr = 3e-4
warmup_lr = 3e-5
warmup_epochs = 1.0
lr_milestones = (0.75,)
lr_milestones_unit = "fraction"
lr_gamma = 0.1
epochs = 40
batch_size = 16
micro_batch_size = 16
augment = True
eval_every = 5
