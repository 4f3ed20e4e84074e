"""Strict priority with FIFO inside a queue; many concurrent submissions, each forwarded exactly once."""

from collections import Counter
from concurrent.futures import ThreadPoolExecutor


def test_high_is_drained_first_strictly_and_each_queue_is_fifo(api, workers, model, db):
    low = [api.submit_ok() for _ in range(10)]
    high = [api.submit_ok(params={"_priority_": "1"}) for _ in range(5)]
    workers.start(env={"EAS_QUEUE_WORKER_CONCURRENCY": "1"})
    for request_id in low:
        api.wait_status(request_id, "SUCCESS")
    assert model.ids() == high + low


def test_priority_holds_with_many_requests_in_flight(api, workers, model, db):
    low = [api.submit_ok() for _ in range(20)]
    high = [api.submit_ok(params={"_priority_": "1"}) for _ in range(20)]
    workers.start(env={"EAS_QUEUE_WORKER_CONCURRENCY": "8"})
    states = {i: api.wait_status(i, "SUCCESS") for i in low + high}
    last_high_start = max(states[i]["started_at"] for i in high)
    first_low_start = min(states[i]["started_at"] for i in low)
    assert last_high_start <= first_low_start  # every high request was claimed before any default one
    low_starts = [states[i]["started_at"] for i in low]
    assert low_starts == sorted(low_starts)  # claimed in the order they were queued


def test_300_concurrent_submissions_are_each_forwarded_exactly_once(api, workers, model, db):
    workers.start(count=2)
    with ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(lambda n: api.submit(body=f'{{"n": {n}}}'.encode()), range(300)))
    assert [r.status_code for r in responses] == [200] * 300
    ids = [r.text for r in responses]
    assert len(set(ids)) == 300
    for request_id in ids:
        api.wait_status(request_id, "SUCCESS")
    counts = Counter(model.ids())
    assert set(counts) == set(ids)
    assert set(counts.values()) == {1}
