"""Reference implementations timed on the same model shape, and this machine's
memory-bandwidth floor for a decoder step.

- transformers: `MusicgenForConditionalGeneration.generate` with random weights of the
  same decoder shape, CFG and top-k sampling as configured; the per-step cost is the
  slope between two generation lengths, so prompt encoding and set-up cancel out; the
  codec decode is skipped. Its precision follows the run's (`PEER_PRECISION`): float32,
  transformers in bfloat16 for bf16 weights, and torch's dynamic int8 quantization of
  every `nn.Linear` (the ordinary CPU int8 path, `torch.ao.quantization.quantize_dynamic`)
  for int8 and int4 weights, which torch has no CPU 4-bit path to compare with.
- audiocraft: `LMModel.generate`, run in the scratch environment that
  tools/audiocraft_fixture/make_fixture.sh creates (audiocraft cannot be installed
  beside a current torch); without it the baseline says so.
- floor: bytes of decoder weights one step reads, over a measured streaming-read
  bandwidth (the best of a large one-row matrix-vector product and a max-reduction).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import torch

from ..model.loading.load import LoadedModel, encodec_32khz_config

AUDIOCRAFT_VENV = Path(os.environ.get("AUDIOCRAFT_VENV", "/tmp/acvenv"))


def step_weight_bytes(model: LoadedModel) -> int:
    """Bytes of weights a one-token step reads: every block (without the cross-attention K/V
    projection, used once per prompt), the final norm and the heads; embeddings are gathered."""
    total = 0
    weights = list(model.decoder.named_parameters()) + [
        (n, b) for n, b in model.decoder.named_buffers() if n.endswith(("weight_int8", "scales", "blocks", "packed", "scale"))]
    for name, p in weights:
        if name.startswith(("embed", "text_proj")) or ".cross_attn.wkv." in name:
            continue
        total += p.numel() * p.element_size()
    return total


def step_cache_bytes(model: LoadedModel, position: float, batch: int) -> float:
    """Bytes of self-attention keys and values a step at `position` reads (the filled part of
    every layer's cache, in the cache's storage dtype, with an 8-bit cache's scales); the text cache
    is a few positions and left out."""
    c, decoder = model.cfg, model.decoder
    item = torch.empty((), dtype=decoder.cache_dtype or decoder.embed.weight.dtype).element_size()
    if decoder.cache_dtype == torch.int8:
        item += 4 / c.head_dim  # one float32 scale per head and position
    return c.layers * 2 * batch * c.hidden * (position + 1) * item


def stream_bandwidth(mb: int = 512, repeats: int = 5) -> float:
    """Bytes per second of a streaming read over `mb` MiB, the best of a few ways, over ordinary
    memory and over memory advised for huge pages (which the packed CPU weights use, and which
    reads up to twice as fast on the test machines): the floor is what the machine can do."""
    from ..kernels.cpu import huge_page_empty

    def best_read(a: torch.Tensor) -> float:
        a.uniform_()
        rows, v = a.view(-1, 4096), torch.ones(4096)
        best = 0.0
        for f in (lambda: torch.mv(rows, v), lambda: a.max()):
            f()
            for _ in range(repeats):
                t = time.perf_counter()
                f()
                best = max(best, a.numel() * 4 / (time.perf_counter() - t))
        return best

    numel = mb * 1024 * 1024 // 4
    best = best_read(torch.empty(numel))
    best = max(best, best_read(huge_page_empty((numel,), torch.float32)))
    return best


# the peer precision each of our weight formats is compared with (like for like: the same bytes or
# fewer for the peer, never more)
PEER_PRECISION = {"full": "float32", "bf16": "bfloat16", "int8": "int8-dynamic", "int4": "int8-dynamic"}


def peer_precision(weights: str, dtype: str) -> str:
    """The transformers precision that `weights` (with activations in `dtype`) is compared with."""
    return dtype if weights == "full" else PEER_PRECISION[weights]


def transformers_peer(model: LoadedModel, precision: str, steps: int = 24) -> torch.nn.Module:
    """transformers' MusicGen with random weights of `model`'s decoder shape at `precision`: a torch
    dtype's name, or `int8-dynamic` (float32 weights, then every `nn.Linear` of the decoder
    dynamically quantized); a tiny text encoder, and no codec decode."""
    from transformers import (
        EncodecConfig,
        MusicgenConfig,
        MusicgenDecoderConfig,
        MusicgenForConditionalGeneration,
        T5Config,
    )

    c = model.cfg
    config = MusicgenConfig(
        text_encoder=T5Config(d_model=c.text_hidden, d_kv=8, d_ff=64, num_layers=1, num_heads=4, vocab_size=300),
        audio_encoder=encodec_32khz_config(EncodecConfig, tiny=True),
        decoder=MusicgenDecoderConfig(hidden_size=c.hidden, num_hidden_layers=c.layers, num_attention_heads=c.heads,
                                      ffn_dim=c.ffn, vocab_size=c.vocab, num_codebooks=c.codebooks,
                                      max_position_embeddings=max(c.max_positions, 2 * steps + 16)))
    with torch.device("meta"):
        hf = MusicgenForConditionalGeneration(config)
    dynamic = precision == "int8-dynamic"
    hf = hf.to_empty(device="cpu").to(torch.float32 if dynamic else getattr(torch, precision)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.02)
        for m in hf.modules():  # the sinusoid buffer is not a parameter: rebuild it
            if hasattr(m, "make_weights") and hasattr(m, "num_positions"):
                m.make_weights(m.num_positions, m.embedding_dim)
    if dynamic:
        import warnings

        with warnings.catch_warnings():  # torch marks its quantized tensors deprecated; still its CPU int8 path
            warnings.simplefilter("ignore")
            hf.decoder = torch.ao.quantization.quantize_dynamic(hf.decoder, {torch.nn.Linear}, dtype=torch.qint8)
    return hf


def transformers_step_ms(model: LoadedModel, precision: str, cfg: float, steps: int = 24) -> float:
    """Per-step milliseconds of `transformers_peer`'s generate with CFG and top-k 250."""
    hf = transformers_peer(model, precision, steps)
    hf.audio_encoder.decode = lambda codes, *a, **k: type("Out", (), {"audio_values": torch.zeros(1, 1, 1)})()
    ids = torch.tensor([[5, 6, 7, 1]])

    def run(n: int) -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=250,
                        guidance_scale=cfg, max_new_tokens=n)
        return time.perf_counter() - t

    run(4)  # warm-up
    short, long = run(steps // 3), run(steps)
    return (long - short) / (steps - steps // 3) * 1e3


def audiocraft_step_ms(model: LoadedModel, cfg: float, steps: int = 24) -> tuple[float | None, str]:
    python = AUDIOCRAFT_VENV / "bin" / "python"
    if not python.exists():
        return None, (f"no audiocraft environment at {AUDIOCRAFT_VENV} (make it with "
                      f"tools/audiocraft_fixture/make_fixture.sh, or set AUDIOCRAFT_VENV)")
    c = model.cfg
    script = Path(__file__).with_name("audiocraft_baseline.py")
    args = [str(python), str(script), json.dumps({"dim": c.hidden, "num_heads": c.heads, "num_layers": c.layers,
                                                    "hidden_scale": c.ffn / c.hidden, "card": c.vocab,
                                                    "n_q": c.codebooks, "cfg": cfg, "steps": steps})]
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=3600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"audiocraft baseline failed to run: {exc}"
    if out.returncode != 0:
        return None, f"audiocraft baseline failed: {out.stderr.strip().splitlines()[-1:]}"
    return float(json.loads(out.stdout.strip().splitlines()[-1])["step_ms"]), "audiocraft LMModel.generate"
