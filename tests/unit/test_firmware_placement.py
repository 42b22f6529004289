"""The placement engine: the board-card condition, strategies, dwell/hysteresis."""

import pytest
from firmware.placement import CARD, HOST, Move, PlacementEngine
from firmware.policy import RESOURCES, parse_policy

THRESHOLDS = {"custom_hw": 80, "processor": 75, "memory": 85, "network": 70}


def policy(tasks, strategy="priority", dwell_us=200.0):
    lines = ["[thresholds]"] + [f"{k} = {v}" for k, v in THRESHOLDS.items()]
    lines += ["[placement]", f'strategy = "{strategy}"', f"dwell_us = {dwell_us}"]
    for name, index, prio, cost in tasks:
        cost_s = ", ".join(f"{k} = {v}" for k, v in cost.items())
        lines += ["[[task]]", f'name = "{name}"', f"index = {index}", f"priority = {prio}",
                  f"cost = {{ {cost_s} }}"]
    return parse_policy("\n".join(lines) + "\n", source="test.toml")


def util(**over):
    base = {r: 10 for r in RESOURCES}
    base.update(over)
    return base


ONE = [("qos", 0, 3, {"custom_hw": 5, "processor": 10, "memory": 5, "network": 0})]


# -- the condition with one task ---------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["priority", "fit"])
@pytest.mark.parametrize("resource", RESOURCES)
def test_one_resource_above_moves_the_task(resource, strategy):
    eng = PlacementEngine(policy(ONE, strategy))
    assert eng.step(0.0, util(**{resource: THRESHOLDS[resource] + 1})) == [Move("qos", HOST)]
    assert eng.pending == {"qos": Move("qos", HOST)}
    assert eng.placement == {"qos": CARD}       # not until the mover commits


@pytest.mark.parametrize("resource", RESOURCES)
def test_one_resource_at_threshold_stays(resource):
    eng = PlacementEngine(policy(ONE))
    assert eng.step(0.0, util(**{resource: THRESHOLDS[resource]})) == []
    assert eng.step(20.0, util(**THRESHOLDS)) == []       # all four exactly at threshold
    assert eng.placement == {"qos": CARD}


def test_no_second_move_while_pending_and_commit():
    eng = PlacementEngine(policy(ONE))
    hot = util(processor=90)
    assert eng.step(0.0, hot) == [Move("qos", HOST)]
    for t in range(1, 10):
        assert eng.step(t * 20.0, hot) == []
    eng.commit(Move("qos", HOST))
    assert eng.placement == {"qos": HOST} and not eng.pending
    assert eng.step(500.0, hot) == []               # nothing left on the card


def test_abort_retries_after_dwell():
    eng = PlacementEngine(policy(ONE, dwell_us=200.0))
    hot = util(processor=90)
    assert eng.step(0.0, hot) == [Move("qos", HOST)]
    eng.abort(Move("qos", HOST), 50.0)
    assert eng.placement == {"qos": CARD} and not eng.pending
    assert eng.step(100.0, hot) == []
    assert eng.step(250.0, hot) == [Move("qos", HOST)]


# -- moving back: dwell and hysteresis ----------------------------------------------------------
def to_host(eng):
    for name in eng.placement:
        eng.placement[name] = HOST


def test_back_to_card_only_after_dwell():
    eng = PlacementEngine(policy(ONE, dwell_us=200.0))
    to_host(eng)
    cool = util()
    for t in range(0, 200, 20):
        assert eng.step(float(t), cool) == [], t
    assert eng.step(200.0, cool) == [Move("qos", CARD)]
    eng.commit(Move("qos", CARD))
    assert eng.placement == {"qos": CARD}


def test_dwell_restarts_when_condition_breaks():
    eng = PlacementEngine(policy(ONE, dwell_us=200.0))
    to_host(eng)
    assert eng.step(0.0, util()) == []
    assert eng.step(180.0, util()) == []
    assert eng.step(190.0, util(network=71)) == []     # breaks: the timer restarts
    assert eng.step(200.0, util()) == []
    assert eng.step(390.0, util()) == []
    assert eng.step(400.0, util()) == [Move("qos", CARD)]


def test_back_only_if_its_cost_fits():
    eng = PlacementEngine(policy(ONE, dwell_us=0.0))
    to_host(eng)
    assert eng.step(0.0, util(processor=66)) == []      # 66 + 10 > 75
    assert eng.step(20.0, util(processor=65)) == [Move("qos", CARD)]   # 65 + 10 == 75


@pytest.mark.parametrize("strategy", ["priority", "fit"])
@pytest.mark.parametrize("period", [1, 2, 3, 7])
def test_flapping_load_is_bounded_by_dwell(strategy, period):
    """Load crossing the threshold every ``period`` polls: a task comes back only after the
    condition held for a full dwell, so moves back <= elapsed / dwell, and none at all while
    the load crosses more often than the dwell."""
    dwell, poll = 200.0, 20.0
    eng = PlacementEngine(policy(ONE, strategy, dwell_us=dwell))
    moves_back, moves_out, met_since = 0, 0, None
    steps = 500
    for i in range(steps):
        now = i * poll
        hot = (i // period) % 2 == 0
        u = util(processor=90 if hot else 40)
        met_since = None if hot else (now if met_since is None else met_since)
        for m in eng.step(now, u):
            eng.commit(m)            # an instant mover: the worst case for flapping
            if m.to == CARD:
                moves_back += 1
                assert now - met_since >= dwell
                met_since = now
            else:
                moves_out += 1
    if period * poll <= dwell:
        assert moves_back == 0
    assert moves_back <= steps * poll / dwell
    assert moves_out <= moves_back + 1


def test_one_back_per_step_and_per_dwell():
    tasks = [("a", 0, 1, {"processor": 5}), ("b", 1, 2, {"processor": 5}),
             ("c", 2, 3, {"processor": 5})]
    eng = PlacementEngine(policy(tasks, dwell_us=100.0))
    to_host(eng)
    back = []
    for i in range(30):
        for m in eng.step(i * 20.0, util(processor=20)):
            back.append((i * 20.0, m.task))
            eng.commit(m)
    assert [name for _, name in back] == ["c", "b", "a"]       # highest priority first
    assert [t for t, _ in back] == [100.0, 200.0, 300.0]


# -- strategies with three tasks -------------------------------------------------------------
THREE = [("low", 0, 1, {"processor": 4}),
         ("big", 1, 2, {"processor": 12, "memory": 2}),
         ("high", 2, 3, {"processor": 3, "network": 1})]


def test_priority_sheds_lowest_priority_first_until_condition_met():
    eng = PlacementEngine(policy(THREE, "priority"))
    # processor 85 vs 75: excess 10. low (4) leaves first, still 81 > 75, then big (12): 69.
    assert eng.step(0.0, util(processor=85)) == [Move("low", HOST), Move("big", HOST)]
    # pending moves count as gone: nothing more while they run
    assert eng.step(20.0, util(processor=85)) == []


def test_fit_sheds_the_task_that_covers_the_excess():
    eng = PlacementEngine(policy(THREE, "fit"))
    assert eng.step(0.0, util(processor=85)) == [Move("big", HOST)]


def test_fit_ties_go_to_lower_priority():
    tasks = [("a", 0, 5, {"processor": 20}), ("b", 1, 1, {"processor": 15}),
             ("c", 2, 3, {"processor": 2})]
    eng = PlacementEngine(policy(tasks, "fit"))
    # excess 10: a and b both cover it fully; b has the lower priority
    assert eng.step(0.0, util(processor=85)) == [Move("b", HOST)]


def test_priority_excess_beyond_all_costs_moves_everything():
    for strategy in ("priority", "fit"):
        eng = PlacementEngine(policy(THREE, strategy))
        moves = eng.step(0.0, util(processor=100))
        assert sorted(m.task for m in moves) == ["big", "high", "low"]
        assert all(m.to == HOST for m in moves)


def test_fit_moves_tasks_without_cost_when_nothing_else_helps():
    eng = PlacementEngine(policy(THREE, "fit"))
    # custom_hw over: no task has a custom_hw cost; they leave lowest priority first
    assert [m.task for m in eng.step(0.0, util(custom_hw=95))] == ["low", "big", "high"]


@pytest.mark.parametrize("strategy,first", [("priority", "high"), ("fit", "big")])
def test_strategies_bring_back(strategy, first):
    eng = PlacementEngine(policy(THREE, strategy, dwell_us=0.0))
    to_host(eng)
    assert eng.step(0.0, util(processor=60)) == [Move(first, CARD)]


def test_priority_and_fit_differ_on_return_when_the_big_one_does_not_fit():
    tasks = [("a", 0, 1, {"processor": 8}), ("b", 1, 2, {"processor": 3})]
    for strategy, want in (("priority", "b"), ("fit", "a")):
        eng = PlacementEngine(policy(tasks, strategy, dwell_us=0.0))
        to_host(eng)
        assert eng.step(0.0, util(processor=65)) == [Move(want, CARD)], strategy
        # at 72 only b fits (72 + 3 == 75; 72 + 8 > 75): both strategies take it
        eng2 = PlacementEngine(policy(tasks, strategy, dwell_us=0.0))
        to_host(eng2)
        assert eng2.step(0.0, util(processor=72)) == [Move("b", CARD)], strategy


def test_nothing_comes_back_while_a_move_is_pending():
    eng = PlacementEngine(policy(THREE, dwell_us=0.0))
    to_host(eng)
    assert eng.step(0.0, util()) == [Move("high", CARD)]
    assert eng.step(20.0, util()) == []
    eng.commit(Move("high", CARD))
    assert eng.step(40.0, util()) == [Move("big", CARD)]


def test_saved_placement_is_restored():
    eng = PlacementEngine(policy(THREE), {"big": HOST, "gone": HOST, "low": "moon"})
    assert eng.placement == {"low": CARD, "big": HOST, "high": CARD}
