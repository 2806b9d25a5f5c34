"""The decoder's blocks as C calls (backends/cpu/fused.py, kernels/cpu_block.c): a one-token step through
them equals the module path, with hooks at every point, across cache swaps and replaced weights,
and for blocks the C path cannot take."""

import contextlib
import copy
import ctypes
import dataclasses
import shutil
import threading
import time

import pytest
import torch

from musicsteer.backends.cpu.fused import (
    FusedStack,
    fusable,
    fuse_blocks,
    unfuse_blocks,
)
from musicsteer.backends.cpu.linear import Linear, fuse_activations, optimize_for_cpu
from musicsteer.kernels import cpu
from musicsteer.model.config import PRESETS, ModelConfig
from musicsteer.model.musicgen import MusicGen

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler on this machine: the CPU kernels cannot be built")
needs_vnni = pytest.mark.skipif(not cpu.has_int8(), reason="this CPU or build has no AVX-512 VNNI for the int8 kernel")

# d=256, ffn=1024: 3 MB of float32 weights per block, enough for the C path to use every thread
WIDE = ModelConfig(hidden=256, layers=3, heads=4, ffn=1024, vocab=64, codebooks=4, text_hidden=32,
                   max_positions=64, name="wide")
ODD = ModelConfig(hidden=96, layers=2, heads=2, ffn=192, vocab=40, codebooks=2, text_hidden=24,
                  max_positions=64, activation="gelu_tanh", name="odd")  # 48-wide heads


def packed(cfg: ModelConfig, seed: int = 0, int8: bool = False) -> MusicGen:
    model = MusicGen.random(cfg, seed=seed)
    if int8:
        from musicsteer.backends.cpu.int8 import quantize_int8

        quantize_int8(model)
        model.cache_dtype = torch.bfloat16
    else:
        optimize_for_cpu(model, packed=True)
    fuse_activations(model)
    return model


def condition(model: MusicGen, rows: int, max_len: int = 40, seed: int = 0) -> None:
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    model.setup_caches(rows, max_len=max_len, max_text=9)
    text, mask = torch.randn(rows, 7, cfg.text_hidden, generator=g), torch.ones(rows, 7)
    mask[-1, 4:] = 0
    model.set_condition(text, mask)


def steps(model: MusicGen, fused: bool, rows: int = 2, n: int = 12, seed: int = 0, hidden: bool = False):
    """Logits (or final hidden states) of `n` one-token steps after a 5-position prompt."""
    condition(model, rows, seed=seed)
    if fused:
        assert fuse_blocks(model) > 0
    else:
        unfuse_blocks(model)
    g = torch.Generator().manual_seed(seed + 1)
    codes = torch.randint(0, model.cfg.vocab, (rows, model.cfg.codebooks, 5 + n), generator=g)
    out = []
    with torch.no_grad():
        model.prefill(codes[..., :5])
        for t in range(5, 5 + n):
            pos = torch.tensor([t])
            if hidden:
                out.append(model.hidden_states(codes[..., t:t + 1], pos, kv_len=t + 1))
            else:
                out.append(model.step(codes[..., t:t + 1], pos, kv_len=t + 1))
    return torch.stack(out)


@pytest.mark.parametrize("cfg", [PRESETS["tiny"], WIDE, ODD, dataclasses.replace(WIDE, activation="relu")],
                         ids=["tiny", "wide", "odd-heads", "relu"])
@pytest.mark.parametrize("rows", [1, 2, 3])
def test_fused_steps_equal_the_module_path(cfg, rows):
    model = packed(cfg, seed=rows)
    want = steps(model, fused=False, rows=rows)
    got = steps(model, fused=True, rows=rows)
    assert isinstance(model.fused_stack, FusedStack) and len(model.fused_stack) == cfg.layers
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_hooks_run_at_their_points_in_order_and_see_the_same_states():
    model = packed(WIDE, seed=4)
    g = torch.Generator().manual_seed(9)
    direction = torch.randn(WIDE.hidden, generator=g)
    seen: dict[bool, list] = {True: [], False: []}

    def hook(name, scale):
        def apply(h):
            seen[mode].append((name, h.clone()))
            return h + scale * direction
        return apply

    results = {}
    for mode in (False, True):
        model.clear_hooks()
        model.add_hook("blocks.0.out", hook("0.out", 0.5))  # a run of one block, then the hook
        model.add_hook("blocks.1.attn", hook("1.attn", 0.3))  # three calls for block 1
        model.add_hook("blocks.1.cross", hook("1.cross", -0.2))
        model.add_hook("blocks.1.out", hook("1.out.a", 0.1))
        model.add_hook("blocks.1.out", hook("1.out.b", 0.1))  # hooks at one point keep their order
        results[mode] = steps(model, fused=mode, n=4)
    model.clear_hooks()
    assert [n for n, _ in seen[True]] == [n for n, _ in seen[False]]
    assert [n for n, _ in seen[True]][:5] == ["0.out", "1.attn", "1.cross", "1.out.a", "1.out.b"]
    for (_, a), (_, b) in zip(seen[True], seen[False]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(results[True], results[False], atol=2e-5, rtol=1e-5)
    unhooked = steps(model, fused=True, n=4)
    assert (unhooked - results[True]).abs().max() > 1e-2  # the hooks changed the output


def test_the_fused_step_follows_swapped_caches_and_replaced_weights():
    model = packed(WIDE, seed=5)
    reference = packed(WIDE, seed=5)
    for m in (model, reference):
        condition(m, 2)
    fuse_blocks(model)
    unfuse_blocks(reference)
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, WIDE.vocab, (2, WIDE.codebooks, 8), generator=g)

    def run(m, t):
        with torch.no_grad():
            return m.step(codes[..., t:t + 1], torch.tensor([t]), kv_len=t + 1)

    for t in range(3):
        torch.testing.assert_close(run(model, t), run(reference, t), atol=2e-5, rtol=1e-5)
    # a re-prime swaps in a second set of caches: the C path must write and read the new ones
    for m in (model, reference):
        m.use_caches(m.make_caches(2, 40))
    for t in range(3):
        torch.testing.assert_close(run(model, t), run(reference, t), atol=2e-5, rtol=1e-5)
    assert model.blocks[0].self_attn.cache.k[:, :, :3].abs().sum() > 0
    # new weights in one block (a replaced packed buffer, as load_state_dict does)
    w = torch.randn(WIDE.hidden, WIDE.ffn, generator=g) * 0.05
    for m in (model, reference):
        m.blocks[1].fc2.packed = cpu.pack_f32(w)
        with torch.no_grad():
            m.blocks[2].norm_mlp.weight.mul_(1.5)  # in place: seen through the pointer
            m.blocks[0].norm_self.bias.data = torch.full((WIDE.hidden,), 0.1)  # a new tensor behind it
    torch.testing.assert_close(run(model, 3), run(reference, 3), atol=2e-5, rtol=1e-5)


def test_a_block_the_c_path_cannot_take_runs_through_its_module():
    model = packed(WIDE, seed=6)
    plain = model.blocks[1].fc1
    model.blocks[1].fc1 = Linear(WIDE.hidden, WIDE.ffn, bias=False)
    with torch.no_grad():
        model.blocks[1].fc1.weight.copy_(plain.weight)
    model.blocks[1].fused_act = False
    assert fusable(model.blocks[1]) is not None and fusable(model.blocks[0]) is None
    want = steps(model, fused=False)
    got = steps(model, fused=True)
    assert [f is None for f in model.fused_stack.fused] == [False, True, False]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_positions_outside_the_cache_are_refused():
    model = packed(WIDE, seed=7)
    condition(model, 2, max_len=8)
    fuse_blocks(model)
    codes = torch.zeros(2, WIDE.codebooks, 1, dtype=torch.long)
    with torch.no_grad(), pytest.raises(RuntimeError, match="refused"):
        model.step(codes, torch.tensor([8]), kv_len=9)


def test_a_copy_of_the_decoder_drops_the_fused_stack_and_still_steps():
    model = packed(PRESETS["tiny"], seed=8)
    condition(model, 2)
    fuse_blocks(model)
    twin = copy.deepcopy(model)
    assert twin.fused_stack is None and model.fused_stack is not None
    codes = torch.zeros(2, model.cfg.codebooks, 1, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(twin.step(codes, torch.tensor([0]), kv_len=1),
                                   model.step(codes, torch.tensor([0]), kv_len=1), atol=2e-5, rtol=1e-5)


@needs_vnni
@pytest.mark.parametrize("cfg", [PRESETS["tiny"], WIDE], ids=["tiny", "wide"])
def test_fused_int8_steps_follow_the_module_path(cfg):
    """The int8 path quantizes each product's input as the module path does; its layer norms round
    differently in the last bit, which can move an activation across a quantization step, so the
    check is the first step's states tightly and later logits to within int8 noise."""
    model = packed(cfg, seed=2, int8=True)
    want = steps(model, fused=False, n=1, hidden=True)
    got = steps(model, fused=True, n=1, hidden=True)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    want, got = steps(model, fused=False), steps(model, fused=True)
    assert (got - want).abs().max() < 0.03 * want.abs().max()
    assert model.blocks[0].self_attn.cache.k.dtype == torch.bfloat16


@pytest.mark.parametrize("cfg", [PRESETS["tiny"], WIDE, ODD], ids=["tiny", "wide", "odd-heads"])
def test_fused_steps_over_an_int8_cache_equal_the_module_path(cfg, c_calls):
    """With 8-bit keys and values the C call quantizes each new key and value as QuantizedKVCache does
    and attends over the int8 form, where the module path dequantizes first: equal to float32 rounding."""
    model = packed(cfg, seed=4)
    model.cache_dtype = torch.int8
    want = steps(model, fused=False)
    assert model.blocks[0].self_attn.cache.k.dtype == torch.int8 and c_calls["ms_blocks"] == 0
    got = steps(model, fused=True)
    assert c_calls["ms_blocks"] == 12  # every one-token step took the C call
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


def test_load_model_fuses_the_cpu_float32_and_int8_decoders():
    from musicsteer.model.loading.load import load_model

    assert load_model("tiny").decoder.fused_stack is not None
    if cpu.has_int8():
        assert load_model("tiny", weights="int8").decoder.fused_stack is not None


def count_flushes(monkeypatch) -> list:
    """The (start, end) block runs of every C call the fused stack makes from now on."""
    calls = []
    original = FusedStack._flush

    def counted(self, start, end, *args):
        calls.append((start, end))
        return original(self, start, end, *args)

    monkeypatch.setattr(FusedStack, "_flush", counted)
    return calls


@pytest.mark.parametrize("mode", ["add", "norm", "norm-negative", "clamp"])
def test_steering_runs_inside_the_call_and_equals_the_hook(mode, monkeypatch):
    """A steerer's `out` hooks are applied by the C call itself (one call for the whole steered
    step) and give what the hooks give; strength 0 leaves the step bit-identical. Norm with
    negative strengths summing to -1 (once a division by zero) stays finite."""
    from musicsteer.steering.pack import ConceptPack
    from musicsteer.steering.plan import SteeringSettings, build_steering

    model = packed(WIDE, seed=11)
    names = ["c0", "c1", "c2"]
    pack = ConceptPack.random(names, WIDE, "wide", seed=3)
    steerer, plan = build_steering(model, pack, SteeringSettings(mode=mode.split("-")[0], layers="all"), batch=2)
    strengths = {"add": (4.0, -2.0, 1.0), "norm": (0.5, 0.2, 0.1), "norm-negative": (-0.5, -0.75, 0.25),
                 "clamp": (0.8, 0.5, 1.0)}[mode]
    for n, a in zip(names, strengths):
        plan.set_strength(n, a)
    calls = count_flushes(monkeypatch)
    plain = steps(model, fused=True, n=3)
    with steerer:
        plan.write(0, steerer)
        want = steps(model, fused=False, n=3)
        calls.clear()
        got = steps(model, fused=True, n=3)
        assert calls == [(0, WIDE.layers)] * 3  # steering did not split the run
        assert torch.isfinite(got).all() and torch.isfinite(want).all()
        torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-5)
        assert (got - plain).abs().max() > 1e-2
        for n in names:
            plan.set_strength(n, 0.0)
        plan.write(1, steerer)
        assert torch.equal(steps(model, fused=True, n=3), plain)
    assert steps(model, fused=True, n=3).equal(plain)  # detached: nothing left in the layers


def test_other_out_hooks_beside_steering_run_in_python():
    from musicsteer.steering.pack import ConceptPack
    from musicsteer.steering.plan import SteeringSettings, build_steering

    model = packed(WIDE, seed=12)
    pack = ConceptPack.random(["c0"], WIDE, "wide", seed=4)
    steerer, plan = build_steering(model, pack, SteeringSettings(layers="all"), batch=2)
    plan.set_strength("c0", 3.0)
    seen = []
    with steerer:
        plan.write(0, steerer)
        model.add_hook("blocks.1.out", lambda h: seen.append(h.clone()) or h)  # an observer after steering
        want = steps(model, fused=False, n=2)
        seen_plain = list(seen)
        seen.clear()
        got = steps(model, fused=True, n=2)
    torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-5)
    for a, b in zip(seen, seen_plain, strict=True):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-5)


@pytest.fixture
def c_calls(monkeypatch):
    """Counts of the C library's block entry points called ({'ms_blocks': n, 'ms_block': n}), by
    wrapping the library's own function objects (the stack and blocks pick them up when built)."""
    lib, counts = cpu.library(), {"ms_blocks": 0, "ms_block": 0}
    for name in counts:
        function = getattr(lib, name)

        def counted(*args, _function=function, _name=name):
            counts[_name] += 1
            return _function(*args)

        monkeypatch.setattr(lib, name, counted)
    return counts


def _ablation(model, strengths, seed=0) -> "SteeringHook":  # noqa: F821
    """A steering hook in ablate mode with its own buffers: (rows=2, K) strengths, unit directions."""
    from musicsteer.steering import modes
    from musicsteer.steering.hooks import SteeringHook

    g = torch.Generator().manual_seed(seed)
    K = len(strengths)
    directions = torch.nn.functional.normalize(torch.randn(K, model.cfg.hidden, generator=g), dim=-1)
    alpha = torch.tensor([strengths, strengths], dtype=torch.float32)  # (2, K)
    return SteeringHook(alpha, directions.contiguous(), torch.zeros(K), modes.get("ablate"))


def test_ablate_in_the_call_follows_its_formula_and_is_exact_at_zero(c_calls):
    """Ablation at block 1's output, applied by the C call: what an observer at that point sees
    is x - sum_k a_k <x, v_k> v_k of what it sees unsteered; strength 0 changes no bit."""
    model = packed(WIDE, seed=13)
    seen = []
    observer = lambda h: seen.append(h.clone()) or h  # noqa: E731
    model.add_hook("blocks.1.out", observer)
    plain_logits = steps(model, fused=True, n=3)
    plain = [h for h in seen if h.shape[1] == 1]  # the one-token steps (not the prefill)
    for strengths in ((1.0, 0.0, 0.0), (0.8, -0.5, 0.25), (0.0, 0.0, 0.0)):
        hook = _ablation(model, strengths, seed=2)
        model.add_hook("blocks.1.out", hook)  # attached after the observer: runs before it
        assert model.blocks[1].hooks["out"] == [hook, observer]
        seen.clear()
        c_calls.update(ms_blocks=0, ms_block=0)
        logits = steps(model, fused=True, n=3)
        assert c_calls == {"ms_blocks": 2 * 3, "ms_block": 0}  # blocks 0-1 (steered inside), then block 2
        steered = [h for h in seen if h.shape[1] == 1]
        a, v = hook.alpha[:, None, :].double(), hook.directions.double()  # (2, 1, K), (K, D)
        for x, y in zip(plain, steered, strict=True):
            want = x.double() - (a * (x.double() @ v.T)) @ v
            torch.testing.assert_close(y.double(), want, atol=2e-5, rtol=1e-5)
        if strengths[0] == 1.0:
            assert all(float((y @ hook.directions[0]).abs().max()) < 1e-4 for y in steered)  # removed
        if any(strengths):
            assert (logits - plain_logits).abs().max() > 1e-3
        else:
            assert all(torch.equal(x, y) for x, y in zip(plain, steered)) and torch.equal(logits, plain_logits)
        model.remove_hook("blocks.1.out", hook)


def test_a_meter_attached_before_steering_reads_the_steered_state_in_one_call_up_to_it(c_calls):
    """live/session attaches the meters before the producer attaches steering: the meter still
    reads the steered state, copied by the C call that steers it: the step stays one call."""
    from musicsteer.steering.pack import ConceptPack
    from musicsteer.steering.meters import Meter
    from musicsteer.steering.plan import SteeringSettings, build_steering

    model = packed(WIDE, seed=14)
    pack = ConceptPack.random(["c0", "c1"], WIDE, "wide", seed=5)
    steerer, plan = build_steering(model, pack, SteeringSettings(mode="ablate", layers="all"), batch=2)
    plan.set_strength("c0", 1.0)  # c1 stays at 0: c0's component is then removed exactly
    readings = {}
    for order in ("meter first", "steering first", "module path"):
        meter = Meter(model, plan.names, steerer.directions, plan.scores)
        if order == "meter first":
            meter.attach()
            steerer.attach()
        else:
            steerer.attach()
            meter.attach()
        plan.write(0, steerer)
        for layer in meter.layers:
            assert isinstance(model.blocks[layer].hooks["out"][0], type(steerer._hooks[layer]))
        c_calls.update(ms_blocks=0, ms_block=0)
        steps(model, fused=order != "module path", n=2)
        readings[order] = meter.read()
        # the meters' rows are copied in the call: still one call per step
        assert c_calls == ({"ms_blocks": 2, "ms_block": 0} if order != "module path"
                           else {"ms_blocks": 0, "ms_block": 0})
        meter.detach()
        steerer.detach()
    assert not any(b.hooks for b in model.blocks)
    for name in plan.names:
        assert readings["meter first"][name] == pytest.approx(readings["module path"][name], abs=1e-4)
        assert readings["meter first"][name] == readings["steering first"][name]
    assert readings["meter first"]["c0"] == pytest.approx(0.0, abs=1e-4)  # it read the ablated state
    assert abs(readings["meter first"]["c1"]) > 1e-3


SideJob = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


def side_steps(model: MusicGen, delay_s: float | None, n: int = 6):
    """`steps` with a side job (a Python callback that waits `delay_s`) for thread 0 of every call
    (None: no job); returns (logits, the threads the job ran on)."""
    condition(model, 2)
    assert fuse_blocks(model) > 0
    ran = []

    @SideJob
    def job(_):
        ran.append(threading.get_ident())
        time.sleep(delay_s)

    address = ctypes.cast(job, ctypes.c_void_p).value
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, model.cfg.vocab, (2, model.cfg.codebooks, 5 + n), generator=g)
    out = []
    with torch.no_grad():
        model.prefill(codes[..., :5])
        for t in range(5, 5 + n):
            if delay_s is not None:
                model.fused_stack.side = (address, 0)
            out.append(model.step(codes[..., t:t + 1], torch.tensor([t]), kv_len=t + 1))
            assert model.fused_stack.side is None  # taken by the call
    return torch.stack(out), ran


@pytest.mark.parametrize("steered", [False, True], ids=["plain", "steered"])
def test_a_side_job_on_thread_0_changes_no_bit_wherever_it_joins(steered):
    """ms_blocks_side: thread 0 runs the job while the others start the blocks and joins at a block
    boundary once done (at once, a few blocks in, or never: the blocks are done first). The job runs
    once per call, on the calling thread, and the step's results are the same bits as without it,
    steered in the call or not."""
    from musicsteer.steering.pack import ConceptPack
    from musicsteer.steering.plan import SteeringSettings, build_steering

    cfg = dataclasses.replace(WIDE, layers=8)
    model = packed(cfg, seed=5)
    with contextlib.ExitStack() as stack:
        if steered:
            pack = ConceptPack.random(["c0", "c1"], cfg, "wide", seed=3)
            steerer, plan = build_steering(model, pack, SteeringSettings(mode="norm", layers="all"), batch=2)
            plan.set_strength("c0", 0.4), plan.set_strength("c1", -0.3)
            stack.enter_context(steerer)
            plan.write(0, steerer)
        want, _ = side_steps(model, None)
        for delay in (0.0, 0.0003, 0.002, 0.2):
            got, ran = side_steps(model, delay)
            assert torch.equal(got, want), f"a {delay * 1e3:g} ms job changed the step"
            assert ran == [threading.get_ident()] * 6


def test_a_side_job_runs_even_when_the_call_is_refused():
    model = packed(WIDE, seed=2)
    condition(model, 2)
    fuse_blocks(model)
    ran = []

    @SideJob
    def job(_):
        ran.append(1)

    stack = model.fused_stack
    stack.side = (ctypes.cast(job, ctypes.c_void_p).value, 0)
    with pytest.raises(RuntimeError, match="refused"):
        stack._flush(0, WIDE.layers, torch.zeros(2, 1, WIDE.hidden), pos=1000, kv_len=1001)
    assert ran == [1] and stack.side is None


def test_row_taps_are_copied_inside_the_one_call_and_equal_a_python_observer(monkeypatch):
    """A meter's RowTap at a block's `out` (after in-call steering) is copied by the C call itself:
    a steered, metered step stays one call, and the rows it copies and the logits are the bits a
    Python observer (which splits the call there) sees."""
    from musicsteer.kernels.hook import RowTap
    from musicsteer.steering.pack import ConceptPack
    from musicsteer.steering.plan import SteeringSettings, build_steering

    cfg = dataclasses.replace(WIDE, layers=5)
    model = packed(cfg, seed=7)
    pack = ConceptPack.random(["c0"], cfg, "wide", seed=4)
    steerer, plan = build_steering(model, pack, SteeringSettings(mode="add", layers="all"), batch=2)
    plan.set_strength("c0", 2.0)
    calls = count_flushes(monkeypatch)
    layers = (1, 4)  # inside the stack and its last block
    seen = {}
    with steerer:
        plan.write(0, steerer)
        results = []
        for kind in ("tap", "python"):
            states = torch.zeros(len(layers), cfg.hidden)
            hooks = []
            for i, layer in enumerate(layers):
                if kind == "tap":
                    hook = RowTap(states[i])
                else:
                    def hook(h, i=i, states=states):
                        states[i].copy_(h[0, -1])
                        return h
                model.add_hook(f"blocks.{layer}.out", hook)
                hooks.append((layer, hook))
            calls.clear()
            logits = steps(model, fused=True, n=3)
            seen[kind] = (list(calls), states.clone())
            results.append(logits)
            for layer, hook in hooks:
                model.remove_hook(f"blocks.{layer}.out", hook)
    assert seen["tap"][0] == [(0, cfg.layers)] * 3  # one call per step
    assert len(seen["python"][0]) == 3 * 2  # the observers split it after block 1 and at the end
    assert torch.equal(results[0], results[1])
    assert torch.equal(seen["tap"][1], seen["python"][1]) and seen["tap"][1].abs().sum() > 0
