"""The negative dictionaries and candidate pools: ring buffers with clip ids and state."""

import pytest
import torch

from workers.dictionary import EMPTY_ID, CandidatePool, NegativeDictionary

pytestmark = pytest.mark.unit


def keys_for(ids, d=4):
    """Keys whose first coordinate is their clip id, so a key says where it came from."""
    keys = torch.zeros(len(ids), d)
    keys[:, 0] = torch.as_tensor(ids, dtype=torch.float32)
    return keys


def test_dictionary_starts_with_random_unit_keys_and_no_clips():
    dictionary = NegativeDictionary(size=16, dim=8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(dictionary.keys.norm(dim=1), torch.ones(16))
    assert (dictionary.ids == EMPTY_ID).all()
    assert dictionary.pointer == 0
    other = NegativeDictionary(size=16, dim=8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(dictionary.keys, other.keys)


def test_wrap_around_keeps_the_newest_k_keys():
    dictionary = NegativeDictionary(size=10, dim=4)
    for start in range(0, 23, 3):  # 8 batches of 3: 24 keys through a ring of 10
        ids = list(range(start, start + 3))
        slots = dictionary.enqueue(keys_for(ids), torch.tensor(ids))
        assert slots.tolist() == [(start + i) % 10 for i in range(3)]
    assert sorted(dictionary.ids.tolist()) == list(range(14, 24))
    assert torch.equal(dictionary.keys[:, 0].long(), dictionary.ids)
    assert dictionary.pointer == 24 % 10


def test_enqueueing_more_than_k_at_once_keeps_the_last_k():
    dictionary = NegativeDictionary(size=5, dim=4)
    dictionary.enqueue(keys_for(range(2)), torch.arange(2))
    dictionary.enqueue(keys_for(range(100, 112)), torch.arange(100, 112))
    assert sorted(dictionary.ids.tolist()) == list(range(107, 112))
    assert torch.equal(dictionary.keys[:, 0].long(), dictionary.ids)


def test_dictionary_state_dict_round_trips():
    dictionary = NegativeDictionary(size=8, dim=4, generator=torch.Generator().manual_seed(1))
    dictionary.enqueue(keys_for(range(5)), torch.arange(5))
    restored = NegativeDictionary(size=8, dim=4, generator=torch.Generator().manual_seed(2))
    restored.load_state_dict(dictionary.state_dict())
    assert torch.equal(restored.keys, dictionary.keys)
    assert torch.equal(restored.ids, dictionary.ids)
    assert restored.pointer == dictionary.pointer
    dictionary.enqueue(keys_for([7, 8]), torch.tensor([7, 8]))
    restored.enqueue(keys_for([7, 8]), torch.tensor([7, 8]))
    assert torch.equal(restored.keys, dictionary.keys)


def test_state_of_another_size_is_refused():
    with pytest.raises(ValueError, match="this buffer is"):
        NegativeDictionary(size=8, dim=4).load_state_dict(NegativeDictionary(size=9, dim=4).state_dict())


def test_wrong_key_shape_is_refused():
    with pytest.raises(ValueError, match="keys must be"):
        NegativeDictionary(size=8, dim=4).enqueue(torch.zeros(2, 3), torch.arange(2))


def test_pool_starts_empty_then_holds_the_last_n_keys():
    pool = CandidatePool(size=6, dim=4)
    keys, ids = pool.candidates()
    assert keys.shape == (0, 4) and ids.shape == (0,)
    pool.push(keys_for(range(4)), torch.arange(4))
    assert pool.candidates()[1].tolist() == [0, 1, 2, 3]
    pool.push(keys_for(range(4, 8)), torch.arange(4, 8))
    keys, ids = pool.candidates()
    assert sorted(ids.tolist()) == list(range(2, 8))
    assert torch.equal(keys[:, 0].long(), ids)


def test_pool_state_dict_round_trips():
    pool = CandidatePool(size=6, dim=4)
    pool.push(keys_for(range(3)), torch.arange(3))
    restored = CandidatePool(size=6, dim=4)
    restored.load_state_dict(pool.state_dict())
    assert restored.num_filled == 3
    for got, want in zip(restored.candidates(), pool.candidates(), strict=True):
        assert torch.equal(got, want)
