"""CLAP as a text-adherence judge for `probes eval`: the cosine of CLAP's text and audio
embeddings, from a CLAP model in the local Hugging Face cache (nothing is downloaded).
It knows nothing of steering or probes: text and audio in, a score out.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..model.loading.load import hf_cache_snapshot

CLAP_REPOS = ("laion/larger_clap_music", "laion/clap-htsat-unfused")


class ClapScorer:
    """Text adherence: cosine of CLAP's text and audio embeddings (audio resampled to 48 kHz)."""

    def __init__(self, directory: Path, source: str) -> None:
        from transformers import ClapModel, ClapProcessor

        self.model = ClapModel.from_pretrained(directory, local_files_only=True).eval()
        self.processor = ClapProcessor.from_pretrained(directory, local_files_only=True)
        self.source = source

    @torch.inference_mode()
    def score(self, text: str, audio: np.ndarray, sample_rate: int) -> float:
        from math import gcd

        from scipy.signal import resample_poly

        rate = self.processor.feature_extractor.sampling_rate
        g = gcd(rate, sample_rate)
        audio = resample_poly(audio, rate // g, sample_rate // g).astype(np.float32)
        inputs = self.processor(text=[text], audio=[audio], sampling_rate=rate, return_tensors="pt", padding=True)
        t = self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        a = self.model.get_audio_features(input_features=inputs["input_features"],
                                          is_longer=inputs.get("is_longer"))
        t, a = (getattr(x, "pooler_output", x) for x in (t, a))  # tensors, or outputs holding them
        return float(torch.nn.functional.cosine_similarity(t, a).item())


def clap_scorer() -> tuple[ClapScorer | None, str]:
    """The CLAP model in the local cache, or why there is none."""
    for repo in CLAP_REPOS:
        snapshot = hf_cache_snapshot(repo)
        if snapshot is not None:
            return ClapScorer(snapshot, repo), f"CLAP text adherence with {repo} (Hugging Face cache)"
    return None, ("no CLAP column: no CLAP model (" + ", ".join(CLAP_REPOS) +
                  ") in the local Hugging Face cache, and none can be downloaded here")
