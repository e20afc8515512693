from rewardsvc.model.batch_plan import plan_padded_batches


def test_batches_respect_budget_and_cover_every_index_once():
    lengths = [5, 100, 30, 30, 7, 64, 1, 99]
    batches = plan_padded_batches(lengths, token_budget=128, max_batch_size=3)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 128
    # longest first, sorted within and across batches
    order = [lengths[i] for b in batches for i in b]
    assert order == sorted(order, reverse=True)


def test_row_longer_than_budget_gets_its_own_batch():
    assert plan_padded_batches([500, 3, 2], token_budget=100, max_batch_size=8) == [[0], [1, 2]]
