"""The demo model, trained here by tools/demo_model (docs/demo_model.md): `codec/`, a small
EnCodec-architecture codec in transformers format (config.json, model.safetensors in
float16, training.json with its recipe and step, eval.json with its pitch figure)."""

from pathlib import Path

CODEC_DIR = Path(__file__).resolve().parent / "codec"
