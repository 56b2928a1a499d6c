import pytest

from ssl_xcit.pretrain.sampler import ResumableDistributedSampler


def _indices(sampler):
    return [i for i, _ in sampler]


def test_ranks_get_disjoint_whole_batches():
    ranks = [ResumableDistributedSampler(103, batch_size=5, num_replicas=4, rank=r, seed=1) for r in range(4)]
    shares = [_indices(s) for s in ranks]
    assert all(len(s) == len(ranks[0]) == 25 for s in shares)  # 103 // (5*4) = 5 batches of 5
    assert len(set().union(*map(set, shares))) == 100


def test_epochs_reshuffle_and_are_reproducible():
    s = ResumableDistributedSampler(50, batch_size=5, seed=7)
    first = _indices(s)
    s.set_epoch(1)
    assert _indices(s) != first
    s.set_epoch(0)
    assert _indices(s) == first


def test_resume_skips_done_batches_then_next_epoch_is_whole():
    full = ResumableDistributedSampler(40, batch_size=4, seed=3)
    want = list(full)
    resumed = ResumableDistributedSampler(40, batch_size=4, seed=3)
    resumed.resume_at(epoch=0, batches_done=3)
    resumed.set_epoch(0)
    assert list(resumed) == want[12:]
    resumed.set_epoch(1)
    full.set_epoch(1)
    assert list(resumed) == list(full)


@pytest.mark.parametrize("epoch", [0, 3])
def test_augmentation_seed_depends_on_sample_and_epoch_only(epoch):
    a = ResumableDistributedSampler(20, batch_size=2, num_replicas=2, rank=0, seed=5)
    b = ResumableDistributedSampler(20, batch_size=5, num_replicas=1, rank=0, seed=5)
    a.set_epoch(epoch)
    b.set_epoch(epoch)
    seeds_b = dict(b)
    assert all(seeds_b[i] == seed for i, seed in a)


class _Keys:
    """A dataset whose sample is its own (index, seed) key."""

    def __getitem__(self, key):
        return key


def test_resume_after_a_whole_epoch_starts_the_next_one_even_before_set_epoch():
    """A DataLoader with workers draws indices as soon as its iterator exists, which
    Lightning creates before it calls set_epoch on resume: the position alone must say
    'next epoch' when the checkpoint was written after an epoch's last batch."""
    from torch.utils.data import DataLoader

    full = ResumableDistributedSampler(40, batch_size=4, seed=3)
    full.set_epoch(1)
    want = list(full)
    resumed = ResumableDistributedSampler(40, batch_size=4, seed=3)
    resumed.resume_at(epoch=0, batches_done=10)  # all 10 batches of epoch 0 done
    loader = DataLoader(_Keys(), batch_size=4, sampler=resumed, num_workers=2, collate_fn=list)
    batches = iter(loader)  # workers start drawing here
    resumed.set_epoch(1)
    assert [key for batch in batches for key in batch] == want
