"""The benchmark's own arithmetic: a wrong machine share would misstate what limits scaling."""

import pytest

from bench.__main__ import Figures, machine_shares, targets


def test_machine_shares_count_all_busy_states_and_steal_once() -> None:
    # /proc/stat order: user nice system idle iowait irq softirq steal guest guest_nice
    before = [100, 0, 50, 1000, 10, 0, 5, 0, 0, 0]
    after = [400, 0, 150, 1400, 30, 0, 25, 20, 40, 0]  # guest time is inside user
    busy, steal = machine_shares(before, after)
    # deltas: user 300, system 100, idle 400, iowait 20, softirq 20, steal 20 -> total 860
    assert busy == (300 + 100 + 20 + 20) / 860
    assert steal == 20 / 860


def _figures(events_per_second: float, cpu: float, light: list[float], rss: float) -> Figures:
    return Figures(
        name="x",
        processes=1,
        events_per_second=events_per_second,
        cpu_ms_per_event=cpu,
        light_latency=light,
        first_latency=light[:1],
        peak_rss_mb=[rss],
    )


@pytest.mark.parametrize(
    ("speed", "cpu", "verdicts"),
    [
        # events/s and CPU per event of the project, the baseline being 100/s at 4 ms
        (140, 2.8, [True, True, True, True]),
        (120, 4.0, [True, True, False, False]),
        (90, 3.0, [False, True, False, True]),
        (100, 6.5, [True, False, False, False]),
    ],
)
def test_the_ratio_targets_are_judged_against_the_same_runs_baseline(
    speed: float, cpu: float, verdicts: list[bool]
) -> None:
    baseline = _figures(100, 4.0, [0.1], 50)
    found = targets(_figures(speed, cpu, [0.1], 50), baseline, latency=0.05)
    assert [t.met for t in found[:4]] == verdicts


def test_latency_and_memory_targets_and_what_a_run_did_not_measure() -> None:
    light = [0.100] * 60 + [0.150] * 40  # p50 100 ms, p99 150 ms
    found = {t.name: t.met for t in targets(_figures(1, 1, light, 120), None, latency=0.05)}
    assert found == {
        "events/s vs baseline": None,  # --no-baseline: no ratio to judge
        "CPU/event vs baseline": None,
        "light-load p50": True,  # <= 2 x 50 + 10 ms
        "light-load p99": False,  # > 2 x 50 + 40 ms
        "peak RSS per process": False,  # 120 MB
        "RSS flat over 20,000 events": None,  # no --backlog
    }


def test_the_systems_run_interleaved_abba() -> None:
    from bench.__main__ import interleaved

    assert interleaved(["A", "B"], 2) == ["A", "B", "B", "A"]
    assert interleaved(["A", "B"], 3) == ["A", "B", "B", "A", "A", "B"]
    assert interleaved(["A"], 2) == ["A", "A"]


def test_runs_combine_into_means_pooled_latencies_and_every_rss() -> None:
    from bench.__main__ import combine

    one = _figures(100, 4.0, [0.1], 50)
    two = _figures(200, 6.0, [0.2, 0.3], 70)
    both = combine([one, two])
    assert (both.events_per_second, both.cpu_ms_per_event) == (150, 5.0)
    assert both.light_latency == [0.1, 0.2, 0.3]
    assert both.first_latency == [0.1, 0.2]  # each run's first event after start
    assert both.peak_rss_mb == [50, 70]
