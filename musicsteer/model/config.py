"""Model configuration: the shapes of a MusicGen decoder, with named presets.

The config knows nothing of where weights come from; `loading` fills it from a
transformers `config.json`, an audiocraft `xp.cfg`, or a preset name.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

FRAME_RATE = 50  # EnCodec 32 kHz: one frame every 640 samples
SAMPLE_RATE = 32_000


@dataclass(frozen=True)
class ModelConfig:
    hidden: int = 1024
    layers: int = 24
    heads: int = 16
    ffn: int = 4096
    vocab: int = 2048  # entries per codebook; id `vocab` is the special (pad/BOS) token
    codebooks: int = 4
    text_hidden: int = 768  # T5 d_model; projected to `hidden` for cross-attention
    max_positions: int = 2048  # length of the static KV cache
    norm_eps: float = 1e-5
    activation: str = "gelu"
    name: str = "custom"
    head_dim: int = field(init=False)

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"hidden size {self.hidden} is not divisible by {self.heads} heads")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unsupported activation {self.activation!r}; known: {', '.join(ACTIVATIONS)}")
        object.__setattr__(self, "head_dim", self.hidden // self.heads)

    @property
    def special_token(self) -> int:
        return self.vocab

    @property
    def max_frames(self) -> int:
        """Frames one render can hold: the BOS position and the delay tail take K positions."""
        return self.max_positions - self.codebooks

    def with_(self, **changes) -> "ModelConfig":
        return replace(self, **changes)

    @classmethod
    def from_name(cls, name: str) -> "ModelConfig":
        try:
            return PRESETS[name]
        except KeyError:
            raise KeyError(name) from None


ACTIVATIONS = ("gelu", "gelu_tanh", "relu")

# Shapes of REFERENCES.md; `tiny` is a few layers for tests and demos.
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(hidden=64, layers=2, heads=4, ffn=256, text_hidden=32, max_positions=2048, name="tiny"),
    "small": ModelConfig(hidden=1024, layers=24, heads=16, ffn=4096, name="small"),
    "medium": ModelConfig(hidden=1536, layers=48, heads=24, ffn=6144, name="medium"),
    "large": ModelConfig(hidden=2048, layers=48, heads=32, ffn=8192, name="large"),
}
