"""StepMetrics.reduce across processes: a key added with weight 0 on one process (or only ever with weight 0)
never divides by zero, and the all-reduce stays collective (every process reduces the same keys in the
same order). Two processes are simulated by two threads that meet at each collective."""

from __future__ import annotations

import threading

import pytest
import torch

from train.loops import metrics
from train.loops.metrics import StepMetrics


class FakeProcesses:
    """accelerate's gather_object and reduce(sum) for `n` threads: each call waits for all of them."""

    def __init__(self, n: int) -> None:
        self.n, self.barrier, self.slots = n, threading.Barrier(n), {}
        self.shapes: list[tuple] = []

    def collective(self, rank: int, value):
        self.slots[rank] = value
        self.barrier.wait()
        got = [self.slots[r] for r in range(self.n)]
        self.barrier.wait()  # everyone has read before the next collective overwrites
        return got

    def accelerator(self, rank: int):
        procs = self

        class Acc:
            num_processes = procs.n
            device = torch.device("cpu")

            def reduce(self, t, reduction):
                assert reduction == "sum"
                parts = procs.collective(rank, t.clone())
                procs.shapes.append(tuple(t.shape))
                assert all(p.shape == t.shape for p in parts), "processes reduced different key sets"
                return torch.stack(parts).sum(0)

        return Acc()

    def gather(self, rank: int, obj):
        return self.collective(rank, obj)


def test_weight_zero_keys_reduce_collectively_without_dividing_by_zero(monkeypatch):
    procs = FakeProcesses(2)
    ranks = threading.local()
    monkeypatch.setattr(metrics, "_gather_objects", lambda acc, keys: procs.gather(ranks.rank, keys))
    adds = {
        0: [({"loss": 1.0, "entropy": 3.0}, 1.0), ({"loss": 3.0}, 1.0), ({"only_zero": 5.0}, 0.0)],
        # process 1: entropy only with weight 0 here (e.g. no valid token this step), a key process 0 lacks
        1: [({"loss": 2.0, "entropy": 7.0}, 0.0), ({"loss": 6.0, "kl": 0.5}, 2.0), ({"only_zero": 1.0}, 0.0)],
    }
    out, errors = {}, []

    def run(rank: int) -> None:
        ranks.rank = rank
        try:
            m = StepMetrics()
            for values, weight in adds[rank]:
                m.add(values, weight)
            out[rank] = m.reduce(procs.accelerator(rank))
        except BaseException as e:  # surfaced below
            errors.append(e)
            procs.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not errors, errors
    # loss: (1 + 3 + 0 * 2 + 2 * 6) / (1 + 1 + 0 + 2); entropy: process 0's only (weight 0 on 1); kl: 1's only
    expected = {"loss": pytest.approx(16 / 4), "entropy": 3.0, "kl": 0.5}
    assert out[0] == out[1] == expected  # "only_zero" (weight 0 everywhere) is absent, nothing is NaN or inf
    assert procs.shapes == [(4, 2), (4, 2)]  # one all-reduce of the union of keys on each process


def test_single_process_weight_zero_only_key_is_absent():
    m = StepMetrics()
    m.add({"loss": 2.0, "entropy": 1.0}, 1.0)
    m.add({"entropy": 9.0}, 0.0)
    m.add({"zero": 1.0}, 0.0)
    assert m.reduce(None) == {"loss": 2.0, "entropy": 1.0}
