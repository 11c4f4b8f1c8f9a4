"""The one-GPU check (bench/gpu.py) in its smoke size on the CPU: every part runs and gives its rows, nothing failed,
and the table is written. On a CUDA machine `python -m bench.gpu` runs the same code at full size."""
import json

from bench import gpu


def test_the_smoke_check_prints_every_row_and_writes_its_table(tmp_path, capsys):
    rows, failed = gpu.main(["--smoke", "--device", "cpu", "--out", str(tmp_path)])
    assert failed == []
    parts = {part for part, _, _ in rows}
    assert parts == {"LLM", "encoder", "FSDP", "default run", "data"}
    measures = [m for _, m, _ in rows]
    for expected in ["train step fwd+bwd, fp32", "decode batch 1, fp32", "decode batch 8, fp32",
                     "one 1-lead ECG of 10 s", "one 1-lead ECG of 60 s", "mixed batch of 8 (8 s to 600 s)",
                     "4 stage-1 steps, plain", "4 stage-1 steps, FSDP2, group of one", "wall time",
                     "phase data", "phase warm-up", "phase stage 0", "phase stage 3", "phase evaluation",
                     "batch making, share of step time", "test report: statement F1",
                     "rows/s the stage-3 steps take", "PTB-XL-sized records read, 1 process"]:
        assert expected in measures, expected
    assert all(value and "FAILED" not in value for _, _, value in rows)
    table = json.loads((tmp_path / "table.json").read_text())
    assert table["device"].startswith("Smoke run") and "CPU" in table["device"]
    assert (tmp_path / "table.md").read_text().count("\n| ") == len(rows) + 1   # a header and a line per row
    printed = capsys.readouterr().out
    assert all(m in printed for m in measures)


def test_a_failing_part_is_a_row_and_the_check_says_so(tmp_path, monkeypatch, capsys):
    def broken(size, device):
        raise RuntimeError("CUDA error: an illegal memory access")
    monkeypatch.setattr(gpu, "llm_rows", broken)
    monkeypatch.setattr(gpu, "encoder_rows", lambda size, device: [("encoder", "skipped here", "-")])
    monkeypatch.setattr(gpu, "fsdp_rows", lambda size, device, out: [])
    monkeypatch.setattr(gpu, "default_run_rows", lambda size, device, out, timeout: [])
    monkeypatch.setattr(gpu, "data_rows", lambda size, out: [])
    try:
        gpu.main(["--smoke", "--device", "cpu", "--out", str(tmp_path)])
        raise AssertionError("the check did not fail")
    except SystemExit as e:
        assert "failed: LLM" in str(e)
    rows = json.loads((tmp_path / "table.json").read_text())["rows"]
    assert ["LLM", "FAILED", "RuntimeError: CUDA error: an illegal memory access"] in rows
    assert ["encoder", "skipped here", "-"] in rows


def test_a_configs_flops_are_counted_per_phase_and_grow_with_the_llms_width():
    small = ["--dim", "32", "--n_layers", "1", "--n_heads", "2", "--n_kv_heads", "1", "--vocab_size", "400",
             "--encoder_dim", "32", "--encoder_layers", "1", "--batch_size", "4", "--encoder_warmup_steps", "5"]
    narrow = dict((name, (steps, flops)) for name, steps, flops in gpu.run_flops(small))
    wide = dict((name, (steps, flops)) for name, steps, flops in gpu.run_flops(small + ["--dim", "64"]))
    assert list(narrow) == ["warm-up", "stage 0", "stage 1", "stage 2", "stage 3"]
    assert narrow["warm-up"] == wide["warm-up"] and narrow["warm-up"][0] == 5   # the encoder alone: same count
    for stage in ["stage 0", "stage 1", "stage 2", "stage 3"]:
        assert narrow[stage][1] > 0
        # weights' FLOPs grow as width squared, attention's and the vocabulary's as width: between 2x and 4x
        assert 2 < wide[stage][1] / narrow[stage][1] < 4, stage
