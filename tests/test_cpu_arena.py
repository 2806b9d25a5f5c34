"""The CPU step's weights on huge pages (backends/cpu/arena.py): one arena in step order, the
same results as without it, and memory the kernel really backs with 2 MiB pages."""

import re
from pathlib import Path

import pytest
import torch

from musicsteer.backends.cpu import arena
from musicsteer.backends.cpu.linear import PackedBase
from musicsteer.kernels import cpu
from musicsteer.model.generate import generate
from musicsteer.model.loading.load import load_model
from musicsteer.model.sampling import SamplingSettings

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
needs_thp = pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(),
                               reason="transparent huge pages are off (or absent) on this machine")
needs_cc = pytest.mark.skipif(cpu.library() is None, reason=f"no CPU kernels: {cpu.unavailable()}")


def huge_kb(address: int) -> int:
    """AnonHugePages (kB) of the mapping that holds `address`."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if m:
            inside = int(m.group(1), 16) <= address < int(m.group(2), 16)
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


@needs_thp
def test_huge_page_memory_is_backed_by_huge_pages_even_after_the_heap_churned():
    churn = [torch.ones(1 << 20, dtype=torch.uint8) for _ in range(16)]  # memory malloc will hand back
    del churn
    t = cpu.huge_pages(8 << 20)
    assert t.data_ptr() % cpu.HUGE_PAGE == 0 and t.numel() == 8 << 20
    t.fill_(7)
    assert int(t[-1]) == 7
    assert huge_kb(t.data_ptr()) >= 4096


def step_tensors(decoder):
    return [t for m in arena.step_modules(decoder) for *_, t in arena._tensors(m)]


@needs_cc
@pytest.mark.parametrize("weights", ["full", "int8", "int4", "bf16"])
def test_the_steps_tensors_lie_in_one_arena_in_the_order_a_step_reads_them(weights):
    model = load_model("tiny", weights=weights)
    tensors = step_tensors(model.decoder)
    starts = [t.data_ptr() for t in tensors]
    assert starts[0] % cpu.HUGE_PAGE == 0
    assert starts == sorted(starts)
    end = starts[-1] + tensors[-1].numel() * tensors[-1].element_size()
    assert end - starts[0] <= sum(t.numel() * t.element_size() + arena.ALIGN for t in tensors)
    packed = [m for m in arena.step_modules(model.decoder) if isinstance(m, PackedBase)]
    assert packed and all(m._bound is m._buffers["packed"] for m in packed)  # the kernels read the arena


@needs_cc
@pytest.mark.parametrize("weights", ["full", "int4"])
def test_the_arena_changes_no_bit_of_what_is_generated(weights, monkeypatch):
    settings = SamplingSettings(seed=3)
    runs = []
    for on in ("1", "0"):
        monkeypatch.setenv("MUSICSTEER_CPU_HUGE_PAGES", on)
        model = load_model("tiny", weights=weights)
        runs.append(generate(model.decoder, model.text, "arena", 24, settings, record_logits=True))
    assert model.backend.fused_blocks == model.cfg.layers
    assert torch.equal(runs[0].codes, runs[1].codes)
    assert torch.equal(runs[0].logits, runs[1].logits)


def test_turned_off_it_moves_nothing(monkeypatch):
    model = load_model("tiny", weights="full")
    monkeypatch.setenv("MUSICSTEER_CPU_HUGE_PAGES", "0")
    before = [t.data_ptr() for t in step_tensors(model.decoder)]
    assert arena.place_on_huge_pages(model.decoder) == 0
    assert [t.data_ptr() for t in step_tensors(model.decoder)] == before


@needs_cc
def test_bench_huge_pages_script_takes_turns_on_tiny(tmp_path):
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "huge.json"
    done = subprocess.run([sys.executable, str(root / "scripts" / "bench_huge_pages.py"), "--model", "tiny",
                           "--weights", "int8", "--kv-cache", "bf16", "--frames", "80", "--rounds", "1",
                           "--json", str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(out.read_text())
    assert set(record["p50_ms"]) == {"2 MiB pages", "4 KiB pages"} and all(v > 0 for v in record["p50_ms"].values())
    assert record["arena_bytes"] > 0
