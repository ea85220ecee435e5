"""LockstepEngine's step logic with stand-ins for the group and the engine: a voted step runs
the inner engine or joins idle, a step that runs a partial forward is an error, and the
executor contract is passed through."""
from dataclasses import dataclass, field

import pytest

from tensorrt_llm_dwdp.engine.executor import EngineStats
from tensorrt_llm_dwdp.moe.configurable_moe import ConfigurableMoE
from tensorrt_llm_dwdp.parallel.lockstep import LockstepEngine


@dataclass
class FakeEp:
    rank: int = 0
    calls: int = 0


@dataclass
class FakeGroup:
    votes: list          # what any() answers, in order
    ep: FakeEp = field(default_factory=FakeEp)
    asked: list = field(default_factory=list)

    def any(self, flag):
        self.asked.append(flag)
        return self.votes.pop(0)


class FakeMoe:
    def __init__(self, ep):
        self.ep = ep

    def join_idle(self):
        self.ep.calls += 1


class FakeEngine:
    def __init__(self, ep, layers_per_step, work):
        self.ep, self.layers, self.work = ep, layers_per_step, work
        self.steps = 0
        self.stats, self.dwdp, self.device = EngineStats(), None, "cpu"

    def has_work(self):
        return self.work > 0

    def step(self):
        self.steps += 1
        self.work -= 1
        self.ep.calls += self.layers
        return [f"event{self.steps}"]

    def add_request(self, r):
        self.work += 1


def test_busy_idle_and_quiet_steps():
    group = FakeGroup(votes=[True, True, False])
    engine = FakeEngine(group.ep, layers_per_step=2, work=1)
    lock = LockstepEngine(engine, group, [FakeMoe(group.ep), FakeMoe(group.ep)], idle_sleep_s=0)
    assert lock.has_work() is True and lock.stats is engine.stats and lock.dwdp is None
    assert lock.step() == ["event1"]                  # my work
    assert lock.step() == [] and lock.idle_steps == 1  # a peer's work: joined with an empty batch
    assert group.ep.calls == 4
    assert lock.step() == [] and lock.group_steps == 2  # nobody: no step at all
    assert group.asked == [True, False, False]
    # the idle join is a step of this rank's (GPU time for its peers' rows): logged as one
    (idle,) = engine.stats.steps
    assert idle.kind == "idle" and idle.tokens == 0 and idle.device_s is None and idle.wall_s >= 0
    assert engine.stats.idle_steps == 1 and engine.stats.step_count == 1
    assert lock.vote_seconds >= 0


def test_a_step_with_a_partial_forward_breaks_lockstep():
    group = FakeGroup(votes=[True])
    engine = FakeEngine(group.ep, layers_per_step=1, work=1)
    lock = LockstepEngine(engine, group, [FakeMoe(group.ep), FakeMoe(group.ep)], idle_sleep_s=0)
    with pytest.raises(RuntimeError, match="ran 1 MoE layer calls, expected 0 or 2"):
        lock.step()


def test_a_failed_step_stops_the_rank_for_good():
    group = FakeGroup(votes=[True, True])
    engine = FakeEngine(group.ep, layers_per_step=2, work=2)

    def fail():
        raise ValueError("CUDA out of memory")
    engine.step = fail
    lock = LockstepEngine(engine, group, [FakeMoe(group.ep), FakeMoe(group.ep)], idle_sleep_s=0)
    with pytest.raises(RuntimeError, match="cannot go on") as info:
        lock.step()
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(RuntimeError, match="out of step since a failed step"):
        lock.step()
    assert group.votes == [True]   # the second call did not vote


def test_dwdp_and_ep_are_exclusive_in_a_layer():
    with pytest.raises(ValueError, match="pass dwdp or ep, not both"):
        ConfigurableMoE(8, 2, 32, 16, dwdp=object(), ep=object())
