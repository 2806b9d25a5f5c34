"""The graphed step: the static path it captures gives the eager step's logits, and new
strengths written into the steering buffers between replays take effect without recapture.
Off CUDA the static path runs eagerly (what the graph would replay); on CUDA it is captured."""

import pytest
import torch

from musicsteer.model.generate import generate
from musicsteer.model.graph_step import GraphedStep
from musicsteer.model.sampling import SamplingSettings
from musicsteer.steering.pack import ConceptPack
from musicsteer.steering.plan import SteeringSettings, build_steering
from musicsteer.steering.schedules import LinearUp

GREEDY = SamplingSettings(cfg=3.0, greedy=True)


def steered(model, graph, frames=14):
    pack = ConceptPack.random(["a", "b"], model.cfg, "tiny", seed=9)
    steerer, plan = build_steering(model.decoder, pack, SteeringSettings(), GREEDY.batch)
    plan.set_strength("a", 4.0)
    plan.set_strength("b", 8.0)
    plan.set_schedule("b", LinearUp(10))  # b's strength changes every step
    with steerer:
        return generate(model.decoder, model.text, "graph", frames, GREEDY, record_logits=True,
                        before_step=lambda s: plan.write(s, steerer), graph=graph)


def test_static_step_with_changing_strengths_equals_the_eager_step(tiny):
    eager, static = steered(tiny, graph=False), steered(tiny, graph=True)
    torch.testing.assert_close(static.logits, eager.logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(static.codes, eager.codes)
    plain = generate(tiny.decoder, tiny.text, "graph", 14, GREEDY, record_logits=True)
    assert not torch.equal(plain.codes, eager.codes)  # the strengths did act


def test_positions_outside_the_cache_are_refused(tiny):
    tiny.decoder.setup_caches(2, max_len=8)
    step = GraphedStep(tiny.decoder, 2)
    with pytest.raises(ValueError, match="outside the cache of 8"):
        step(torch.zeros(2, tiny.cfg.codebooks, 1, dtype=torch.long), 8)


def test_capture_needs_cuda(tiny):
    tiny.decoder.setup_caches(2, max_len=8)
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the capture test below covers it")
    with pytest.raises(RuntimeError, match="CUDA"):
        GraphedStep(tiny.decoder, 2, capture=True)
    assert not GraphedStep(tiny.decoder, 2).captured


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA device")
def test_cuda_graph_replay_with_new_strengths_equals_eager():
    from musicsteer.model.loading.load import load_model

    model = load_model("tiny", device="cuda")
    eager, graphed = steered(model, graph=False), steered(model, graph=True)
    torch.testing.assert_close(graphed.logits, eager.logits, atol=1e-3, rtol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA device")
def test_live_stream_on_cuda_replays_one_graph_per_cache_set():
    """On CUDA the producer captures a graph per cache set by default; its frames across re-primes
    equal the eager stream's on the same device."""
    import numpy as np

    from musicsteer.live.producer import Producer, StreamConfig
    from musicsteer.live.ring_buffer import AudioRing
    from musicsteer.live.session import MemoryRecorder
    from musicsteer.live.sinks import PacedSink
    from musicsteer.model.loading.load import load_model
    from musicsteer.model.sampling import SamplingSettings

    model = load_model("tiny", device="cuda")
    frames = {}
    for graph in (None, False):
        rec, ring = MemoryRecorder(), AudioRing(1 << 15)
        sink = PacedSink(model.codec.sample_rate, realtime=False)
        config = StreamConfig("warm lofi piano", SamplingSettings(seed=5), window_s=2.0, keep_s=0.5,
                              reprime_chunk=8, max_seconds=5.0, graph=graph)
        producer = Producer(model, config, ring, None, None, rec)
        sink.start(ring)
        producer.run()
        sink.drain()
        sink.stop()
        assert producer.error is None and producer.reprimes >= 2
        assert (producer.graphs is not None and all(g.captured for g in producer.graphs.values())) == (graph is None)
        frames[graph] = np.stack(rec.frames, axis=1)
    np.testing.assert_array_equal(frames[None], frames[False])
