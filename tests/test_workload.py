"""Workload builder: the documented client rule, popularity skew, total rate, determinism for a
seed whatever the slicing, arrivals inside windows follow the window rates."""

from __future__ import annotations

import numpy as np
import pytest

from shared.traces import load_servegen
from shared.workload import build_workload, popularity_shares, quiet_share, rank_clients, renewal_arrivals


@pytest.fixture(scope="module")
def workload():
    return build_workload(n_models=4, alpha=1.0, total_rate_rps=2.0, seed=7)


def test_rule_ranks_active_clients_by_mean_rate():
    traces = load_servegen()
    ranked = rank_clients(traces)
    assert all(traces[c].active_fraction >= 0.5 for c in ranked)
    rates = [traces[c].mean_rate_rps for c in ranked]
    assert rates == sorted(rates, reverse=True)


def test_quiet_order_ranks_the_same_clients_by_quiet_share_and_keeps_the_total_rate():
    traces = load_servegen()
    quiet = rank_clients(traces, order="quiet")
    assert sorted(quiet) == sorted(rank_clients(traces))
    shares = [quiet_share(traces[c]) for c in quiet]
    assert shares == sorted(shares, reverse=True) and shares[0] > 0.5
    bursty = build_workload(n_models=4, alpha=0.5, total_rate_rps=2.0, seed=7, order="quiet")
    assert bursty.clients == quiet[:4]
    assert bursty.rate_rps.sum(axis=0).mean() == pytest.approx(2.0)
    with pytest.raises(ValueError):
        rank_clients(traces, order="loud")


def test_popularity_and_total_rate(workload):
    assert popularity_shares(3, 0.0) == pytest.approx([1 / 3] * 3)
    assert workload.share == pytest.approx(np.array([1, 1 / 2, 1 / 3, 1 / 4]) / (25 / 12))
    assert workload.rate_rps.mean(axis=1) == pytest.approx(2.0 * workload.share)
    assert workload.mean_rate(300.0).mean(axis=1) == pytest.approx(2.0 * workload.share)


def test_more_models_than_clients_reuse_clients_shifted_by_days():
    big = build_workload(n_models=46, alpha=0.0, total_rate_rps=46.0, seed=1)
    assert big.clients[44] == big.clients[0] and big.day_shift[44] == 1
    assert np.allclose(big.rate_rps[44], np.roll(big.rate_rps[0], -144))


def test_same_seed_same_arrivals_however_sliced(workload):
    whole = workload.arrivals(86000.0, 88000.0)
    halves = [workload.arrivals(86000.0, 87000.0), workload.arrivals(87000.0, 88000.0)]
    chunks = list(workload.iter_arrivals(86000.0, 88000.0, chunk_s=300.0))
    for parts in (halves, chunks):
        assert np.array_equal(whole.time_s, np.concatenate([p.time_s for p in parts]))
        assert np.array_equal(whole.output_tokens, np.concatenate([p.output_tokens for p in parts]))
    again = build_workload(n_models=4, alpha=1.0, total_rate_rps=2.0, seed=7).arrivals(86000.0, 88000.0)
    assert np.array_equal(whole.time_s, again.time_s) and np.array_equal(whole.model, again.model)
    other = build_workload(n_models=4, alpha=1.0, total_rate_rps=2.0, seed=8).arrivals(86000.0, 88000.0)
    assert not np.array_equal(whole.time_s[:50], other.time_s[:50])


def test_arrivals_sorted_in_range_with_azure_lengths(workload):
    batch = workload.arrivals(3600.0, 7200.0)
    assert np.all(np.diff(batch.time_s) >= 0) and batch.time_s.min() >= 3600 and batch.time_s.max() < 7200
    assert set(np.unique(batch.model)) <= {0, 1, 2, 3}
    assert np.isin(batch.prompt_tokens, workload.lengths.prompt_tokens).all()


def test_one_day_count_matches_the_rates(workload):
    day = workload.model_arrivals(0, 0.0, 86400.0)
    expected = workload.rate_rps[0, :144].sum() * 600
    assert abs(len(day) - expected) < 0.1 * expected


@pytest.mark.parametrize("law,shape", [(1, 0.3), (2, 0.6), (0, 0.0)])
def test_renewal_process_keeps_the_window_rate(law, shape):
    rng = np.random.default_rng(3)
    n = 200
    times = renewal_arrivals(rng, np.full(n, 2.0), np.full(n, law), np.full(n, shape),
                             np.arange(n) * 600.0, 600.0)
    assert abs(len(times) / (n * 600) - 2.0) < 0.2
    counts = np.bincount((times // 600).astype(int), minlength=n)
    assert counts.std() > 0 and np.all(np.diff(times) >= 0)
