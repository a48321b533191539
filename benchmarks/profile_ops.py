#!/usr/bin/env python3
"""Where a ViT step's time goes, by op: keras_vit (TensorFlow profiler, or torch.profiler on Keras' torch backend)
and timm (torch.profiler).

    python benchmarks/profile_ops.py                                  # keras_vit on TF, bfloat16, the four cells
    python benchmarks/profile_ops.py --frameworks keras_vit,keras_vit-torch,timm \\
        --python timm=/path/to/venv/bin/python --cells "inference B/16 8" "train Ti/16 32" --json out.json
    python benchmarks/profile_ops.py --report out.json                # the tables of a saved run

Each (cell, framework) runs in its own process: the step of ``benchmarks/throughput_worker.py`` (the same model,
inputs and training step as the throughput table), warmed up, timed ``--steps`` times without the profiler (the
step's wall time), then ``--steps`` more under the profiler. Op time is what the profiler records per op kind:

* TensorFlow (``tf.profiler.experimental``, graph mode or XLA): every op event ``name:OpType`` of the executor
  threads, grouped by ``OpType`` (``_MklNativeFusedMatMul``, ``Cast``, ...; an XLA step shows as its cluster
  ops). Ops on the two executor threads overlap, so the summed op time can exceed the wall time.
* PyTorch (``torch.profiler``, CPU): each op's self time (time in the op not spent in the ops it calls), grouped
  by op name (``aten::addmm``, ...), so nothing is counted twice.

The table per (cell, framework): op kind, its share of the summed op time, ms per step, calls per step; the
header gives the step's wall time and the machine (CPU model, AMX / AVX-512 BF16 flags).
"""

import argparse
import collections
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import throughput  # noqa: E402  (the architecture table, the machine description, the worker's environment)

DEFAULT_CELLS = ("inference Ti/16 32", "inference B/16 8", "train Ti/16 32", "train B/16 8")


def tf_op_times(logdir):
    """{op kind: [ms, calls]} summed over the TF profiler trace in ``logdir`` (the executor threads' op events)."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    totals = collections.defaultdict(lambda: [0.0, 0])
    for path in glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.xplane.pb")):
        space = xplane_pb2.XSpace()
        with open(path, "rb") as f:
            space.ParseFromString(f.read())
        for plane in space.planes:
            if not plane.name.startswith("/host:"):
                continue
            for line in plane.lines:
                if not line.name.startswith("tf_Compute") and not line.name.startswith("tf_XLA"):
                    continue
                for event in line.events:
                    name = plane.event_metadata[event.metadata_id].name
                    op_name, sep, kind = name.rpartition(":")
                    if not sep or "::" in name or not op_name:
                        continue  # runtime events (ExecutorState::Process, ...), not ops
                    totals[kind][0] += event.duration_ps / 1e9
                    totals[kind][1] += 1
    return totals


def profile_tensorflow(step, steps):
    import tensorflow as tf

    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir, options=tf.profiler.experimental.ProfilerOptions(python_tracer_level=0))
        for _ in range(steps):
            step()
        tf.profiler.experimental.stop()
        return tf_op_times(logdir)


def profile_torch(step, steps):
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        for _ in range(steps):
            step()
    totals = {}
    for event in profiler.key_averages():
        if event.self_cpu_time_total > 0:
            totals[event.key] = [event.self_cpu_time_total / 1e3, event.count]
    return totals


def worker(args):
    """Builds one step, times it, profiles it and prints one JSON line."""
    import throughput_worker

    protocol = sys.stdout
    sys.stdout = sys.stderr  # frameworks' prints must not break the protocol
    framework = args.framework
    step = throughput_worker.BUILDERS[framework](
        json.loads(args.spec), args.workload, args.batch, args.precision, bool(args.xla), {}
    )
    for _ in range(args.warmup):
        step()
    wall = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        wall.append(time.perf_counter() - start)
    on_tensorflow = framework == "keras_vit" or framework == "keras-hub"
    totals = (profile_tensorflow if on_tensorflow else profile_torch)(step, args.steps)
    ops = {kind: [ms / args.steps, calls / args.steps] for kind, (ms, calls) in totals.items()}
    protocol.write(json.dumps({"step_ms": 1e3 * sorted(wall)[len(wall) // 2], "ops": ops}) + "\n")


def table(result, top):
    """Markdown rows (op kind, share, ms per step, calls per step) of one profile, the ``top`` largest, then the rest."""
    ops = sorted(result["ops"].items(), key=lambda item: -item[1][0])
    total = sum(ms for ms, _ in result["ops"].values())
    lines = [
        f"Step wall time {result['step_ms']:.0f} ms (median of {result['steps']} unprofiled steps); summed op time "
        f"{total:.0f} ms per step.",
        "",
        "| op | share of op time | ms per step | calls per step |",
        "|---|---|---|---|",
    ]
    for kind, (ms, calls) in ops[:top]:
        lines.append(f"| {kind} | {100 * ms / total:.1f}% | {ms:.1f} | {calls:.0f} |")
    rest = ops[top:]
    if rest:
        ms = sum(v[0] for _, v in rest)
        lines.append(f"| {len(rest)} other op kinds | {100 * ms / total:.1f}% | {ms:.1f} | "
                     f"{sum(v[1] for _, v in rest):.0f} |")
    return "\n".join(lines)


def report(saved, top):
    info = saved["machine"]
    lines = [f"Machine: {info['cpu']} ({info.get('cpu_kind', 'kind not recorded')}), {info['cores']} cores, flags "
             f"{' '.join(info['cpu_flags']) or 'none'}.", ""]
    for result in saved["results"]:
        xla = {None: "", True: ", XLA", False: ", no XLA"}[result.get("xla")]
        lines += [
            f"**{result['workload']} {result['model']} b{result['batch']} {result['precision']}: "
            f"{result['framework']}{xla}**",
            "",
            table(result, top),
            "",
        ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", nargs="+", default=list(DEFAULT_CELLS))
    parser.add_argument("--frameworks", default="keras_vit",
                        help="comma-separated: keras_vit (TensorFlow), keras_vit-torch, keras_vit-jax, keras-hub, timm")
    parser.add_argument("--precision", default="mixed_bfloat16")
    parser.add_argument("--xla", choices=("on", "off"), default="off", help="XLA for the TensorFlow frameworks")
    parser.add_argument("--python", action="append", default=[], metavar="FRAMEWORK=PATH")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--top", type=int, default=15, help="op kinds per table (the rest summed in one row)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--json", help="write the profiles here")
    parser.add_argument("--report", metavar="JSON", help="profile nothing: print the tables of a saved run")
    # the worker's own arguments
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--framework", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.xla = int(args.xla == "on")
        return worker(args)
    if args.report:
        with open(args.report) as f:
            print(report(json.load(f), args.top))
        return

    pythons = dict(item.partition("=")[::2] for item in args.python)
    results = []
    for workload, model, batch in throughput.parse_cells(args.cells):
        spec = throughput.architecture(model, args.image_size, args.classes)
        for framework in args.frameworks.split(","):
            on_tensorflow = framework in throughput.TF_FRAMEWORKS
            command = [
                pythons.get(framework, sys.executable), os.path.abspath(__file__), "--worker",
                "--framework", framework, "--spec", json.dumps(spec), "--workload", workload,
                "--batch", str(batch), "--precision", args.precision, "--xla", args.xla if on_tensorflow else "off",
                "--steps", str(args.steps), "--warmup", str(args.warmup),
            ]
            label = f"{workload} {model} b{batch} {args.precision} {framework}"
            print(f"{label} ...", file=sys.stderr, flush=True)
            done = subprocess.run(command, capture_output=True, text=True, env=throughput.worker_environment(framework))
            if done.returncode:
                print(f"  failed: {' | '.join(done.stderr.strip().splitlines()[-3:])}", file=sys.stderr)
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            result.update(workload=workload, model=model, batch=batch, precision=args.precision,
                          framework=framework, xla=(args.xla == "on") if on_tensorflow else None, steps=args.steps)
            results.append(result)
    saved = {"machine": throughput.machine(), "args": vars(args), "results": results}
    print(report(saved, args.top))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(saved, f, indent=1)


if __name__ == "__main__":
    main()
