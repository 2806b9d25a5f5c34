"""Every module shared between threads opens with its threading model: the first paragraph
of its docstring says who calls what from which thread (STYLE.md)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "musicsteer"

# Modules whose code runs on more than one thread, or that hold state another thread reads:
# the producer and what it drives, the controllers, the sinks, the kernels' lazy loading and
# backend choice, the hooks the decoder calls while controllers write strengths.
SHARED = [
    "live/producer.py", "live/window.py", "live/controls.py", "live/session.py", "live/ring_buffer.py", "live/sinks.py",
    "live/portaudio_sink.py", "live/recorder.py", "live/prompt_worker.py", "live/prompt_process.py", "model/kv_cache.py",
    "controllers/state.py", "controllers/osc.py", "controllers/midi.py", "controllers/params.py",
    "controllers/scenes.py", "controllers/limits.py", "controllers/web/protocol.py", "controllers/web/access.py",
    "controllers/web/server.py", "live/surface.py",
    "steering/plan.py", "steering/meters.py", "steering/hooks.py", "steering/modes.py",
    "model/musicgen.py", "model/graph_step.py", "model/step.py",
    "backends/select.py", "backends/cpu/fused.py", "backends/cpu/attention.py", "backends/cuda/attention.py",
    "kernels/cpu.py", "kernels/dispatch.py", "kernels/hook.py",
    "codec/stream.py", "codec/state.py", "codec/native.py", "kernels/cpu_codec.py", "bench/timeline.py", "api.py",
]


def docstring(path: Path) -> str:
    return ast.get_docstring(ast.parse(path.read_text())) or ""


@pytest.mark.parametrize("name", SHARED)
def test_a_shared_module_opens_with_its_threading_model(name):
    first = docstring(PACKAGE / name).split("\n\n")[0]
    assert first.startswith("Threading model:"), f"{name}: the docstring's first paragraph is {first[:80]!r}"


def test_no_threading_model_is_buried():
    buried = [str(p.relative_to(PACKAGE)) for p in sorted(PACKAGE.rglob("*.py"))
              if "Threading model" in docstring(p) and not docstring(p).startswith("Threading model:")]
    assert not buried, f"threading models after the first paragraph: {buried}"
