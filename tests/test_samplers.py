"""DistributedMPerClassSampler: the per-step guarantees for every step of an epoch."""

import math
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distributed_cl.samplers import DistributedMPerClassSampler, labels_from_pairs


def all_ranks(labels, m, global_batch_size, replicas, seed=0, epoch=0, **kwargs):
    samplers = [DistributedMPerClassSampler(labels, m, global_batch_size, replicas, r, seed, **kwargs) for r in range(replicas)]
    for s in samplers:
        s.set_epoch(epoch)
    return samplers, [list(s) for s in samplers]


@st.composite
def settings_and_labels(draw):
    m = draw(st.integers(2, 8))
    replicas = draw(st.integers(1, 8))
    sizes = draw(st.lists(st.integers(1, 3 * m), min_size=1, max_size=25))  # includes classes smaller than m
    step = replicas // math.gcd(m, replicas)  # classes per batch must make m * k divisible by replicas
    k = draw(st.integers(1, 4)) * step
    names = draw(st.sampled_from(["int", "str", "sparse_int"]))
    ids = {"int": list(range(len(sizes))), "str": [f"class-{i}" for i in range(len(sizes))], "sparse_int": [7 * i - 40 for i in range(len(sizes))]}[names]
    labels = [ids[c] for c, n in enumerate(sizes) for _ in range(n)]
    labels = draw(st.permutations(labels))
    return m, replicas, m * k, labels


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(settings_and_labels())
def test_every_global_batch_has_m_of_each_of_b_over_m_classes(case):
    m, replicas, global_batch_size, labels = case
    n_classes = len(set(labels))
    if global_batch_size // m > n_classes:
        with pytest.raises(ValueError, match="classes with data"):
            DistributedMPerClassSampler(labels, m, global_batch_size, replicas, 0)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny classes warn; checked elsewhere
        samplers, per_rank = all_ranks(labels, m, global_batch_size, replicas)
    lengths = {len(s) for s in samplers} | {len(batches) for batches in per_rank}
    assert len(lengths) == 1 and lengths.pop() >= 1  # equal len on every rank
    class_size = Counter(labels)
    for step in zip(*per_rank):
        assert all(len(local) == global_batch_size // replicas for local in step)
        union = [i for local in step for i in local]
        per_class = Counter(labels[i] for i in union)
        assert len(per_class) == global_batch_size // m
        assert set(per_class.values()) == {m}
        repeated = [i for i, c in Counter(union).items() if c > 1]
        assert all(class_size[labels[i]] < m for i in repeated)  # repeats only from tiny classes


def test_same_inputs_same_plan_and_set_epoch_changes_it():
    labels = np.repeat(np.arange(12), 9)
    _, a = all_ranks(labels, 3, 12, 2, seed=5, epoch=1)
    _, b = all_ranks(labels, 3, 12, 2, seed=5, epoch=1)
    _, c = all_ranks(labels, 3, 12, 2, seed=5, epoch=2)
    _, d = all_ranks(labels, 3, 12, 2, seed=6, epoch=1)
    assert a == b and a != c and a != d


def test_plan_does_not_depend_on_global_random_state():
    labels = np.repeat(np.arange(6), 5)
    np.random.seed(1), torch.manual_seed(1)
    _, a = all_ranks(labels, 2, 8, 2)
    np.random.seed(2), torch.manual_seed(2)
    _, b = all_ranks(labels, 2, 8, 2)
    assert a == b


def test_balanced_epoch_covers_the_data_once():
    labels = np.repeat(np.arange(10), 40)  # 400 samples, 100 groups of m=4
    samplers, per_rank = all_ranks(labels, 4, 32, 4)
    assert len(samplers[0]) == 100 // 8
    seen = [i for batches in per_rank for local in batches for i in local]
    assert len(seen) == len(set(seen))  # nothing twice
    assert len(set(seen)) >= 400 - 8 * 4  # everything but fewer than one batch of groups


def test_imbalanced_classes_are_refilled_not_lost():
    labels = np.array([0] * 50 + [1] * 4 + [2] * 4 + [3] * 6)
    samplers, per_rank = all_ranks(labels, 2, 4, 2)
    assert len(samplers[0]) == (25 + 2 + 2 + 3) // 2
    for step in zip(*per_rank):
        assert sorted(Counter(labels[i] for local in step for i in local).values()) == [2, 2]


def test_labels_as_tensor_and_dataset_targets():
    targets = torch.tensor([0, 1, 2, 3] * 5)
    a = list(DistributedMPerClassSampler(targets, 2, 4, 1, 0))
    b = list(DistributedMPerClassSampler(targets.tolist(), 2, 4, 1, 0))
    assert a == b


def test_tiny_classes_warn_once():
    with pytest.warns(RuntimeWarning, match="fewer than m=3") as record:
        DistributedMPerClassSampler([0, 0, 1, 1, 1, 2], 3, 6, 1, 0)
    assert len(record) == 1


def test_defaults_to_a_single_replica_outside_distributed():
    sampler = DistributedMPerClassSampler([0, 0, 1, 1], 2, 4)
    assert (sampler.num_replicas, sampler.rank) == (1, 0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(labels=[], m=2, global_batch_size=4), "labels is empty"),
        (dict(labels=[0, 0, 1, 1], m=1, global_batch_size=4), "m must be >= 2"),
        (dict(labels=[0, 0, 1, 1], m=3, global_batch_size=4), "global_batch_size=4 is not a positive multiple of m=3"),
        (dict(labels=[0, 0, 1, 1], m=2, global_batch_size=4, num_replicas=3, rank=0), "not divisible by num_replicas=3"),
        (dict(labels=[0, 0, 1, 1], m=2, global_batch_size=6, num_replicas=1, rank=0), "needs 3 classes per batch, but the labels have only 2"),
        (dict(labels=[0, 0, 1, 1], m=2, global_batch_size=4, num_replicas=2, rank=2), "rank=2 is outside"),
        (dict(labels=[0.5, 1.5], m=2, global_batch_size=2), "integers or strings"),
        (dict(labels=[-1, -1], m=2, global_batch_size=2, ignore_label=-1), "every label equals ignore_label"),
    ],
)
def test_impossible_settings_raise_in_the_constructor(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistributedMPerClassSampler(**kwargs)


def test_pairs_keep_both_members_in_the_same_global_batch():
    pairs = [(0, 7), (1, 5), (2, 9), (3, 4), (6, 11), (8, 10), (12, 13)]
    labels = labels_from_pairs(16, pairs)  # 14 and 15 are in no pair
    assert labels[14] == labels[15] == -1
    _, per_rank = all_ranks(labels, 2, 4, 2, ignore_label=-1)
    partner = {a: b for a, b in pairs} | {b: a for a, b in pairs}
    for step in zip(*per_rank):
        union = {i for local in step for i in local}
        assert 14 not in union and 15 not in union
        assert all(partner[i] in union for i in union)


def test_labels_from_pairs_joins_chains_and_rejects_bad_pairs():
    labels = labels_from_pairs(5, [(0, 1), (1, 2)])
    assert labels[0] == labels[1] == labels[2] != labels[3] and labels[3] == labels[4] == -1
    with pytest.raises(ValueError, match="outside"):
        labels_from_pairs(3, [(0, 3)])


@pytest.mark.parametrize("kind", ["m_per_class", "random"])
def test_the_global_batches_do_not_depend_on_the_number_of_replicas(kind):
    """What an elastic run on rows in memory needs: the ranks' shares of each global batch, side by
    side, are the same global batch on 1, 2, 3 or 6 workers, and a resume on 3 at batch 4 of an
    epoch begun on 2 goes on at the same rows."""
    from distributed_cl.samplers import DistributedRandomBatchSampler

    labels = [i % 9 for i in range(200)]

    def global_batches(replicas, start_batch=0):
        samplers = [DistributedMPerClassSampler(labels, 4, 24, replicas, r, seed=3) if kind == "m_per_class"
                    else DistributedRandomBatchSampler(len(labels), 24, replicas, r, seed=3) for r in range(replicas)]
        for s in samplers:
            s.set_epoch(2, start_batch=start_batch)
        return [sum(map(list, step), []) for step in zip(*samplers)]

    one = global_batches(1)
    assert len(one) >= 8 and all(len(batch) == 24 for batch in one)
    for replicas in (2, 3, 6):
        assert global_batches(replicas) == one, replicas
    assert global_batches(3, start_batch=4) == one[4:]
