"""Tests for bench.py: the subcommands parse, and `speed` gathers every figure into one table
set against its target (the timings themselves are benchmarks, never tested)."""

import pytest

import bench


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
    """`bench.py speed` on a toy size: one row per LLM measure, per encoder duration, and the
    mixed batch, each with its target."""
    pytest.importorskip("transformers")
    table = bench.main(["speed", "--dim", "32", "--ffn", "64", "--layers", "1", "--heads", "2", "--kv-heads", "1",
                        "--vocab", "64", "--train-len", "16", "--new-tokens", "4", "--prompt-len", "4",
                        "--reps", "1", "--decode-batches", "1", "--durations", "10,20"])
    measures = [row[0] for row in table]
    assert measures == ["LLM train step fwd+bwd, ours / transformers", "LLM decode batch 1, ours / transformers",
                        "encoder ms per ECG-second, 10 s", "encoder ms per ECG-second, 20 s",
                        "mixed batch: windowed vs zero-padded time"]
    assert all(isinstance(met, bool) for *_, met in table)
    assert "mixed batch: windowed vs zero-padded time" in capsys.readouterr().out


def test_median_time_runs_at_least_the_minimum_and_takes_the_median():
    calls = []
    t = bench.median_time(lambda: calls.append(1), "cpu", min_reps=4, min_time_s=0.0)
    assert len(calls) == 4 and t >= 0.0


def test_read_times_every_reader_count_on_records_it_writes(capsys):
    figures = bench.main(["read", "--records", "8", "--workers", "1,2"])
    assert [n for n, _ in figures] == [1, 2] and all(rate > 0 for _, rate in figures)
    assert "| reader processes | records/s |" in capsys.readouterr().out
