"""`musicsteer bench latency` measures the real loop and writes a complete record."""

import json

import numpy as np

from musicsteer.bench.latency import StepStats
from musicsteer.cli import main


def test_step_stats_from_samples():
    s = StepStats.of(4, np.array([0.010, 0.020, 0.030, 0.040]))
    assert s.p50_ms == 25.0 and s.max_ms == 40.0 and s.mean_ms == 25.0
    assert s.tokens_per_s == 40.0 and s.realtime_factor == 0.8


def test_bench_latency_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["bench", "latency", "--model", "tiny", "--steps", "8", "--warmup", "2", "--concepts", "0,2",
                 "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert [r["concepts"] for r in record["results"]] == [0, 2]
    assert all(r["steps"] == 8 and r["p50_ms"] > 0 for r in record["results"])
    assert record["machine"]["cores"] >= 1 and record["shape"]["layers"] == 2
    assert "2" in record["steering_overhead_pct"]
    f = record["floor"]  # weights plus the KV cache the timed steps read, at the middle position
    cfg = record["shape"]
    assert f["cache_position"] == 2 + 3.5
    assert f["cache_bytes_per_step"] == cfg["layers"] * 2 * 2 * cfg["hidden"] * (5.5 + 1) * 4
    assert len(f["stream_read_samples_gb_s"]) == 2 and f["stream_read_gb_s"] == max(f["stream_read_samples_gb_s"])
    want = (f["weight_bytes_per_step"] + f["cache_bytes_per_step"]) / (f["stream_read_gb_s"] * 1e9) * 1e3
    assert abs(f["floor_ms"] - want) < 1e-9
    i = f["interleaved"]  # each step after a read of the bytes it reads
    assert i["pairs"] == 10 and i["step_ms_p50"] > 0 and i["read_ms_p50"] > 0
    assert abs(i["read_gb_s_p50"] - (f["weight_bytes_per_step"] + f["cache_bytes_per_step"]) / i["read_ms_p50"] / 1e6) < 1e-6
    assert i["step_over_read_p90"] >= i["step_over_read_p50"] > 0
    out = capsys.readouterr().out
    assert "concepts   p50 ms" in out and "step by step, each after a streaming read" in out


def test_bench_rejects_bad_counts(capsys):
    assert main(["bench", "latency", "--model", "tiny", "--concepts", "one"]) == 2
    assert "--concepts 'one'" in capsys.readouterr().err


def test_cuda_graph_flag_needs_a_cuda_model(capsys):
    import torch

    if torch.cuda.is_available():
        import pytest

        pytest.skip("this machine has CUDA: the flag is valid here")
    assert main(["bench", "latency", "--model", "tiny", "--steps", "2", "--cuda-graph", "--no-floor"]) == 2
    assert "--cuda-graph needs the model on a CUDA device" in capsys.readouterr().err


def test_rounds_take_turns_and_pair_each_round_with_its_bandwidth(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["bench", "latency", "--model", "tiny", "--steps", "7", "--warmup", "1", "--concepts", "0,1",
                 "--rounds", "3", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["rounds"] == 3
    assert [r["steps"] for r in record["results"]] == [7, 7]  # 3 + 2 + 2 steps per count
    f = record["floor"]
    assert len(f["stream_read_samples_gb_s"]) == 4 and len(f["p50_over_floor_by_round"]) == 3
    assert f["p50_over_floor_paired"] == sorted(f["p50_over_floor_by_round"])[1]
    assert "by round" in capsys.readouterr().out


def test_bench_stream_reports_the_split_first_sound_and_meters(tmp_path, capsys):
    """Real-time paced with steered concepts and the OSC meters subscribed: the per-frame split over
    window cycles, the re-prime's cost, the time to first sound, and the meters that arrived."""
    out = tmp_path / "s.json"
    assert main(["bench", "stream", "--model", "tiny", "--seconds", "4", "--window", "2", "--keep", "0.5",
                 "--reprime-chunk", "8", "--concepts", "2", "--meters", "--note", "baseline",
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["error"] is None and r["frames"] == 200 and r["reprimes"] >= 2
    assert r["concepts_steered"] == 2 and r["note"] == "baseline" and r["paced"] == "realtime"
    assert r["meters"]["on"] and r["meters"]["meter_messages"] > 0 and r["meters"]["stats_messages"] > 0
    split = r["split"]
    f = split["per_frame_ms"]
    assert f["decode"] > 0 and f["codec"] > 0 and f["reprime_share"] > 0 and f["total"] > 0
    assert abs(f["decode"] + f["codec"] + f["reprime_share"] + f["other"] - f["total"]) < 1e-6
    assert split["averaged_over"]["window_cycles"] >= 1
    rp = split["reprime"]
    assert rp["positions_per_step"] == 8 and rp["ms_per_window_cycle"] > 0 and rp["ms_per_position"]["p50"] > 0
    first = r["time_to_first_sound_s"]
    assert first["from_process_start"] > first["model_load"] > 0 and first["from_session_start"] > 0
    assert "other_processes_cores_busy" in r and isinstance(r["working_tree_changes"], list)


def test_bench_stream_window_cost_predicts_windows(tmp_path, capsys):
    out = tmp_path / "s.json"
    assert main(["bench", "stream", "--model", "tiny", "--seconds", "1", "--fast", "--window", "2", "--keep",
                 "0.5", "--reprime-chunk", "8", "--window-cost", "--kv-cache", "int8", "--codec-precision", "int8",
                 "--codec-threads", "2", "--no-codec-overlap", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["precision"] == {"dtype": "float32", "weights": "full", "kv_cache": "int8", "codec": "int8",
                                   "codec_threads": 2, "codec_overlap": False}
    assert record["split"]["per_frame_ms"]["codec_inside_decode"] == 0.0
    w = record["window_cost"]
    assert set(w["step_ms_by_position"]) >= {"25"} and len(w["prefill_ms_by_slice"]) == 6
    assert w["prefill_fit_ms"]["per_position"] >= 0 or w["prefill_fit_ms"]["per_slice"] > 0
    for p in w["predicted_per_frame"]:
        assert p["decoder_per_frame_ms"] == p["step_mean_ms"] + p["reprime_share_ms"]


def test_bench_latency_blends_prompts(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["bench", "latency", "--model", "tiny", "--steps", "4", "--warmup", "1", "--concepts", "0",
                 "--prompts", "4", "--no-floor", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["prompts"] == 4
    assert "4 prompts blended" in capsys.readouterr().out
    assert main(["bench", "latency", "--model", "tiny", "--prompts", "0"]) == 2
    assert "--prompts 0" in capsys.readouterr().err
    assert main(["bench", "latency", "--model", "tiny", "--steps", "3", "--warmup", "1", "--prompts", "1,2,4",
                 "--json", str(out)]) == 0
    record = json.loads(out.read_text())  # the counts took turns, step by step
    assert record["benchmark"] == "latency-prompts" and record["interleaved"] == "per step"
    assert {k: r["steps"] for k, r in record["results"].items()} == {"1": 3, "2": 3, "4": 3}
    assert record["p50_over_first_pct"]["1"] == 0.0
    assert "p50 vs first" in capsys.readouterr().out


def test_prompt_swaps_are_judged_against_their_neighbours():
    from musicsteer.bench.prompts import judge

    ms = np.full(300, 5.0)
    ms[::10] = 8.0  # the neighbours' p99 is 8 ms
    ms[100], ms[201] = 8.9, 9.5  # within p99 + 1 ms; the step after a swap, over it
    swaps = judge(ms / 1e3, [(100, 98, "a"), (200, 190, "bb")], [0.2, 0.3])
    assert [(s["step"], s["waited_steps"], s["text_bytes"], s["clean"]) for s in swaps] == [
        (100, 2, 1, True), (200, 10, 2, False)]
    assert swaps[0]["neighbours_p99_ms"] == 8.0 and swaps[1]["step_ms"] == 9.5


def test_bench_prompts_sends_prompts_over_oscsend(tmp_path, capsys):
    import shutil

    import pytest

    if shutil.which("oscsend") is None:
        pytest.skip("liblo's oscsend is not installed (scripts/debian-packages.txt lists liblo-tools)")
    out = tmp_path / "p.json"
    main(["bench", "prompts", "--model", "tiny", "--seconds", "3", "--every", "1", "--json", str(out)])
    record = json.loads(out.read_text())  # whether every swap was clean depends on the host's load
    assert record["with_changes"]["sent"] >= 2 and len(record["swaps"]) >= 2
    assert all(s["asked_at"] >= 0 and s["step"] > s["asked_at"] and s["swap_ms"] < 50 for s in record["swaps"])
    # 3 s is 150 steps, give or take one at each end: the start snapshot and the end check can fall
    # between a step's count and its audio's push (which comes later still with the codec beside the step)
    assert record["without_changes"]["steps"] >= 148 and record["without_changes"]["error"] is None
    assert "every swap within its neighbours' p99 + 1 ms" in capsys.readouterr().out
