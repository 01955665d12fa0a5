"""The benchmark's own arithmetic: a wrong machine share would misstate what limits scaling."""

from bench.__main__ import machine_shares


def test_machine_shares_count_all_busy_states_and_steal_once() -> None:
    # /proc/stat order: user nice system idle iowait irq softirq steal guest guest_nice
    before = [100, 0, 50, 1000, 10, 0, 5, 0, 0, 0]
    after = [400, 0, 150, 1400, 30, 0, 25, 20, 40, 0]  # guest time is inside user
    busy, steal = machine_shares(before, after)
    # deltas: user 300, system 100, idle 400, iowait 20, softirq 20, steal 20 -> total 860
    assert busy == (300 + 100 + 20 + 20) / 860
    assert steal == 20 / 860
