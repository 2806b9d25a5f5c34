"""Steering modes as a registry (steering/modes.py): the registry drives the settings'
validation and the CLI's choices, every mode's kernel id has a formula in all three
kernels, and the fourth mode, ablate, follows its formula in the torch reference and the
Triton kernel (under TRITON_INTERPRET=1 on CPU), with strength 0 exactly the identity.
Its C form is tested on the fused blocks in test_fused.py. Negative strengths: what each
mode takes, and norm toward -v without dividing by zero or flipping the sign (reference and
Triton; C in test_fused.py). Also: steering hooks run
before observers at one hook point whatever order they were attached in."""

import subprocess
import sys

import pytest
import torch

from musicsteer.cli import build_parser
from musicsteer.kernels import ABLATE, FORMULAS, KERNEL_IDS, steer_reference
from musicsteer.model.generate import generate
from musicsteer.model.sampling import SamplingSettings
from musicsteer.steering.pack import ConceptPack
from musicsteer.steering import modes
from musicsteer.steering.hooks import STEERING, SteeringHook
from musicsteer.steering.plan import SteeringSettings, build_steering

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
MODE_NAMES = list(modes.names())


def case(B, T, D, K, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(B, T, D, generator=g) * 3).to(dtype)
    alpha = torch.rand(B, K, generator=g)
    alpha[0, 0] = 0.0
    v = torch.nn.functional.normalize(torch.randn(K, D, generator=g), dim=-1).to(dtype)
    c = torch.randn(K, generator=g)
    return [t.to(DEVICE) for t in (h, alpha, v, c)]


def ablated(h, alpha, v):
    """x - sum_k a_k <x, v_k> v_k, one vector at a time in float64."""
    out = torch.empty(h.shape, dtype=torch.float64)
    for b in range(h.shape[0]):
        for t in range(h.shape[1]):
            x = h[b, t].double().cpu()
            y = x.clone()
            for k in range(v.shape[0]):
                vk = v[k].double().cpu()
                y -= float(alpha[b, k]) * torch.dot(x, vk) * vk
            out[b, t] = y
    return out


# -- the registry ---------------------------------------------------------------

def test_the_registry_holds_four_modes_each_with_a_formula():
    assert MODE_NAMES == ["add", "norm", "clamp", "ablate"]
    assert sorted(FORMULAS) == sorted(KERNEL_IDS)
    assert len({m.kernel for m in modes.modes()}) == len(MODE_NAMES)  # no two modes share a kernel id
    for mode in modes.modes():
        assert mode.reference is FORMULAS[mode.kernel] and mode.description and mode.graph_safe
    assert [m.name for m in modes.modes() if m.uses_targets] == ["clamp"]
    assert modes.get("ablate").kernel == ABLATE


def test_the_registry_refuses_a_taken_name_and_an_unknown_kernel():
    with pytest.raises(ValueError, match="already registered"):
        modes.register(modes.SteeringMode("add", 0, "again"))
    with pytest.raises(ValueError, match="kernel id 99"):
        modes.SteeringMode("mine", 99, "no kernel")
    with pytest.raises(ValueError, match="use one of add, norm, clamp, ablate"):
        modes.get("mul")


def test_settings_and_cli_choices_come_from_the_registry(monkeypatch):
    for name in MODE_NAMES:
        assert SteeringSettings(mode=name).mode == name
    with pytest.raises(ValueError, match="use one of add, norm, clamp, ablate"):
        SteeringSettings(mode="mul")
    render = build_parser().parse_args(["render", "--prompt", "x", "--out", "o.wav", "--steer-mode", "ablate"])
    assert render.steer_mode == "ablate"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["render", "--prompt", "x", "--out", "o.wav", "--steer-mode", "mul"])

    # a mode registered later is accepted by both, with no list to edit elsewhere
    monkeypatch.setitem(modes._REGISTRY, "erase", modes.SteeringMode("erase", ABLATE, "another name for ablate"))
    assert SteeringSettings(mode="erase").mode == "erase"
    parser = build_parser()
    assert parser.parse_args(["render", "--prompt", "x", "--out", "o.wav", "--steer-mode", "erase"]).steer_mode \
        == "erase"
    assert parser.parse_args(["bench", "latency", "--model", "tiny", "--steer-mode", "erase"]).steer_mode == "erase"


def test_gate_per_reaches_the_settings_of_render_live_and_eval():
    from musicsteer.cli.common import steering_settings

    parser = build_parser()
    render = parser.parse_args(["render", "--prompt", "x", "--out", "o.wav", "--gate", "0.3"])
    assert steering_settings(render).gate_per == "step"  # render's and live's default
    live = parser.parse_args(["live", "--model", "tiny", "--prompt", "x", "--null", "--gate-per", "layer"])
    assert steering_settings(live).gate_per == "layer"
    ev = parser.parse_args(["probes", "eval", "--model", "tiny", "--features", "f", "--concepts", "p",
                            "--family", "notes"])
    assert ev.gate_per == "layer" and ev.gate == 0.3  # MusicRFM's gate for the paper's measure
    with pytest.raises(SystemExit):
        parser.parse_args(["render", "--prompt", "x", "--out", "o.wav", "--gate-per", "block"])


def test_the_cli_lists_the_modes_without_importing_torch():
    code = ("import sys; from musicsteer.cli import build_parser; build_parser(); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_steering_hook_is_public_and_ordered_first():
    h, alpha, v, c = case(2, 1, 32, 2)
    hook = SteeringHook(alpha, v, c, modes.get("ablate"))
    assert hook.order == STEERING < 1  # observers (plain callables) count as order 1
    torch.testing.assert_close(hook(h.clone()), steer_reference(h, alpha, v, c, ABLATE))


# -- ablate: the torch reference and the Triton kernel ------------------------

def test_reference_ablate_follows_the_formula():
    h, alpha, v, c = case(2, 5, 48, 3)
    torch.testing.assert_close(steer_reference(h, alpha, v, None, ABLATE).double().cpu(), ablated(h, alpha, v),
                               atol=1e-4, rtol=1e-5)
    # one concept at strength 1 removes the component along v, and only that
    x, _, v1, _ = case(1, 1, 64, 1, seed=2)
    y = steer_reference(x, torch.ones(1, 1, device=DEVICE), v1, None, ABLATE)
    assert abs(float((y @ v1.T).squeeze())) < 1e-5
    torch.testing.assert_close(y, x - (x @ v1.T) * v1)
    half = steer_reference(x, torch.full((1, 1), 0.5, device=DEVICE), v1, None, ABLATE)
    torch.testing.assert_close(half @ v1.T, 0.5 * (x @ v1.T), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", MODE_NAMES)
def test_reference_strength_zero_is_exactly_identity(name):
    h, alpha, v, c = case(2, 5, 100, 4)
    assert torch.equal(steer_reference(h, torch.zeros_like(alpha), v, c, modes.get(name).kernel), h)


@pytest.fixture(scope="module")
def steer_triton():
    pytest.importorskip("triton", reason="triton is not installed (scripts/setup.sh installs it)")
    from musicsteer.kernels.triton_steer import steer_triton

    return steer_triton


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 1, 64, 1), (2, 1, 1024, 4), (2, 7, 200, 5), (1, 1, 1536, 16)],
                         ids=lambda s: "x".join(map(str, s)))
def test_triton_ablate_equals_the_reference_and_the_formula(steer_triton, shape, dtype):
    h, alpha, v, c = case(*shape, dtype=dtype)
    want = steer_reference(h, alpha, v, c, ABLATE)
    got = steer_triton(h.clone(), alpha, v, c, ABLATE)
    assert got.dtype == dtype
    tol = TOL[dtype] * max(1.0, want.float().abs().max().item())
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=TOL[dtype])
    if dtype == torch.float32:
        torch.testing.assert_close(got.double().cpu(), ablated(h, alpha, v), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("name", MODE_NAMES)
def test_triton_strength_zero_is_exactly_identity(steer_triton, name):
    h, alpha, v, c = case(2, 3, 100, 4)
    assert torch.equal(steer_triton(h.clone(), torch.zeros_like(alpha), v, c, modes.get(name).kernel), h)


# -- in the decoder ---------------------------------------------------------------

GREEDY = SamplingSettings(cfg=3.0, greedy=True)


def generated(tiny, pack=None, strength=0.0, mode="ablate", frames=8):
    if pack is None:
        return generate(tiny.decoder, tiny.text, "x", frames, GREEDY, record_logits=True)
    steerer, plan = build_steering(tiny.decoder, pack, SteeringSettings(mode=mode, layers="all"), GREEDY.batch)
    plan.set_strength(pack.names[0], strength)
    with steerer:
        return generate(tiny.decoder, tiny.text, "x", frames, GREEDY, record_logits=True,
                        before_step=lambda s: plan.write(s, steerer))


def test_ablate_in_the_decoder_is_exact_at_zero_and_acts_at_one(tiny):
    pack = ConceptPack.random(["cmaj"], tiny.cfg, "tiny", seed=4)
    base = generated(tiny)
    zero = generated(tiny, pack, 0.0)
    assert torch.equal(zero.logits, base.logits) and torch.equal(zero.codes, base.codes)
    full = generated(tiny, pack, 1.0)
    assert (full.logits - base.logits).abs().max() > 1e-3


def test_steering_runs_before_an_observer_attached_first(tiny):
    """An observer attached before the steerer (as a meter is) reads the steered state."""
    decoder = tiny.decoder
    pack = ConceptPack.random(["cmaj"], tiny.cfg, "tiny", seed=4)
    steerer, plan = build_steering(decoder, pack, SteeringSettings(mode="ablate", layers="all"), GREEDY.batch)
    plan.set_strength("cmaj", 1.0)
    seen = []
    observer = lambda h: seen.append(h.clone()) or h  # noqa: E731
    decoder.add_hook("blocks.0.out", observer)
    try:
        with steerer:
            assert decoder.blocks[0].hooks["out"] == [steerer._hooks[0], observer]
            plan.write(0, steerer)
            generate(decoder, tiny.text, "x", 3, GREEDY, before_step=lambda s: plan.write(s, steerer))
    finally:
        decoder.remove_hook("blocks.0.out", observer)
    v = steerer.directions[0, 0]
    assert seen and all(float((h @ v).abs().max()) < 1e-4 for h in seen)  # ablated before it was seen
    assert "out" not in decoder.blocks[0].hooks


# -- negative strengths ----------------------------------------------------------------

NEGATIVE = [-1.0, -0.5, -3.0]  # a total of -1 divided by zero, (-1, 0) amplified, below -1 flipped the sign


def one_concept(a: float, D: int = 64, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, D, generator=g) * 2
    v = torch.nn.functional.normalize(torch.randn(1, D, generator=g), dim=-1)
    return x.to(DEVICE), torch.full((2, 1), a, device=DEVICE), v.to(DEVICE)


def check_norm_steers_away(x, y, v, a):
    """What a negative norm strength means: toward -v, |y| <= |x|, no sign flip, finite."""
    assert torch.isfinite(y).all()
    assert (y.norm(dim=-1) <= x.norm(dim=-1) * (1 + 1e-5)).all()  # never amplified
    assert ((y * x).sum(-1) > 0).all() or a <= -1.0  # not flipped (at |a| >= 1 it may turn past 90 degrees)
    assert ((y @ v.T) < (x @ v.T)).all()  # moved toward -v
    want = (x - abs(a) * x.norm(dim=-1, keepdim=True) * v) / (1 + abs(a))
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("a", NEGATIVE)
def test_reference_norm_with_a_negative_strength_steers_toward_minus_v(a):
    x, alpha, v = one_concept(a)
    check_norm_steers_away(x, steer_reference(x, alpha, v, None, modes.get("norm").kernel), v, a)


def test_reference_norm_is_odd_in_the_strength_and_the_direction():
    """-a toward v is a toward -v, for several concepts of mixed signs (the old divisor 1 + sum a
    broke this, and divided by zero where the strengths summed to -1)."""
    h, _, v, c = case(2, 4, 48, 3, seed=7)
    alpha = torch.tensor([[-0.5, -0.25, -0.25], [0.7, -1.2, 0.5]], device=DEVICE)  # row 0 sums to -1
    norm = modes.get("norm").kernel
    y = steer_reference(h, alpha, v, c, norm)
    flipped = steer_reference(h, -alpha, -v, c, norm)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, flipped)
    assert (y.norm(dim=-1) <= h.norm(dim=-1) * (1 + 1e-5)).all()


@pytest.mark.parametrize("a", NEGATIVE)
def test_triton_norm_with_a_negative_strength_equals_the_reference(steer_triton, a):
    x, alpha, v = one_concept(a)
    norm = modes.get("norm").kernel
    got = steer_triton(x.clone(), alpha, v, None, norm)
    check_norm_steers_away(x, got, v, a)
    torch.testing.assert_close(got, steer_reference(x, alpha, v, None, norm), atol=1e-5, rtol=1e-5)


def test_the_modes_declare_the_strengths_they_take():
    assert modes.get("add").strengths == modes.get("norm").strengths == (float("-inf"), float("inf"))
    assert modes.get("clamp").strengths == modes.get("ablate").strengths == (0.0, 1.0)
    assert modes.get("ablate").clamp(2.5) == 1.0 and modes.get("clamp").clamp(-0.2) == 0.0
    assert modes.get("ablate").out_of_range(0.5) is None
    assert "[0, 1]" in modes.get("ablate").out_of_range(-0.5)
    with pytest.raises(ValueError, match="must include 0"):
        modes.SteeringMode("mine", ABLATE, "always on", strengths=(0.5, 1.0))
