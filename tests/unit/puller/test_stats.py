"""puller/stats.py: Triton's inference statistics as the pod keeps them."""

from __future__ import annotations

from puller.stats import Execution, StatsBook, Timing


def _served(book: StatsBook, model: str, ex: Execution, rows: int = 1, batching: bool = False) -> None:
    book.succeeded(model, 1_000, arrived_ns=0, decoded_ns=10, done_ns=100, timing=Timing(ex),
                   batching=batching, rows=rows)


def test_a_batch_counts_one_execution_and_every_row() -> None:
    book = StatsBook()
    batch = Execution(rows=5, started_ns=30, ended_ns=80)
    _served(book, "m", batch, rows=2, batching=True)
    _served(book, "m", batch, rows=3, batching=True)
    (msg,) = book.messages(["m"])
    assert (msg.inference_count, msg.execution_count, msg.last_inference) == (5, 1, 1_000)
    s = msg.inference_stats
    assert (s.success.count, s.success.ns, s.queue.ns, s.compute_input.ns, s.compute_infer.ns, s.compute_output.ns) \
        == (2, 200, 40, 20, 100, 40)
    assert [(b.batch_size, b.compute_infer.count, b.compute_infer.ns) for b in msg.batch_stats] == [(5, 1, 50)]


def test_failures_and_unbatched_requests() -> None:
    book = StatsBook()
    _served(book, "m", Execution(started_ns=20, ended_ns=60))
    book.failed("m", 2_000, arrived_ns=0, done_ns=7)
    (msg,) = book.messages()
    assert (msg.inference_count, msg.execution_count, msg.last_inference) == (1, 1, 2_000)
    assert (msg.inference_stats.fail.count, msg.inference_stats.fail.ns) == (1, 7)
    assert [b.batch_size for b in msg.batch_stats] == [1]


def test_totals_are_bounded_least_recently_used_first() -> None:
    book = StatsBook(max_models=2)
    for model in ("a", "b"):
        _served(book, model, Execution(started_ns=20, ended_ns=60))
    _served(book, "a", Execution(started_ns=20, ended_ns=60))  # a used again: b is the oldest
    _served(book, "c", Execution(started_ns=20, ended_ns=60))
    assert [m.name for m in book.messages()] == ["a", "c"]
    assert book.messages(["b", "zzz"]) == []
