from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import aigc_opt as ao
from aigc_opt.bench.measurement import Measurement, median_ci, ratio_ci
from aigc_opt.errors import ConfigError, InvalidInputError
from toy_models import DictOut, make_mlp


def test_median_ci_covers_the_true_median_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    hits = 0
    trials = 400
    for _ in range(trials):
        sample = rng.lognormal(mean=0.0, sigma=0.5, size=40)  # skewed like latencies; median 1.0
        lo, hi = median_ci(sample)
        hits += lo <= 1.0 <= hi
    assert 0.90 <= hits / trials <= 0.995


def test_ratio_ci_recovers_a_known_ratio_and_pairs_rounds():
    rng = np.random.default_rng(1)
    drift = rng.lognormal(0, 0.3, size=60)  # machine noise shared by both models in a round
    base = 10.0 * drift
    cand = 4.0 * drift * rng.lognormal(0, 0.02, size=60)
    point, lo, hi = ratio_ci(base, cand)
    assert lo <= 0.4 <= hi and abs(point - 0.4) < 0.02
    assert hi - lo < 0.05  # pairing cancels the shared noise


def test_measurement_statistics():
    m = Measurement(name="m", samples=[0.01] * 9 + [0.02], batch_size=4, device="cpu", num_threads=1, flops=10**9,
                    target_peak_tflops=1.0)
    assert m.median == 0.01 and m.p99 > m.p90 >= m.median
    assert m.throughput == pytest.approx(400)
    assert m.achieved_tflops == pytest.approx(0.1) and m.roofline_fraction == pytest.approx(0.1)
    assert not m.noisy
    noisy = Measurement(name="n", samples=[0.01, 0.02, 0.03, 0.04], batch_size=1, device="cpu", num_threads=1)
    assert noisy.noisy and "noisy" in str(noisy)


def test_benchmark_one_model(mlp_model):
    meas = ao.benchmark(mlp_model, iters=12, warmup=1)
    assert len(meas.samples) == 12 and all(s > 0 for s in meas.samples)
    assert meas.batch_size == 8 and meas.num_parameters == mlp_model.num_parameters()
    assert meas.size_bytes == mlp_model.size_bytes() and meas.memory_bytes == mlp_model.memory_bytes()
    # 8x32 -> 64 -> 64 -> 10 linear layers: 2 * 8 * (32*64 + 64*64 + 64*10) FLOPs
    assert meas.flops == 2 * 8 * (32 * 64 + 64 * 64 + 64 * 10)
    assert meas.peak_memory_bytes and meas.peak_memory_bytes >= 8 * 64 * 4  # at least one hidden activation


def test_benchmark_pins_threads_and_restores():
    before = torch.get_num_threads()
    meas = ao.benchmark(ao.Model(make_mlp(), example_inputs=(torch.randn(2, 32),)), iters=3, threads=1)
    assert meas.num_threads == 1 and torch.get_num_threads() == before


def test_compare_interleaves_and_measures_fidelity(mlp_model, x):
    q = ao.quantize(mlp_model, "int8-dynamic")
    batches = [x, torch.randn(8, 32), (torch.randn(8, 32),)]
    calls = []
    original_run = ao.Model.run

    def spy(self, inputs):
        calls.append(self is q)
        return original_run(self, inputs)

    try:
        ao.Model.run = spy
        report = ao.compare(mlp_model, q, inputs=batches, iters=10, warmup=0, memory=False, settle=0)
    finally:
        ao.Model.run = original_run
    assert calls[:6] == [False, False, False, True, True, True]  # each batch checked once per model
    timed = calls[6:26]
    assert timed.count(True) == 10 and timed.count(False) == 10
    assert all(timed[i] != timed[i + 1] for i in range(0, 20, 2))  # each round runs both models
    assert timed[0::2] != [timed[0]] * 10  # the order is shuffled per round: not always the same first
    entry = report.candidate()
    assert entry.fidelity.samples == 24
    assert 0.995 < entry.fidelity.cosine_mean <= 1.0 and entry.fidelity.cosine_min <= entry.fidelity.cosine_mean
    assert 0 < entry.fidelity.max_abs_error < 0.1
    assert 0.8 <= entry.fidelity.top1_agreement <= 1.0
    assert entry.latency_ratio[0] == pytest.approx(entry.measurement.median / report.baseline.measurement.median)


def test_fidelity_is_exact_for_identical_models_and_detects_a_broken_one(mlp_model, x):
    same = ao.compare(mlp_model, mlp_model, inputs=[x], iters=2, memory=False)
    f = same.candidate().fidelity
    assert f.max_abs_error == 0 and f.cosine_min == pytest.approx(1.0) and f.top1_agreement == 1.0
    broken_net = make_mlp()
    with torch.no_grad():
        broken_net.head.weight.mul_(-1)
    broken = ao.Model(broken_net)
    f = ao.compare(mlp_model, broken, inputs=[x], iters=2, memory=False).candidate().fidelity
    assert f.cosine_mean < 0.5 and f.top1_agreement < 0.5


def test_compare_dict_outputs_and_eval_fn():
    m = ao.Model(DictOut(), example_inputs={"features": torch.randn(4, 16)})
    q = ao.quantize(m, "int8-dynamic")
    report = ao.compare(m, q, iters=3, memory=False, eval_fn=lambda model: float(model.num_parameters()))
    f = report.candidate().fidelity
    assert set(f.per_output) == {"hidden", "logits"} and f.primary_output == "hidden"
    assert report.baseline.metric == report.candidate().metric == m.num_parameters()


def test_report_renderings(mlp_model, x):
    q = ao.quantize(mlp_model, "int8-dynamic")
    report = ao.compare(mlp_model, q, inputs=[x], iters=5)
    assert all(e.measurement.peak_memory_bytes for e in report.entries)  # the probe really measured
    text = str(report)
    for row in ("latency p50 (ms)", "latency p90 (ms)", "95% CI", "throughput", "size on disk", "peak run memory",
                "parameters", "cosine vs baseline", "max abs error", "top-1 agreement"):
        assert row in text
    assert "MLP+Quantize(int8-dynamic)" in text
    md = report.to_markdown()
    assert md.startswith("| metric | MLP | MLP+Quantize(int8-dynamic) |") and "|---|---|---|" in md
    data = json.loads(report.to_json())
    assert len(data["candidates"][0]["measurement"]["samples"]) == 5
    assert data["candidates"][0]["fidelity"]["cosine_mean"] > 0.99
    assert "<table>" in report._repr_html_()


def test_bad_benchmark_inputs():
    m = ao.Model(make_mlp())
    with pytest.raises(InvalidInputError, match="example_inputs"):
        ao.benchmark(m)
    with pytest.raises(InvalidInputError, match="empty list"):
        ao.benchmark(m, inputs=[])
    with pytest.raises(ConfigError, match="iters"):
        ao.benchmark(m, inputs=torch.randn(2, 32), iters=0)
    with pytest.raises(ConfigError, match="threads"):
        ao.benchmark(m, inputs=torch.randn(2, 32), threads=0)
    with pytest.raises(InvalidInputError, match=r"inputs\[1\] \{0: \(2, 7\)"):
        ao.compare(m, m, inputs=[torch.randn(2, 32), torch.randn(2, 7)], iters=1)
    with pytest.raises(ConfigError, match="at least one candidate"):
        ao.compare(m, inputs=torch.randn(2, 32))
    with pytest.raises(InvalidInputError, match="cannot be compared"):
        ao.compare(ao.Model(DictOut()), ao.Model(_TupleOut()), inputs=[{"features": torch.randn(2, 16)}],
                   iters=1, memory=False)
    with pytest.raises(InvalidInputError, match=r"shape \(2, 4\).*\(2, 16\)"):
        ao.compare(ao.Model(_Identity()), ao.Model(_Half()), inputs=[torch.randn(2, 16)], iters=1, memory=False)


class _TupleOut(torch.nn.Module):
    def forward(self, features):
        return (features,)


class _Identity(torch.nn.Module):
    def forward(self, x):
        return x


class _Half(torch.nn.Module):
    def forward(self, x):
        return x[:, :4]


class _NaNAfter(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        out = self.inner(x).clone()
        out[0, 0] = float("nan")
        return out


def test_nan_outputs_are_reported_not_hidden(mlp_model, x):
    broken = ao.Model(_NaNAfter(make_mlp()))
    report = ao.compare(mlp_model, broken, inputs=[x], iters=2, memory=False)
    f = report.candidate().fidelity
    assert f.nonfinite == 1 and f.max_abs_error == float("inf")  # not 0: max() drops NaN silently
    assert "NaN/inf" in str(report)
    data = json.loads(report.to_json())  # strict JSON: NaN written as null
    assert data["candidates"][0]["fidelity"]["max_abs_error"] is None


def test_mixed_batch_sizes_give_mean_samples_per_call(mlp_model):
    meas = ao.benchmark(mlp_model, inputs=[torch.randn(2, 32), torch.randn(6, 32)], iters=4, memory=False)
    assert meas.batch_size == 4


def test_roofline_only_against_the_device_that_ran(mlp_model, x):
    h100 = ao.Model(make_mlp(), example_inputs=(x,), target="h100")  # runs here on the CPU
    meas = ao.benchmark(h100, iters=3, memory=False)
    if meas.device == "cpu":
        assert meas.target_peak_tflops is None and meas.roofline_fraction is None
    measured_host = ao.Model(make_mlp(), example_inputs=(x,), target=ao.Target.detect().measure())
    assert ao.benchmark(measured_host, iters=3, memory=False).roofline_fraction > 0


def test_adaptive_rounds_stop_when_stable_or_out_of_time(mlp_model, x):
    stable = ao.benchmark(mlp_model, inputs=[x], rel_ci=0.5, max_time=30, memory=False)
    assert 10 <= len(stable.samples) < 100 and stable.stop_reason.startswith("stable")
    lo, hi = stable.median_ci95
    assert (hi - lo) / 2 <= 0.5 * stable.median
    rushed = ao.benchmark(mlp_model, inputs=[x], rel_ci=1e-6, max_time=0.05, memory=False)
    assert rushed.stop_reason.startswith("time budget") and len(rushed.samples) >= 10
    fixed = ao.benchmark(mlp_model, inputs=[x], iters=7, memory=False)
    assert len(fixed.samples) == 7 and fixed.stop_reason == "7 rounds, as asked"
    with pytest.raises(ConfigError, match="rel_ci"):
        ao.benchmark(mlp_model, rel_ci=2)
    with pytest.raises(ConfigError, match="max_time"):
        ao.benchmark(mlp_model, max_time=0)


def test_outliers_are_counted_not_dropped():
    samples = [0.010 + 0.0001 * i for i in range(19)] + [0.5]  # one stall among steady calls
    m = Measurement(name="m", samples=samples, batch_size=1, device="cpu", num_threads=1)
    assert m.outliers == 1 and len(m.samples) == 20 and m.p99 > 0.1


def test_arithmetic_intensity_and_peak_source(x):
    measured = ao.Model(make_mlp(), example_inputs=(x,), target=ao.Target.detect().measure())
    meas = ao.benchmark(measured, iters=3)
    assert meas.peak_source == "measured on this machine"
    assert meas.arithmetic_intensity == pytest.approx(meas.flops / (meas.memory_bytes + meas.peak_memory_bytes))
    report = ao.compare(measured, ao.quantize(measured, "int8-dynamic"), iters=3)
    assert "fp32 peak used (measured on this machine)" in str(report) and "outliers" in str(report)


def test_plot_and_pandas(mlp_model, x, tmp_path):
    report = ao.compare(mlp_model, ao.quantize(mlp_model, "int8-dynamic"), inputs=[x], iters=8, memory=False)
    path = report.plot(tmp_path / "report.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert [p.name for p in tmp_path.iterdir()] == ["report.png"]  # no temporary file left
    frame = report.to_pandas()
    assert list(frame.columns) == ["MLP", "MLP+Quantize(int8-dynamic)"] and "latency p50 (ms)" in frame.index


def test_peak_rss_sees_memory_outside_torch_allocations():
    """The RSS probe samples the process while the call runs: a 64 MB buffer that numpy (not
    torch's allocator, so invisible to the profiler) fills and frees inside forward shows up."""
    import numpy as np

    from aigc_opt.bench.probes import _rss_reader, peak_rss_bytes

    class Burst(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            buf = np.ones(16 * 1024 * 1024, dtype=np.float32)  # 64 MB, pages touched
            return self.lin(x) + float(buf[::4096].sum()) * 0

    m = ao.Model(Burst().eval(), example_inputs=(torch.randn(2, 4),))
    read = _rss_reader()
    assert read is not None  # Linux: /proc/self/statm
    before = read()
    peak = peak_rss_bytes(m, (torch.randn(2, 4),))
    assert peak - before >= 48 * 2**20, (before, peak)
    meas = ao.benchmark(m, iters=3, warmup=1)
    assert meas.peak_rss_bytes - before >= 48 * 2**20 and meas.to_dict()["peak_rss_bytes"] == meas.peak_rss_bytes
    report = ao.compare(m, m, iters=3, verbose=False, top1=False)
    assert "process peak RSS (MB)" in str(report) and "process peak RSS" in report.to_markdown()


def test_compare_settles_each_switch_between_runtimes(mlp_model, x, monkeypatch):
    """After a model of another runtime (or any other model, for calls under 50 ms), one untimed
    call of the same model comes before the timed one."""
    pytest.importorskip("onnxruntime", reason="the [onnx] extra is part of `make test`")
    import importlib
    import itertools

    compare_module = importlib.import_module("aigc_opt.bench.compare")  # the module, not ao.compare
    onnx_model = ao.export(mlp_model, "onnx")
    int8 = ao.quantize(mlp_model, "int8-dynamic")
    sequence, seconds = [], [0.1]

    def recorder(model, batch, device):
        sequence.append(id(model))
        return seconds[0]

    monkeypatch.setattr(compare_module, "timed_call", recorder)

    def runs(candidate, call_seconds, **kwargs):
        sequence.clear()
        seconds[0] = call_seconds
        report = ao.compare(mlp_model, candidate, inputs=[x], iters=8, warmup=0, memory=False, **kwargs)
        assert all(len(e.measurement.samples) == 8 for e in report.entries)  # settle calls are not samples
        return report, [len(list(group)) for _, group in itertools.groupby(sequence)]

    # torch and ONNX Runtime, slow calls: every switch is followed by a settle call, so no run of
    # one call but the very first
    report, lengths = runs(onnx_model, 0.1)
    assert all(n >= 2 for n in lengths[1:]) and len(sequence) > 16
    assert "untimed call" in str(report) and "another runtime" in report.to_dict()["settle"]
    _, lengths = runs(onnx_model, 0.1, settle=0)
    assert sum(lengths) == 16 and min(lengths) == 1
    report, lengths = runs(int8, 0.1)  # torch and torch, 100 ms calls: no settling
    assert sum(lengths) == 16 and report.settle == ""
    report, lengths = runs(int8, 1e-3)  # 1 ms calls: any switch is settled (once a call was timed)
    assert all(n >= 2 for n in lengths[2:]) and len(sequence) > 16 and "another model" in report.settle
    _, lengths = runs(int8, 0.1, settle=2)
    assert sum(lengths) == 16 * 3
    with pytest.raises(ConfigError, match="settle must be None"):
        ao.compare(mlp_model, onnx_model, inputs=[x], iters=1, settle=-1)
