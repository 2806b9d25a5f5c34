"""Times audiocraft's `LMModel.generate` on a random model of a given shape.

Run by `musicsteer bench latency --baseline audiocraft` with the python of the scratch
environment that has audiocraft (never imported by musicsteer itself). Prints one JSON
line: {"step_ms": ...}. The conditioner is a lookup table (no T5 download); conditioning
happens once per generation and the per-step cost is the slope between two lengths.
"""

import json
import sys
import time

import torch
from audiocraft.models.lm import LMModel
from audiocraft.modules.codebooks_patterns import DelayedPatternProvider
from audiocraft.modules.conditioners import (
    ConditionFuser,
    ConditioningAttributes,
    ConditioningProvider,
    LUTConditioner,
)


def main() -> None:
    p = json.loads(sys.argv[1])
    torch.manual_seed(0)
    conditioner = LUTConditioner(n_bins=256, dim=64, output_dim=p["dim"], tokenizer="noop")
    lm = LMModel(
        pattern_provider=DelayedPatternProvider(n_q=p["n_q"]),
        condition_provider=ConditioningProvider({"description": conditioner}),
        fuser=ConditionFuser({"cross": ["description"], "prepend": [], "sum": [], "input_interpolate": []}), n_q=p["n_q"], card=p["card"], dim=p["dim"],
        num_heads=p["num_heads"], num_layers=p["num_layers"], hidden_scale=p["hidden_scale"], norm="layer_norm",
        norm_first=True, bias_ff=False, bias_attn=False, bias_proj=False, causal=True, cross_attention=True,
        positional_embedding="sin", activation="gelu", memory_efficient=True).eval()
    attrs = [ConditioningAttributes(text={"description": "12 34 56"})]

    def run(n: int) -> float:
        t = time.perf_counter()
        with torch.no_grad():
            lm.generate(conditions=attrs, max_gen_len=n, use_sampling=True, top_k=250, cfg_coef=p["cfg"])
        return time.perf_counter() - t

    run(4)
    steps = p["steps"]
    short, long = run(steps // 3), run(steps)
    print(json.dumps({"step_ms": (long - short) / (steps - steps // 3) * 1e3}))


if __name__ == "__main__":
    main()
