"""musicsteer.probes.pitch: CREPE (torchcrepe's shipped weights) as the judge of pitch."""

import importlib.util

import numpy as np
import pytest

from musicsteer.probes import pitch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torchcrepe") is None,
                                reason="torchcrepe is installed by scripts/setup.sh (--no-deps)")


def tone(freq, seconds=1.0, rate=32000, harmonics=1):
    t = np.arange(int(seconds * rate)) / rate
    return sum(0.5 / h * np.sin(2 * np.pi * freq * h * t) for h in range(1, harmonics + 1)).astype(np.float32)


def test_a_440_hz_sine_is_a():
    reading = pitch.pitch_of(tone(440.0), 32000)
    assert reading.name == "A" and reading.pitch_class == 9
    assert abs(reading.midi - 69.0) < 0.3 and reading.voiced > 0.9


@pytest.mark.parametrize("midi", [40, 60, 75])
def test_harmonic_tones_at_other_rates_read_their_pitch_class(midi):
    freq = 440.0 * 2 ** ((midi - 69) / 12)
    reading = pitch.pitch_of(tone(freq, rate=16000, harmonics=4), 16000)
    assert reading.pitch_class == midi % 12, reading


def test_silence_has_no_pitch():
    reading = pitch.pitch_of(np.zeros(16000, np.float32), 16000)
    assert reading.pitch_class is None and reading.name == "-" and reading.voiced == 0.0


def test_the_torchaudio_stand_in_refuses_to_read_files():
    stand_in = pitch._torchaudio_stand_in()
    with pytest.raises(pitch.PitchJudgeError, match="arrays"):
        stand_in.load("x.wav")


def test_stereo_is_refused():
    with pytest.raises(pitch.PitchJudgeError, match="mono"):
        pitch.to_crepe_rate(np.zeros((2, 100), np.float32), 32000)
