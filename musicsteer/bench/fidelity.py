"""`musicsteer bench fidelity`: what a reduced-precision weight format loses against float32.

Two decoders with the same random weights (`MusicGen.random`, one seed), one prepared
with full float32 weights and one with the format under test (through
`backends.select.prepare`, so each takes the path a loaded model would: packed kernels
and fused blocks on CPU), step side by side over `steps` one-token steps of a CFG pair
(a random text condition and the null one). Both are fed the float32 model's greedy
tokens (teacher forcing: one divergent token does not make every later step differ), and
at every step and codebook the guided distributions (softmax of u + s (c - u)) are
compared: the share of greedy tokens that agree with float32's, and the mean
KL(p_float32 || p_format) in nats.

A random model knows nothing of music; the figure says how far the products move the
logits on the real shapes, not how the music sounds. The module knows nothing of the
CLI: `measure` returns a `Fidelity` value.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..backends.select import prepare
from ..model.config import ModelConfig
from ..model.musicgen import MusicGen


@dataclass(frozen=True)
class Fidelity:
    weights: str
    backend: str
    kv_cache: str  # the self-attention cache's storage of the format under test (backends.select.KV_CACHES)
    steps: int
    agreement: float  # share of (step, codebook) greedy tokens equal to float32's
    kl_mean: float  # mean KL(p_float32 || p_weights) of the guided distributions, nats
    kl_max: float  # the largest over steps and codebooks
    entropy: float  # mean entropy of float32's guided distributions, nats (log V is uniform)

    def as_record(self) -> dict:
        return asdict(self)


def _decoder(cfg: ModelConfig, seed: int, weights: str, text: torch.Tensor, mask: torch.Tensor, steps: int,
             logit_std: float, kv_cache: str = "float32"):
    decoder = MusicGen.random(cfg, seed=seed)
    with torch.no_grad():
        w = decoder.heads.weight  # (K * V, D), applied to layer-normed states: logits of std ~ std(w) sqrt(D)
        w.mul_(logit_std / (float(w.std()) * w.shape[1] ** 0.5))  # sharper distributions (see `measure`)
    backend = prepare(decoder, "cpu", torch.float32, weights, kv_cache)
    decoder.setup_caches(2, max_len=steps + 1, max_text=text.shape[1])
    decoder.set_condition(text, mask)
    return decoder, backend


def measure(cfg: ModelConfig, weights: str, steps: int = 200, guidance: float = 3.0, seed: int = 0,
            text_len: int = 8, logit_std: float = 3.0, kv_cache: str = "auto") -> Fidelity:
    """Greedy agreement and mean KL of `weights` (with its KV cache stored as `kv_cache`) against
    float32 weights and a float32 cache over `steps` teacher-forced steps.

    A random model's heads (normal, std 0.02) give nearly uniform distributions, where every
    argmax is a near tie; the heads' weights are scaled (in both models, before either is
    prepared) to logits of about `logit_std`, so that the guided distributions are peaked about
    as a trained model's are (entropy a few nats, reported as `entropy`)."""
    g = torch.Generator().manual_seed(seed)
    text = torch.zeros(2, text_len, cfg.text_hidden)
    text[0] = torch.randn(text_len, cfg.text_hidden, generator=g)
    mask = torch.zeros(2, text_len)
    mask[0] = 1  # row 0 conditioned, row 1 the null text
    ref, _ = _decoder(cfg, seed, "full", text, mask, steps, logit_std)
    test, backend = _decoder(cfg, seed, weights, text, mask, steps, logit_std, kv_cache)
    stored = str(test.cache_dtype or torch.float32).replace("torch.", "").replace("bfloat16", "bf16")
    column = torch.randint(0, cfg.vocab, (1, cfg.codebooks, 1), generator=g).expand(2, -1, -1).contiguous()
    agree = kl_sum = entropy = kl_max = 0.0
    with torch.inference_mode():
        for t in range(steps):
            pos = torch.tensor([t])
            logp = []
            for decoder in (ref, test):
                logits = decoder.step(column, pos, kv_len=t + 1).float()  # (2, K, V)
                guided = logits[1] + guidance * (logits[0] - logits[1])  # (K, V)
                logp.append(torch.log_softmax(guided, dim=-1))
            kl = (logp[0].exp() * (logp[0] - logp[1])).sum(-1)  # (K,)
            kl_sum += float(kl.sum())
            entropy += float(-(logp[0].exp() * logp[0]).sum())
            kl_max = max(kl_max, float(kl.max()))
            tokens = logp[0].argmax(-1)  # (K,) float32's greedy tokens, fed to both
            agree += float((tokens == logp[1].argmax(-1)).sum())
            column = tokens.view(1, -1, 1).expand(2, -1, -1).contiguous()
    n = steps * cfg.codebooks
    return Fidelity(weights, backend.name, stored, steps, agree / n, kl_sum / n, kl_max, entropy / n)


def run_fidelity(preset: str, formats: list[str], steps: int = 200, guidance: float = 3.0, seed: int = 0,
                 kv_cache: str = "auto") -> dict:
    """The record of `bench fidelity`: `measure` for each weight format on the preset's shape."""
    import time

    from ..model.config import PRESETS
    from .latency import git_commit, machine_info

    if preset not in PRESETS:
        raise ValueError(f"bench fidelity takes a preset shape ({', '.join(PRESETS)}), not {preset!r}")
    cfg = PRESETS[preset]
    if steps + 1 > cfg.max_positions:
        raise ValueError(f"--steps must stay under the model's {cfg.max_positions} positions")
    results = [measure(cfg, w, steps=steps, guidance=guidance, seed=seed, kv_cache=kv_cache).as_record()
               for w in formats]
    return {"benchmark": "fidelity", "commit": git_commit(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine_info(torch.device("cpu")), "model": preset, "random_weights_seed": seed,
            "steps": steps, "cfg": guidance, "teacher_forced": True, "results": results}


def format_fidelity(record: dict) -> str:
    lines = [f"{record['model']} (random weights, seed {record['random_weights_seed']}), {record['steps']} "
             f"teacher-forced steps, CFG {record['cfg']}: against float32"]
    for r in record["results"]:
        lines.append(f"  {r['weights']:>5} ({r['backend']}, {r.get('kv_cache', '?')} cache): greedy agreement {r['agreement'] * 100:.1f}%, "
                     f"KL mean {r['kl_mean']:.2e} max {r['kl_max']:.2e} nats (float32 entropy {r['entropy']:.2f})")
    return "\n".join(lines)
