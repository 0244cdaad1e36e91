"""Which images each process sees, and with which augmentation, at every step of training.

An epoch is a seeded permutation of the dataset cut into global batches of `batch_size` images. Each
optimizer step splits its global batch into micro-batches of `micro_batch_size`, dealt to the processes
in turn: micro-batch k of the step goes to rank k mod world_size. So one process with accumulation
A * N and N processes with accumulation A compute the same gradient from the same micro-batches.

Every sample carries its own augmentation seed, derived from (seed, epoch, position): augmentation does
not depend on worker processes or on where a run was interrupted, so a resumed run repeats exactly.
"""
import torch
from torch.utils.data import Dataset, Sampler


class GlobalBatchSampler(Sampler):
    """Yields (dataset index, augmentation seed) for one process, `steps_per_epoch` steps' worth."""

    def __init__(self, dataset_size: int, batch_size: int, micro_batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0):
        if batch_size % (micro_batch_size * world_size):
            raise ValueError(f"batch_size={batch_size} is not a multiple of micro_batch_size x world size = "
                             f"{micro_batch_size} x {world_size}; change micro_batch_size or the number of processes.")
        if dataset_size < batch_size:
            raise ValueError(f"The training set has {dataset_size} images, fewer than one batch of {batch_size}; "
                             f"lower batch_size or add images.")
        self.dataset_size, self.batch_size, self.micro_batch_size = dataset_size, batch_size, micro_batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.accumulation = batch_size // (micro_batch_size * world_size)
        self.steps_per_epoch = dataset_size // batch_size  # the incomplete last batch is dropped
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Serve `epoch` from optimizer step `start_step` on (a resumed run skips the steps it has done)."""
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.accumulation * self.micro_batch_size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.dataset_size, generator=generator).tolist()
        sample_seeds = torch.randint(2 ** 62, (self.dataset_size,), generator=generator).tolist()
        micro = self.micro_batch_size
        for step in range(self.start_step, self.steps_per_epoch):
            for k in range(self.accumulation):
                first = step * self.batch_size + (k * self.world_size + self.rank) * micro
                for position in range(first, first + micro):
                    yield order[position], sample_seeds[position]


class SeededSamples(Dataset):
    """Wraps a dataset so that `dataset[(index, seed)]` draws its random augmentation from `seed`."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index_and_seed: tuple[int, int]):
        index, seed = index_and_seed
        # fork_rng leaves the caller's generator alone (it matters when loading in the main process). Only
        # the CPU generator is seeded: torch.manual_seed would also queue seeds for every GPU backend, which
        # fork_rng(devices=[]) does not restore, recording a stack trace each time (~0.5 ms per sample).
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]


class IndexedSamples(Dataset):
    """Wraps a dataset of (image, target dict) so that each target also holds its dataset `index`."""

    def __init__(self, dataset: Dataset, indices=None):
        self.dataset = dataset
        self.indices = range(len(dataset)) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        index = self.indices[position]
        sample = self.dataset[index]
        if sample is None:  # an image skipped as unreadable
            return None
        image, target = sample
        return image, {**target, "index": index}


class FirstPassEmpty(Sampler):
    """`sampler`'s items, except on its first pass, which yields none: a loader's first iteration then forks its
    persistent workers and queues no work for them (yolo.transforms.build_loader's start_workers)."""

    def __init__(self, sampler: Sampler):
        self.sampler, self.passes = sampler, 0

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        self.passes += 1
        return iter(()) if self.passes == 1 else iter(self.sampler)
