"""yolo.sampling: which images each process gets at each step, with which seeds, and a resume that repeats them."""
import pytest
import torch

from yolo.sampling import GlobalBatchSampler, IndexedSamples, SeededSamples


def steps(sampler, micro_batches_per_step):
    """The sampler's (index, seed) pairs cut into optimizer steps, each a list of micro-batches."""
    pairs = list(sampler)
    micro = sampler.micro_batch_size
    batches = [pairs[i:i + micro] for i in range(0, len(pairs), micro)]
    return [batches[i:i + micro_batches_per_step] for i in range(0, len(batches), micro_batches_per_step)]


def test_processes_share_each_global_batch_micro_batch_by_micro_batch():
    """Micro-batch k of a step goes to rank k mod world_size: 3 processes of 2 micro-batches of 2 images each
    see exactly what one process of 6 micro-batches sees, dealt in turn."""
    single = GlobalBatchSampler(27, 12, 2, seed=4)
    assert (single.accumulation, single.steps_per_epoch, len(single)) == (6, 2, 24)  # 3 images left over
    single_steps = steps(single, 6)
    ranks = [GlobalBatchSampler(27, 12, 2, rank=rank, world_size=3, seed=4) for rank in range(3)]
    for rank, sampler in enumerate(ranks):
        assert (sampler.accumulation, sampler.steps_per_epoch, len(sampler)) == (2, 2, 8)
        for step, micro_batches in enumerate(steps(sampler, 2)):
            assert micro_batches == [single_steps[step][k] for k in range(rank, 6, 3)]
    indices = [index for step in single_steps for batch in step for index, _ in batch]
    assert len(set(indices)) == 24 and set(indices) <= set(range(27))


def test_each_epoch_is_another_permutation_and_a_rerun_is_the_same():
    sampler = GlobalBatchSampler(40, 8, 4, seed=1)
    first = list(sampler)
    assert list(sampler) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first and sorted(index for index, _ in second) == sorted(index for index, _ in first)
    assert list(GlobalBatchSampler(40, 8, 4, seed=2)) != first
    assert len({seed for _, seed in first + second}) == 80  # every sample of every epoch its own seed


def test_a_resumed_epoch_serves_the_steps_it_had_left():
    sampler = GlobalBatchSampler(40, 8, 2, rank=1, world_size=2, seed=3)
    sampler.set_epoch(2)
    whole = list(sampler)
    sampler.set_epoch(2, start_step=3)
    assert len(sampler) == 2 * 8 // 2 and list(sampler) == whole[3 * 4:]


@pytest.mark.parametrize("arguments, message", [
    ((64, 12, 4, 0, 2), "batch_size=12 is not a multiple of micro_batch_size x world size = 4 x 2; change "
                        "micro_batch_size or the number of processes."),
    ((7, 8, 4), "The training set has 7 images, fewer than one batch of 8; lower batch_size or add images."),
])
def test_settings_that_cannot_be_served_are_refused(arguments, message):
    with pytest.raises(ValueError) as raised:
        GlobalBatchSampler(*arguments)
    assert str(raised.value) == message


def test_a_seeded_sample_draws_from_its_seed_and_leaves_the_callers_generator_alone():
    class Noise(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, index):
            return index, torch.rand(2)

    seeded = SeededSamples(Noise())
    assert len(seeded) == 3
    torch.manual_seed(0)
    state = torch.get_rng_state()
    index, first = seeded[(2, 11)]
    assert index == 2 and torch.equal(torch.get_rng_state(), state)
    assert torch.equal(seeded[(0, 11)][1], first) and not torch.equal(seeded[(2, 12)][1], first)


def test_indexed_samples_carry_their_dataset_index():
    samples = [("a", {"labels": 1}), None, ("c", {"labels": 3})]
    indexed = IndexedSamples(samples, indices=[2, 1])
    assert len(indexed) == 2 and len(IndexedSamples(samples)) == 3
    assert indexed[0] == ("c", {"labels": 3, "index": 2})
    assert indexed[1] is None  # an image skipped as unreadable stays skipped
    assert IndexedSamples(samples)[0] == ("a", {"labels": 1, "index": 0})


def test_an_epoch_is_the_first_whole_batches_of_a_permutation_seeded_by_seed_and_epoch():
    """The order every earlier run used, so that a resumed run repeats it: epoch e of seed s is
    torch.randperm(N) seeded with s * 1_000_003 + e; the incomplete last batch is what is left of it."""
    for seed, epoch in ((0, 0), (4, 3)):
        sampler = GlobalBatchSampler(27, 12, 2, seed=seed)
        sampler.set_epoch(epoch)
        order = torch.randperm(27, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
        assert [index for index, _ in sampler] == order[:24]
    assert list(GlobalBatchSampler(27, 12, 2)) == list(GlobalBatchSampler(27, 12, 2, seed=0))


def test_a_training_set_of_exactly_one_batch_is_served():
    sampler = GlobalBatchSampler(8, 8, 4)
    assert sampler.steps_per_epoch == 1 and sorted(index for index, _ in sampler) == list(range(8))
