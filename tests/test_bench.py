"""Tests for bench.py: the subcommands parse, and `speed` gathers every figure into one table
set against its target (the timings themselves are benchmarks, never tested)."""

from types import SimpleNamespace

import pytest

from bench import speed as bench


def test_subcommands_parse_and_explain_themselves(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["llm", "--help"])
    assert e.value.code == 0 and "--decode-batches" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        bench.main(["encoder", "--help"])
    assert e.value.code == 0 and "--durations" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        bench.main(["nonsense"])
    assert e.value.code == 2


def test_speed_mode_gathers_every_figure_in_one_table(capsys):
    """A smoke run of `bench.py speed` on a toy size: every benchmark runs and gives its row (one per LLM
    measure, per encoder duration, and the mixed batch; several durations: the next test)."""
    pytest.importorskip("transformers")
    table = bench.main(["speed", "--dim", "32", "--ffn", "64", "--layers", "1", "--heads", "2", "--kv-heads", "1",
                        "--vocab", "64", "--train-len", "16", "--new-tokens", "4", "--prompt-len", "4",
                        "--reps", "1", "--decode-batches", "1", "--durations", "10"])   # each duration: 2 processes
    measures = [row[0] for row in table]
    assert measures == ["LLM train step fwd+bwd, ours / transformers", "LLM decode batch 1, ours / transformers",
                        "encoder ms per ECG-second, 10 s", "mixed batch: windowed vs zero-padded time"]
    assert "mixed batch: windowed vs zero-padded time" in capsys.readouterr().out


def test_speed_sets_each_figure_against_its_target(monkeypatch, capsys):
    llm = [("train step fwd+bwd", 900.0, 1000.0, None), ("decode batch 1", 60.0, 50.0, None)]
    enc = [{"seconds": 10.0, "time_s": 0.004}, {"seconds": 60.0, "time_s": 0.0042}, {"seconds": 600.0, "time_s": 0.03}]
    monkeypatch.setattr(bench, "bench_llm", lambda args: llm)
    monkeypatch.setattr(bench, "bench_encoder", lambda *a: (enc, [("dense", 1, 1, 0.4), ("padded", 1, 1, 4.0)]))
    table = bench.speed(SimpleNamespace(device="cpu", durations="10,60,600"))
    met = {measure: m for measure, _, _, m in table}
    assert met == {"LLM train step fwd+bwd, ours / transformers": False,       # 0.9x of transformers
                   "LLM decode batch 1, ours / transformers": True,            # 1.2x
                   "encoder ms per ECG-second, 10 s": False,                   # 0.4 ms vs 0.05: 8x the longest's
                   "encoder ms per ECG-second, 60 s": False,                   # 1.4x: not flat
                   "encoder ms per ECG-second, 600 s": True,
                   "mixed batch: windowed vs zero-padded time": True}
    assert "0.90x" in capsys.readouterr().out


def test_median_time_runs_at_least_the_minimum_and_takes_the_median(monkeypatch):
    calls = []
    t = bench.median_time(lambda: calls.append(1), "cpu", min_reps=4, min_time_s=0.0)
    assert len(calls) == 4 and t >= 0.0
    # the times each run takes, set here: the median is neither their mean, the fastest, nor the last
    times = []
    monkeypatch.setattr(bench, "timed", lambda fn, device: times.pop(0))
    times[:] = [5.0, 1.0, 3.0, 100.0]
    assert bench.median_time(None, "cpu", min_reps=4, min_time_s=0.0) == 4.0 and times == []
    times[:] = [9.0, 1.0, 5.0, 7.0]
    assert bench.median_time(None, "cpu", min_reps=3, min_time_s=0.0) == 5.0 and times == [7.0]
    times[:] = [0.3] * 4 + [0.1, 0.2]        # short runs: more of them, until they add up to min_time_s
    assert bench.median_time(None, "cpu", min_reps=2, min_time_s=1.0) == 0.3 and times == [0.1, 0.2]


def test_read_times_every_reader_count_on_records_it_writes(capsys, monkeypatch):
    clock = iter([0.0, 2.0, 10.0, 14.0])   # each reader count's start and end: 2 s, then 4 s
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    read = []

    class Reader(bench.RowECGReader):   # the records as the benchmark reads them, in the main process
        def __call__(self, row):
            out = super().__call__(row)
            read.append((row["ecg_path"], [r.signal.shape for r in out]))
            return out
    monkeypatch.setattr(bench, "RowECGReader", Reader)
    figures = bench.main(["read", "--records", "8", "--workers", "1,2"])
    assert figures == [(1, 8 / 2.0), (2, 8 / 4.0)]                      # records per second of the clock
    assert "| 1 | 4 | 4000.0 |" in capsys.readouterr().out              # 16 records' worth of 2 s / 8, in ms
    names = [f"r{k:05d}" for k in range(8)]
    assert read == [(name, [(12, 1000)]) for name in names] * 2          # every record, 12 leads x 10 s at 100 Hz
