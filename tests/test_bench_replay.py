"""bench.speculative_replay's replay: the drafter and planner over fixed answers, no model."""

from __future__ import annotations

from bench.speculative_replay import Answer, replay, step_ms

COSTS = {1: 10.0, 2: 15.0, 4: 22.0, 8: 38.0, 16: 70.0}


def test_step_costs_are_measured_interpolated_and_extended() -> None:
    assert step_ms(COSTS, 4) == 22.0
    assert step_ms(COSTS, 3) == 18.5
    assert step_ms(COSTS, 24) == 70.0 + 4.0 * 8


def test_a_copied_document_is_drafted_and_a_deviation_is_picked_up_again() -> None:
    doc = list(range(1000, 1200))
    # the answer copies the document but changes every 40th token
    answer = [999 if i and i % 40 == 0 else t for i, t in enumerate(doc)]
    answers = [Answer([1, 2, 3, *doc, 4], answer)]
    off = replay(answers, COSTS, "off")
    long = replay(answers, COSTS, "long")
    resync = replay(answers, COSTS, "resync")
    assert off == (len(answer), 10.0 * len(answer), 0, 0)
    for tokens, ms, drafted, accepted in (long, resync):
        assert tokens == len(answer) and 0 < accepted <= drafted
    # after each changed token, long matches wait for 16 new tokens; the look-up near
    # the copy needs 4, so more is accepted and the same answer takes less time
    assert resync[3] > long[3] and resync[1] < long[1] < off[1]
