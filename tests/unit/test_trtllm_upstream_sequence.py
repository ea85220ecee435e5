"""The adapter inside the fake TensorRT-LLM (tests/trtllm_fake), one process, upstream's call
order (tensorrt_llm_dwdp/trtllm/contract.py). One test per finding of the review against
upstream's source (a-h); the multi-process ones (the sub-communicator in a larger world, 2 ranks
bitwise equal to one) are in tests/multirank/test_trtllm_fake_executor.py.

Where a test needs a manager in one process it uses :class:`OneProcessManager`: our real step
protocol (``StepSequencer``) over composite views assembled from the checkpoint, the rows this
rank owns being the tensors it registered (so a wrong binding shows in the logits).
"""
import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from tensorrt_llm_dwdp.comm.base import GroupComm
from tensorrt_llm_dwdp.dwdp.config import DwdpConfigError
from tensorrt_llm_dwdp.dwdp.errors import DwdpMismatchError, DwdpStateError
from tensorrt_llm_dwdp.dwdp.stats import StatsRecorder
from tensorrt_llm_dwdp.dwdp.steps import StepSequencer
from tensorrt_llm_dwdp.trtllm import active_installation, expert_tensors, install, manager_class
from tensorrt_llm_dwdp.trtllm import contract
from tensorrt_llm_dwdp.trtllm.activate import (ENV_OPTIONS, ENV_SWITCH, PTH_LINE, install_pth,
                                               options_from_environment)
from tensorrt_llm_dwdp.trtllm.group import group_members

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAKE = os.path.join(ROOT, "tests", "trtllm_fake")
if FAKE not in sys.path:
    sys.path.insert(0, FAKE)

from tensorrt_llm._torch.models.modeling_toy_moe import (ToyMoeConfig, ToyMoeForCausalLM,  # noqa: E402
                                                         toy_checkpoint)
from tensorrt_llm._torch.pyexecutor import dwdp as upstream_dwdp  # noqa: E402
from tensorrt_llm._torch.pyexecutor import py_executor_creator  # noqa: E402
from tensorrt_llm._torch.pyexecutor.model_engine import ScheduledBatch  # noqa: E402
from tensorrt_llm._torch.distributed import MPIDist  # noqa: E402
from tensorrt_llm.llmapi.llm_args import DwdpConfig, TorchLlmArgs  # noqa: E402
from tensorrt_llm.mapping import Mapping  # noqa: E402

S, W, P = 2, 4, 2
CONFIG = ToyMoeConfig(num_experts=W + (S - 1) * P)
CHECKPOINT = toy_checkpoint(CONFIG, seed=3)
ARGS = TorchLlmArgs(dwdp_config=DwdpConfig(dwdp_size=S, num_groups=1, num_experts_per_worker=W,
                                           num_prefetch_experts=P))


class FakeComm(GroupComm):
    """A group communicator that records being closed (one process plays rank ``rank``)."""

    def __init__(self, rank: int = 0, size: int = S) -> None:
        self.rank, self.size, self.group_id, self.closed = rank, size, 0, False

    def allgather(self, obj, timeout_s, what):
        raise AssertionError("no collective in a one-process test")

    def close(self) -> None:
        self.closed = True


class OneProcessManager:
    """Our step protocol over composite views built in this process (see module docstring)."""

    def __init__(self, config, num_experts, comm) -> None:
        self.start = config.num_prefetch_experts * comm.rank
        self.w = config.num_experts_per_worker
        self.comm, self.own, self.views, self.closed = comm, {}, {}, False
        self.seq = None

    def allocate(self, shape, dtype):
        return torch.zeros(shape, dtype=dtype)

    def register_layer(self, layer, tensors) -> None:
        self.own[layer] = dict(tensors)

    def exchange(self) -> None:
        layers = sorted(self.own)
        self.seq = StepSequencer(layers, None, StatsRecorder(layers))
        for layer, tensors in self.own.items():
            self.views[layer] = {}
            for name, mine in tensors.items():
                full = CHECKPOINT[f"experts.{layer}.{name}"].clone()
                full[self.start:self.start + self.w] = mine
                self.views[layer][name] = full

    def start_step(self) -> None:
        if self.seq.mid_step_layer() is not None:
            raise DwdpStateError("start_step() mid-step")
        self.seq.fill()

    def abort_step(self) -> None:
        self.seq.abort()

    def composite_weights(self, layer):
        self.seq.acquire("composite_weights", layer)
        return self.views[layer]

    def done(self, layer) -> None:
        self.seq.done(layer)

    def close(self) -> None:
        self.closed = True
        self.comm.close()


@pytest.fixture
def adapter():
    """Install the adapter with one-process parts; undo it and upstream's global after."""
    comms = []

    def comm_factory(config):
        comms.append(FakeComm())
        return comms[-1]

    installation = install(manager_factory=OneProcessManager, comm_factory=comm_factory)
    installation.comms = comms
    yield installation
    installation.uninstall()
    upstream_dwdp.set_global_dwdp_manager(None)


def _build(mapping):
    return ToyMoeForCausalLM(CONFIG, mapping)


def _reference(batches):
    """The same requests on one rank holding every expert (no DWDP)."""
    return py_executor_creator.create_py_executor(TorchLlmArgs(), _build, CHECKPOINT)._executor_loop(batches)


def _ids(*sizes):
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, CONFIG.vocab_size, (n,), generator=g) for n in sizes]


# -------------------------------------------------------------------------------- a, b
def test_a_keyword_construction_as_py_executor_creator_does_it(adapter):
    assert py_executor_creator.DwdpManager is adapter.cls is upstream_dwdp.DwdpManager
    mapping = Mapping(world_size=2, rank=0, dwdp_size=2, dwdp_rank=0)
    manager = upstream_dwdp.DwdpManager(config=ARGS.dwdp_config, dist=MPIDist(mapping),
                                        mapping=mapping)
    assert (manager.dwdp_size, manager.dwdp_rank, manager.num_groups) == (2, 0, 1)
    assert manager.is_enabled() and manager.mapping is mapping
    manager.cleanup()
    assert adapter.comms[0].closed                     # setup never ran: the comm still closes


def test_a_mapping_that_disagrees_with_the_group_is_named(adapter):
    mapping = Mapping(world_size=2, rank=1, dwdp_size=2, dwdp_rank=1)
    with pytest.raises(DwdpMismatchError, match="mapping.dwdp_rank is 1"):
        upstream_dwdp.DwdpManager(config=ARGS.dwdp_config, dist=MPIDist(mapping), mapping=mapping)
    assert adapter.comms[0].closed


def test_b_layout_attributes_read_while_the_model_is_built(adapter):
    mapping = Mapping(world_size=2, rank=0, dwdp_size=2, dwdp_rank=0)
    manager = upstream_dwdp.DwdpManager(config=ARGS.dwdp_config, dist=MPIDist(mapping),
                                        mapping=mapping)
    for name in contract.attributes_read_at_construction():
        assert isinstance(getattr(manager, name), int), name
    with manager:
        model = _build(mapping)                 # MoE._init_dwdp_expert_layout reads them
        for i in CONFIG.moe_layers:
            backend = model.layers[i].mlp.experts.backend
            assert (backend.slot_start, backend.expert_size_per_partition) == (0, W)
            assert backend.w3_w1_weight.shape[0] == W
        assert manager.registered_layers == list(CONFIG.moe_layers)
    assert upstream_dwdp.get_global_dwdp_manager() is None


# -------------------------------------------------------------------------------- c, d
def test_c_d_warmup_skipped_layers_and_a_failed_step(adapter):
    warmup = [ScheduledBatch(t) for t in _ids(4, 3)]
    steps = [ScheduledBatch(_ids(7)[0]), ScheduledBatch(_ids(5)[0], frozenset({2})),
             ScheduledBatch(_ids(CONFIG.max_positions + 1)[0]), ScheduledBatch(_ids(6)[0]),
             ScheduledBatch(_ids(4)[0], frozenset({5})), ScheduledBatch(_ids(8)[0])]
    expected = _reference(steps)                       # built before the manager registers
    executor = py_executor_creator.create_py_executor(ARGS, _build, CHECKPOINT, warmup)
    counts = executor.dwdp_manager.steps.counts
    assert counts.cold_binds == 1                            # warm-up bound before any prefetch
    results = executor._executor_loop(steps)
    assert isinstance(results[2], ValueError) and isinstance(expected[2], ValueError)
    for i in (0, 1, 3, 4, 5):
        assert torch.equal(results[i], expected[i]), i
    assert (counts.skipped, counts.aborted) == (1, 2), counts
    inner = executor.dwdp_manager.manager
    executor.shutdown()
    assert inner.closed and upstream_dwdp.get_global_dwdp_manager() is None


def test_record_without_its_bind_is_named(adapter):
    executor = py_executor_creator.create_py_executor(ARGS, _build, CHECKPOINT)
    manager = executor.dwdp_manager
    with pytest.raises(RuntimeError, match=r"record_compute_and_prefetch_next\(2\) without"):
        manager.record_compute_and_prefetch_next(2)
    with pytest.raises(KeyError, match="layer 3 was not added"):
        manager.wait_and_bind(executor.model_engine.model.layers[1].mlp.experts.backend, 3)
    executor.shutdown()


class CallRecorder:
    """A manager that records what the adapter asks of it."""

    def __init__(self) -> None:
        self.calls = []

    def start_step(self) -> None:
        self.calls.append("start")

    def abort_step(self) -> None:
        self.calls.append("abort")

    def composite_weights(self, layer):
        self.calls.append(f"w{layer}")
        return {}

    def done(self, layer) -> None:
        self.calls.append(f"d{layer}")


def test_step_adapter_maps_upstream_calls_onto_our_order():
    from tensorrt_llm_dwdp.trtllm import StepAdapter

    m = CallRecorder()
    a = StepAdapter(m, [3, 5, 7])
    for layer in (3, 5, 7):                      # warm-up: no prefetch_first_layers before
        a.bind(layer)
        a.record(layer)
    a.start_step()
    a.bind(5)                                    # layer 3 left out
    a.record(5)
    a.bind(7)                                    # the forward raises here: no record
    a.start_step()                               # the next step abandons this one
    a.bind(3)
    a.bind(3)                                    # bound again (a retried forward)
    a.record(3)
    assert m.calls == ["start", "w3", "d3", "w5", "d5", "w7", "d7",
                       "start", "d3", "w5", "d5", "w7",
                       "abort", "start", "w3", "w3", "d3"]
    c = a.counts
    assert (c.steps, c.cold_binds, c.skipped, c.aborted) == (3, 1, 1, 1)
    a.bind(3)                                    # a new forward before layer 5: abandon
    assert m.calls[-3:] == ["abort", "start", "w3"] and a.counts.cold_binds == 2
    with pytest.raises(ValueError, match="at least one"):
        StepAdapter(m, [])


# -------------------------------------------------------------------------------- e
def _python(code: str, env: dict, site_dir) -> str:
    full = dict(os.environ)
    full.pop(ENV_SWITCH, None)
    full.update(env)
    full["PYTHONPATH"] = os.pathsep.join([FAKE, ROOT, full.get("PYTHONPATH", "")])
    prog = f"import site; site.addsitedir({str(site_dir)!r})\n" + code
    proc = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True,
                          env=full, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


CHECK_PATCH = (
    "from tensorrt_llm._torch.pyexecutor import py_executor_creator as c, dwdp as d\n"
    "print(d.DwdpManager.__name__, c.DwdpManager is d.DwdpManager)\n")


def test_e_the_switch_activates_a_fresh_process(tmp_path):
    assert install_pth(tmp_path).read_text() == PTH_LINE
    on = {ENV_SWITCH: "1", ENV_OPTIONS: json.dumps({"peer_timeout_s": 7})}
    assert _python(CHECK_PATCH, on, tmp_path).split() == ["TrtllmDwdpManager", "True"]
    assert _python(CHECK_PATCH, {}, tmp_path).split() == ["DwdpManager", "True"]
    # imported before the switch ran (a worker that imports tensorrt_llm first): still patched
    late = ("import tensorrt_llm._torch.pyexecutor.py_executor_creator\n"
            "from tensorrt_llm_dwdp.trtllm.activate import from_environment\n"
            "from_environment()\n" + CHECK_PATCH)
    assert _python(late, on, tmp_path).split()[-2:] == ["TrtllmDwdpManager", "True"]


def test_e_bad_options_stop_tensorrt_llm_in_a_fresh_process(tmp_path):
    """A worker started with the switch on and bad options must not serve with upstream's
    manager: its first import of tensorrt_llm fails, naming the variable; other imports work."""
    install_pth(tmp_path)
    bad = {ENV_SWITCH: "1", ENV_OPTIONS: '{"peer_timeout": 3}'}
    assert _python("import json; print('ok')", bad, tmp_path).split() == ["ok"]
    code = ("try:\n    import tensorrt_llm._torch.pyexecutor.py_executor_creator\n"
            "except ImportError as exc:\n    print('refused:', exc)\n")
    out = _python(code, bad, tmp_path)
    assert out.startswith("refused:") and ENV_OPTIONS in out and "unknown key" in out, out


def test_e_the_switch_command_installs_shows_and_removes(tmp_path, capsys):
    """``python -m tensorrt_llm_dwdp trtllm-switch`` (and the module entry that forwards to it)."""
    from tensorrt_llm_dwdp.cli import main as cli_main
    from tensorrt_llm_dwdp.trtllm.activate import PTH_NAME, main as activate_main

    site = ["--site-dir", str(tmp_path)]
    assert cli_main(["trtllm-switch", "install-pth", *site]) == 0
    assert (tmp_path / PTH_NAME).read_text() == PTH_LINE
    assert activate_main(["status", *site]) == 0
    assert f"{PTH_NAME} in {tmp_path}: yes" in capsys.readouterr().out
    assert cli_main(["trtllm-switch", "remove-pth", *site]) == 0
    assert not (tmp_path / PTH_NAME).exists()
    assert cli_main(["trtllm-switch", "remove-pth", *site]) == 0
    assert f"no {PTH_NAME} in {tmp_path}" in capsys.readouterr().out


def test_e_bad_options_are_named():
    with pytest.raises(ValueError, match="unknown key"):
        options_from_environment({ENV_OPTIONS: '{"peer_timeout": 3}'})
    with pytest.raises(ValueError, match="belong in TensorRT-LLM's dwdp_config"):
        options_from_environment({ENV_OPTIONS: '{"dwdp_size": 4}'})
    with pytest.raises(ValueError, match="not JSON"):
        options_from_environment({ENV_OPTIONS: "peer_timeout_s=3"})
    assert options_from_environment({}) == {}


def test_install_twice_and_upstream_keys_in_options_are_refused(adapter):
    with pytest.raises(RuntimeError, match="already installed"):
        install()
    assert active_installation() is adapter
    adapter.uninstall()
    with pytest.raises(ValueError, match="dwdp_size"):
        install(options={"dwdp_size": 2})
    assert active_installation() is None


# -------------------------------------------------------------------------------- f
@pytest.mark.parametrize("rank, size, members", [(0, 2, [0, 1]), (1, 4, [0, 1]), (3, 4, [2, 3])])
def test_f_group_members_inside_a_larger_world(rank, size, members):
    groups = 2 if rank == 3 else 1
    cfg = ARGS.dwdp_config
    from tensorrt_llm_dwdp.trtllm.config import from_trtllm

    ours = from_trtllm({**cfg.__dict__, "num_groups": groups})
    assert group_members(ours, rank, size) == members


def test_f_bad_worlds_are_named():
    from tensorrt_llm_dwdp.trtllm.config import from_trtllm

    ours = from_trtllm({**ARGS.dwdp_config.__dict__, "num_groups": 2})
    with pytest.raises(DwdpConfigError, match="MPI world size is only 3"):
        group_members(ours, 0, 3)
    with pytest.raises(DwdpConfigError, match="world rank 4 is in no DWDP group"):
        group_members(ours, 4, 6)


# -------------------------------------------------------------------------------- g
def test_g_a_model_built_without_dwdp_is_refused(adapter):
    import tensorrt_llm_dwdp.trtllm as trtllm

    assert not hasattr(trtllm, "attach")
    model = _build(Mapping())                                 # no manager active: all E experts
    model.load_weights(CHECKPOINT)
    mapping = Mapping(world_size=2, rank=0, dwdp_size=2, dwdp_rank=0)
    manager = upstream_dwdp.DwdpManager(config=ARGS.dwdp_config, dist=MPIDist(mapping),
                                        mapping=mapping)
    for i in CONFIG.moe_layers:
        manager.add_layer(layer_idx=i)
    with pytest.raises(RuntimeError, match=r"holds experts \[0, 6\).*built without this DWDP"):
        manager.setup(model)
    assert manager.manager is None
    manager.cleanup()


# -------------------------------------------------------------------------------- h
def test_h_duplicate_add_layer_warns_and_name_rule_finds_per_expert_params(adapter, caplog):
    mapping = Mapping(world_size=2, rank=0, dwdp_size=2, dwdp_rank=0)
    with upstream_dwdp.DwdpManager(config=ARGS.dwdp_config, dist=MPIDist(mapping),
                                   mapping=mapping) as manager:
        model = _build(mapping)
        with caplog.at_level(logging.WARNING):
            manager.add_layer(layer_idx=1)
        assert "layer 1 already registered" in caplog.text
        assert manager.registered_layers == list(CONFIG.moe_layers)
    backend = model.layers[1].mlp.experts.backend
    names = set(expert_tensors(backend))
    assert "fc2_dequant" in names and "fc31_input_scale" not in names


# -------------------------------------------------------------------------------- contract
def test_contract_names_the_source_of_every_entry():
    for dep in contract.DEPENDENCIES:
        assert dep.file.startswith(("tensorrt_llm/", "tests/")), dep
        assert dep.source in ("file", "test", "diff", "doc"), dep
        assert dep.read_at == "content" or dep.read_at.startswith("PR #") or \
            len(dep.read_at) == 40, dep
    methods = {d.name.rsplit(".", 1)[-1] for d in contract.DEPENDENCIES if d.kind == "method"}
    for name in methods:
        assert callable(getattr(manager_class(), name)), name


def _resolve(dotted: str):
    """``tensorrt_llm.<dotted>`` in the fake: the longest importable module, then attributes;
    None when the fake lacks it (the test lists the only names allowed to be absent)."""
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module("tensorrt_llm." + ".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr, None)
        return obj
    return None


def test_the_fake_stands_in_for_every_upstream_name_it_claims():
    resolved = {d.name: _resolve(d.name) for d in contract.DEPENDENCIES}
    missing = sorted(n for n, obj in resolved.items() if obj is None)
    assert missing == ["_torch.modules.dwdp.setup._allgather_expert_scales",
                       "_torch.modules.dwdp.setup.fixup_moe_backends"], missing
    for dep in contract.DEPENDENCIES:
        if dep.kind == "attribute" and dep.name.endswith(("Mapping", "DwdpConfig")):
            cls = resolved[dep.name]
            instance = cls()
            for attr in dep.signature.split(", "):
                assert hasattr(instance, attr), (dep.name, attr)
