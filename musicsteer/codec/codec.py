"""EnCodec, from transformers: codes <-> audio for the 32 kHz MusicGen codec.

This module decodes whole clips (offline render) and encodes audio (probe data).
It knows nothing of the decoder or of streaming.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Codec:
    model: torch.nn.Module  # transformers EncodecModel
    source: str

    def __post_init__(self) -> None:
        fold_weight_norm(self.model)

    @property
    def sample_rate(self) -> int:
        return int(self.model.config.sampling_rate)

    @property
    def hop(self) -> int:
        return int(np.prod(self.model.config.upsampling_ratios))

    @property
    def codebook_size(self) -> int:
        return int(self.model.config.codebook_size)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> np.ndarray:
        """Codes (K, F) -> mono float32 audio (F * hop,)."""
        device = next(self.model.parameters()).device
        codes = codes.to(device=device, dtype=torch.long)[None, None]  # (chunks=1, B=1, K, F)
        audio = self.model.decode(codes, audio_scales=[None]).audio_values  # (1, 1, samples)
        return audio[0, 0].float().cpu().numpy()

    @torch.no_grad()
    def encode(self, audio: np.ndarray, codebooks: int) -> torch.Tensor:
        """Mono float audio at `sample_rate` -> codes (codebooks, F)."""
        device = next(self.model.parameters()).device
        x = torch.as_tensor(audio, dtype=torch.float32, device=device)[None, None]  # (B=1, C=1, samples)
        bandwidth = _bandwidth_for(self.model.config, codebooks)
        codes = self.model.encode(x, bandwidth=bandwidth).audio_codes  # (chunks, B, K, F)
        return codes[0, 0, :codebooks].cpu()


def _bandwidth_for(config, codebooks: int) -> float:
    """The target bandwidth whose quantizer count is `codebooks`."""
    bits = np.log2(config.codebook_size)
    for bw in config.target_bandwidths:
        if int(1000 * bw // (config.frame_rate * bits)) == codebooks:
            return bw
    return max(config.target_bandwidths)


def fold_weight_norm(model: torch.nn.Module) -> None:
    """Replace weight-norm parametrizations by plain weights: the same function, without
    recomputing every weight on every call (a third of the codec's time on CPU)."""
    from torch.nn.utils import parametrize

    for module in model.modules():
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
