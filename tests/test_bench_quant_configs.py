"""The benchmarks build their quantization configs with the typed API, never the deprecated `QuantConfig`."""

from __future__ import annotations

import argparse
import importlib
import re
import warnings
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module


def test_the_benchmarks_config_builders_give_typed_configs_without_a_deprecation_warning(bench):
    from hf_cd.quant import BaseQuantConfig, QuantConfig
    from hf_cd.quant.runtimes import OnnxRuntimeInt8Config

    efficacy, diagnosis, int8 = bench("efficacy"), bench("efficacy_diagnosis"), bench("int8_runtimes")
    anomaly, qat, speed, speed_cpu = (
        bench("ptq_anomaly"),
        bench("qat"),
        bench("quant_speed"),
        bench("quant_speed_cpu"),
    )
    reconstruction = bench("reconstruction")
    onnxruntime = OnnxRuntimeInt8Config(num_threads=1)
    speed_args = speed.parse_args(["--device", "cpu", "--allow-dirty"])
    recon_args = argparse.Namespace(num_calibration=8, batch_size=4, seed=0, alpha=0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        configs = [
            *(
                efficacy.pretrained_row_config(spec, w, a, 0)
                for spec, (w, a), _ in efficacy.pretrained_rows()
            ),
            diagnosis.quant_config("repq", 4, 16, 0),
            *(m for m in int8.row_methods(["onnxruntime-int8"], onnxruntime) if not isinstance(m, str)),
            *(anomaly.variant_config(variant, 6) for variant in anomaly.VARIANTS),
            *(qat.ptq_config(spec, "W4A4", 0) for spec in qat.DEFAULT_PTQ),
            speed.config_from_args(speed_args),
            *(speed_cpu.config_for(name, 8) for name in (*speed_cpu.STATIC, *speed_cpu.RECONSTRUCTION)),
            *(reconstruction.method_config(method, (4, 8), recon_args) for method in reconstruction.METHODS),
        ]
    assert configs and all(isinstance(c, BaseQuantConfig) and not isinstance(c, QuantConfig) for c in configs)


def test_no_benchmark_constructs_the_deprecated_quant_config():
    callers = [p.name for p in BENCH.glob("*.py") if re.search(r"(?<![\w.])QuantConfig\(", p.read_text())]
    assert not callers, f"use the typed configs (hf_cd.quant.parse_quant_spec) in {callers}"
