"""Does the codec keep pitch? CREPE's pitch class of held-out `notes` clips after the
codec's encode -> decode, against the clip's label, and on the originals.

    python tools/demo_model/eval_codec.py --codec DIR [--clips 48] [--json FILE]

The codec is loaded the way `--codec DIR` loads it (musicsteer.model.loading); the clips
are the held-out split of the training dataset (codec_data.split). Notes outside MIDI
`--min-midi`..`--max-midi` are left out: CREPE's bins span 32.7 Hz to 1975 Hz, and its
readings near the ends are unreliable even on the originals (docs/demo_model.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import codec_data  # noqa: E402

HERE = Path(__file__).resolve().parent
MIN_MIDI, MAX_MIDI = 36, 95  # C2 (65 Hz) .. B6 (1976 Hz)


def evaluate(codec, held: codec_data.Clips, limit: int | None = None, originals: bool = True,
             model: str = "tiny", min_midi: int = MIN_MIDI, max_midi: int = MAX_MIDI,
             quantized: bool = True) -> dict:
    """Pitch-class accuracy after the round trip (and on the originals) on up to `limit`
    held-out notes clips within the MIDI range; `quantized=False` skips the quantizer
    (decoder of the encoder's output: the reconstruction-first phase)."""
    import numpy as np
    import torch

    from musicsteer.probes.pitch import PITCH_CLASSES, pitch_of

    started = time.perf_counter()
    chosen = [i for i, row in enumerate(held.rows)
              if row.family == "notes" and min_midi <= codec_data.clip_pitch(row) <= max_midi]
    if limit and len(chosen) > limit:  # spread over the list (sorted by label), not its first labels
        chosen = [chosen[round(j * len(chosen) / limit)] for j in range(limit)]
    results = []
    for i in chosen:
        row = held.rows[i]
        audio = held.audio[i].astype(np.float32) / 32768.0
        if quantized:
            decoded = codec.decode(codec.encode(audio, int(codec.model.config.num_quantizers)))
        else:
            with torch.no_grad():
                decoded = codec.model.decoder(codec.model.encoder(torch.from_numpy(audio)[None, None]))[0, 0].numpy()
        decoded = decoded[:audio.shape[0]]
        truth = PITCH_CLASSES.index(row.label)
        item = {"clip": row.clip, "midi": codec_data.clip_pitch(row), "label": row.label,
                "roundtrip": pitch_of(decoded, codec.sample_rate, model).name}
        if originals:
            item["original"] = pitch_of(audio, codec.sample_rate, model).name
        item["ok"] = item["roundtrip"] == PITCH_CLASSES[truth]
        results.append(item)
    n = len(results)
    out = {"clips": results, "n": n, "crepe": model, "midi_range": [min_midi, max_midi], "quantized": quantized,
           "roundtrip_accuracy": sum(r["ok"] for r in results) / max(1, n),
           "seconds": round(time.perf_counter() - started, 1)}
    if originals:
        out["original_accuracy"] = sum(r["original"] == r["label"] for r in results) / max(1, n)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--codec", type=Path, required=True, help="a transformers EnCodec directory")
    p.add_argument("--data", type=Path, default=HERE / "runs" / "data", help="the dataset the codec was trained on")
    p.add_argument("--clips", type=int, default=None, help="at most this many held-out clips (default all)")
    p.add_argument("--crepe", choices=("tiny", "full"), default="tiny")
    p.add_argument("--min-midi", type=int, default=MIN_MIDI)
    p.add_argument("--max-midi", type=int, default=MAX_MIDI)
    p.add_argument("--no-originals", action="store_true", help="skip CREPE on the original clips")
    p.add_argument("--json", type=Path, default=None, help="write the result here")
    args = p.parse_args(argv)
    import torch

    from musicsteer.errors import MusicsteerError
    from musicsteer.model.loading.common import load_codec_dir

    torch.set_num_threads(1)
    try:
        codec = load_codec_dir(args.codec, "--codec")
        _, held = codec_data.split(args.data)
    except MusicsteerError as exc:
        print(f"eval_codec: {exc}", file=sys.stderr)
        return 2
    result = evaluate(codec, held, args.clips, not args.no_originals, args.crepe, args.min_midi, args.max_midi)
    line = f"{result['n']} held-out notes clips (MIDI {args.min_midi}..{args.max_midi}, CREPE {args.crepe}): " \
           f"round trip {100 * result['roundtrip_accuracy']:.1f}%"
    if "original_accuracy" in result:
        line += f", originals {100 * result['original_accuracy']:.1f}%"
    print(line + f" ({result['seconds']} s)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
