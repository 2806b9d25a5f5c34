import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Live sessions build prompt changes on a thread here: a worker process per session would start an
# interpreter for each of the suite's many short sessions (tests/test_prompt_process.py asks for it).
os.environ.setdefault("MUSICSTEER_PROMPT_WORKER", "thread")
# Without a GPU, Triton kernels run in its interpreter (read when triton is first imported).
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not Path("/dev/nvidia0").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Two random MusicGen shapes for parity: layer counts, head counts and hidden sizes differ.
SHAPES = {
    "a": dict(hidden=48, layers=3, heads=4, ffn=96, text_hidden=32),
    "b": dict(hidden=64, layers=2, heads=8, ffn=160, text_hidden=48),
}


@pytest.fixture(scope="session")
def musicgen_dirs(tmp_path_factory):
    """{name: (directory, transformers model, tokenizer)} written by save_pretrained."""
    from builders import save_random_musicgen

    out = {}
    for i, (name, shape) in enumerate(SHAPES.items()):
        d = tmp_path_factory.mktemp(f"musicgen_{name}")
        model, tok = save_random_musicgen(d, seed=i, **shape)
        out[name] = (d, model, tok)
    return out


@pytest.fixture(scope="session")
def tiny():
    from musicsteer.model.loading.load import load_model

    return load_model("tiny")
