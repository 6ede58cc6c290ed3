"""Real int8 on the CPU: the real checkpoint through ``onnxruntime-int8`` against ONNX Runtime float32.

DINOv2-S/14 (the offline real checkpoint, position embeddings resampled once to ``--image-size``,
224 by default), exported and quantized by `OnnxRuntimeInt8Pipeline` (static QDQ, U8S8, per-channel
weights, MinMax calibration on 32 Fashion-MNIST training images, seed 0; by default each int8 linear
then written as ``MatMulIntegerToFloat`` with its bias inside). Each int8 variant is timed against
the float32 graph of its own export: the default export (eager attention, opset 20) and the former
one (SDPA with the exporter's softmax NaN guard, opset 18), all sessions called in turn in
every round (median of ``--runs`` rounds per batch size at 1, 8 and 32; the quartiles of the
per-round ratios show the spread). Which operators ran in int8: the op types of ONNX Runtime's
optimized graph of every session, and the time per op type from one profiled run at the largest
batch (ORT's own profiler).

    /work/heavy python bench/int8_cpu.py --threads 2
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS_DIR, environment, parse_checked, record_header

INT8_OPS = ("QLinearMatMul", "QGemm", "QLinearConv", "MatMulInteger", "MatMulIntegerToFloat",
            "DynamicQuantizeMatMul", "QLinearAdd", "QLinearMul", "QAttention", "ConvInteger")  # fmt: skip
TARGET_SPEEDUP_BATCH32 = 2.0


def optimized_op_types(path: Path, threads: int, workdir: Path) -> dict[str, int]:
    """Op types of ONNX Runtime's optimized graph (what the session really runs)."""
    import onnx
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    optimized = workdir / f"{path.stem}-optimized.onnx"
    options.optimized_model_filepath = str(optimized)
    onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return dict(
        collections.Counter(node.op_type for node in onnx.load(str(optimized)).graph.node).most_common()
    )


def profile_op_times(
    path: Path, inputs: dict, threads: int, workdir: Path, runs: int = 2
) -> dict[str, float]:
    """Share of kernel time per op type over ``runs`` profiled calls (after one unprofiled warm-up)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = str(workdir / path.stem)
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    session.run(None, inputs)
    for _ in range(runs):
        session.run(None, inputs)
    trace = json.loads(Path(session.end_profiling()).read_text())
    per_op: dict[str, float] = collections.defaultdict(float)
    for event in trace:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"]
    total = sum(per_op.values())
    return {op: round(us / total, 4) for op, us in sorted(per_op.items(), key=lambda kv: -kv[1])}


def write_markdown(json_path: Path) -> Path:
    """``int8_cpu.md`` from the JSON record: the rows, the int8 ops ORT ran, and where the time went."""
    payload = json.loads(json_path.read_text())
    columns = ["pipeline", "float_graph", "latency_ms_batch1", "speedup_vs_float_batch1", "latency_ms_batch8",
               "speedup_vs_float_batch8", "latency_ms_batch32", "float_latency_ms_batch32", "speedup_vs_float_batch32",
               "speedup_round_quartiles_batch32", "speedup_vs_default_float_batch32",
               "logits_max_abs_diff_vs_torch"]  # fmt: skip
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in payload["rows"]]
    float_rows = payload.get("float_rows", [])
    if float_rows:
        float_columns = list(float_rows[0])
        lines += ["", "Float32 graphs (ms):", "", "| " + " | ".join(float_columns) + " |",
                  "|" + "---|" * len(float_columns)]  # fmt: skip
        lines += ["| " + " | ".join(str(row[c]) for c in float_columns) + " |" for row in float_rows]
    ops = payload["optimized_graph_op_types"]
    shares = payload["kernel_time_share"]
    op_lines = []
    for name, counts in ops.items():
        integer = {op: n for op, n in counts.items() if op in INT8_OPS}
        top = ", ".join(f"{op} {100 * share:.1f}%" for op, share in list(shares[name].items())[:9])
        op_lines.append(
            f"- **{name}**: integer kernels {integer or 'none'}; kernel time at the largest batch: {top}"
        )
    header = record_header(payload)
    markdown = (
        f"# int8_cpu\n\n{header}\n\n{__doc__.split(chr(10) + chr(10))[1]}\n\nTarget: ≥ "
        f"{payload['targets']['speedup_vs_float_batch32']}× float32 at batch 32.\n\n" + "\n".join(lines)
        + "\n\nOperators in ONNX Runtime's optimized graphs, and the share of kernel time per op type (ORT profiler):\n\n"
        + "\n".join(op_lines) + "\n\nAnalysis: `int8_cpu-notes.md`.\n"
    )  # fmt: skip
    md_path = json_path.with_suffix(".md")
    md_path.write_text(markdown)
    return md_path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument(
        "--runs", type=int, nargs="+", default=[40, 12, 12], help="timed rounds per batch size"
    )
    parser.add_argument("--activation-type", default="uint8", choices=["uint8", "int8"])
    parser.add_argument("--output", default=str(RESULTS_DIR / "int8_cpu.json"))
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the .md of --output's record")
    args = parse_checked(parser, argv)
    if args.markdown_only:
        print(write_markdown(Path(args.output)).read_text())
        return
    torch.set_num_threads(args.threads)

    from cd_overhead_cpu import cpu_flags
    from hf_cd.quant.runtimes import OnnxRuntimeInt8Config, OnnxRuntimeInt8Pipeline
    from hf_cd.quant.runtimes.base import interleaved_median_ms, latency_columns, tile_images
    from hf_cd.quant.runtimes.onnxruntime_int8 import (
        INPUT_NAME,
        OUTPUT_NAME,
        OnnxRuntimeClassifier,
        quantize_onnx_int8,
    )
    from quant_speed_cpu import load

    model, images = load(args.image_size, 32)
    # Every variant is one int8 graph, timed against the float graph of the same export. The former
    # default (SDPA decomposed with a NaN guard after every softmax; opset 18, where GELU is an unfused
    # Div/Erf/Add/Mul/Mul chain; pure QDQ, the bias Add left to ORT) is kept for the side-by-side ratio.
    former_default = {"attention_implementation": "sdpa", "opset": 18, "fuse_linear_bias": False}
    common = {"num_threads": args.threads, "activation_type": args.activation_type}
    variants = {
        "onnxruntime-int8": OnnxRuntimeInt8Config(**common),
        "onnxruntime-int8:qdq_only": OnnxRuntimeInt8Config(**common, fuse_linear_bias=False),
        "onnxruntime-int8:former_default": OnnxRuntimeInt8Config(**common, **former_default),
        "onnxruntime-int8:quantize_linear_outputs": OnnxRuntimeInt8Config(**common, quantize_linear_outputs=True),
        "onnxruntime-int8:quantize_attention_matmuls": OnnxRuntimeInt8Config(
            **common, quantize_attention_matmuls=True
        ),
    }  # fmt: skip
    export_of = {name: (s.attention_implementation, s.opset) for name, s in variants.items()}
    float_name = {export: f"float:{export[0]}_opset{export[1]}" for export in set(export_of.values())}
    sessions, quantize_seconds, paths, float_paths = {}, {}, {}, {}
    for name, settings in variants.items():
        config = settings.replace(progress=False)
        export = export_of[name]
        start = time.perf_counter()
        if float_name[export] not in float_paths:  # the pipeline as a user calls it: export + quantize
            classifier = OnnxRuntimeInt8Pipeline()(model, config, images)
            float_paths[float_name[export]] = classifier.float_onnx_path
        else:  # the same float export, quantized with other settings
            path = quantize_onnx_int8(
                float_paths[float_name[export]], Path(classifier.onnx_path).parent / f"{len(paths)}.onnx",
                images, settings,
            )  # fmt: skip
            classifier = OnnxRuntimeClassifier(path, num_threads=args.threads)
        quantize_seconds[name] = time.perf_counter() - start
        sessions[name], paths[name] = classifier, classifier.onnx_path
        print(f"{name}: export + quantize {quantize_seconds[name]:.1f} s", flush=True)
    float_models = {
        name: OnnxRuntimeClassifier(path, num_threads=args.threads) for name, path in float_paths.items()
    }
    everything = {**float_models, **sessions}
    latencies: dict[str, dict[int, dict[str, float]]] = {name: {} for name in variants}
    float_latencies: dict[str, dict[int, float]] = {name: {} for name in float_models}
    round_ratios: dict[str, dict[int, list[float]]] = {name: {} for name in variants}
    for batch_size, runs in zip(args.batch_sizes, args.runs):
        inputs = {INPUT_NAME: tile_images(images, batch_size).float().numpy()}
        runners = {
            name: (lambda inputs=inputs, c=classifier: c.session.run([OUTPUT_NAME], inputs))
            for name, classifier in everything.items()
        }
        samples: dict[str, list[float]] = {}
        medians = interleaved_median_ms(runners, runs=runs, warmup=2, samples_ms=samples)
        for name in float_models:
            float_latencies[name][batch_size] = round(medians[name], 4)
        for name in variants:
            reference = float_name[export_of[name]]
            latencies[name][batch_size] = {"float": medians[reference], "quantized": medians[name]}
            round_ratios[name][batch_size] = [f / q for f, q in zip(samples[reference], samples[name])]
        print(batch_size, {k: round(v, 1) for k, v in medians.items()}, flush=True)
    with torch.no_grad():
        probe = images[:8]
        reference_logits = model(pixel_values=probe).logits
        float_logits = {name: m(pixel_values=probe).logits for name, m in float_models.items()}
        logits = {name: classifier(pixel_values=probe).logits for name, classifier in sessions.items()}
    largest = {INPUT_NAME: tile_images(images, max(args.batch_sizes)).float().numpy()}
    with tempfile.TemporaryDirectory() as workdir:
        workdir = Path(workdir)
        ops, op_time_share = {}, {}
        for name, path in {**float_paths, **paths}.items():
            ops[name] = optimized_op_types(Path(path), args.threads, workdir)
            op_time_share[name] = profile_op_times(Path(path), largest, args.threads, workdir)
    default_float = float_name[export_of["onnxruntime-int8"]]
    rows = []
    for name, settings in variants.items():
        columns = latency_columns(latencies[name])
        row = {
            "pipeline": name,
            "runtime": "onnxruntime",
            "w_bits": 8,
            "a_bits": 8,
            "activation_type": args.activation_type,
            "export_attention_implementation": settings.attention_implementation,
            "export_opset": settings.opset,
            "fuse_linear_bias": settings.fuse_linear_bias and not settings.quantize_linear_outputs,
            "float_graph": float_name[export_of[name]],
            "image_size": args.image_size,
            "num_calibration": int(images.shape[0]),
            "quantize_seconds": round(quantize_seconds[name], 3),
            **{k: round(v, 4) for k, v in columns.items()},
        }
        for batch_size in args.batch_sizes:
            ratios = sorted(round_ratios[name][batch_size])
            quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
            row[f"speedup_round_quartiles_batch{batch_size}"] = [round(q, 4) for q in quartiles]
            row[f"speedup_vs_default_float_batch{batch_size}"] = round(
                float_latencies[default_float][batch_size] / latencies[name][batch_size]["quantized"], 4
            )
        row.update(
            {
                "num_threads": args.threads,
                f"int8_kernel_time_share_batch{max(args.batch_sizes)}": round(
                    sum(v for k, v in op_time_share[name].items() if k in INT8_OPS), 4
                ),
                "logits_max_abs_diff_vs_torch": round(
                    float((logits[name] - reference_logits).abs().max()), 5
                ),
                "float_logits_max_abs_diff_vs_torch": round(
                    float((float_logits[float_name[export_of[name]]] - reference_logits).abs().max()), 7
                ),
            }
        )
        rows.append(row)
    float_rows = [
        {"graph": name, **{f"latency_ms_batch{b}": v for b, v in float_latencies[name].items()}}
        for name in float_models
    ]
    env = environment("cpu")
    env["device"] = f"{cpu_flags()}; shared machine (2 cores, runs serialized by a lock)"
    payload = {**env, "threads": args.threads, "targets": {"speedup_vs_float_batch32": TARGET_SPEEDUP_BATCH32},
               "rows": rows, "float_rows": float_rows, "optimized_graph_op_types": ops,
               "kernel_time_share": op_time_share}  # fmt: skip
    Path(args.output).write_text(json.dumps(payload, indent=2) + "\n")
    write_markdown(Path(args.output))
    print(json.dumps(rows, indent=1))
    print(json.dumps(ops))
    print(json.dumps(op_time_share))


if __name__ == "__main__":
    main()
