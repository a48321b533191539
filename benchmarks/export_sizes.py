#!/usr/bin/env python3
"""Sizes and fidelity of every export format for one model, printed as a Markdown table.

    python benchmarks/export_sizes.py --model Ti/16 --image-size 224 --out /tmp/exports
"""

import argparse
import json

import numpy as np


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="Ti/16")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--out", default="/tmp/keras_vit_exports")
    args = parser.parse_args()

    import keras_vit
    from keras_vit import export

    model = keras_vit.create_model(args.model, image_size=args.image_size)
    rng = np.random.default_rng(0)
    head = model.get_layer("head")  # the official zero head would make every image agree trivially
    head.kernel.assign(rng.normal(scale=0.05, size=head.kernel.shape).astype("float32"))
    images = rng.uniform(-1, 1, (8, args.image_size, args.image_size, 3)).astype("float32")
    rows = []
    for name, fmt, quantization in [("saved_model", "saved_model", None), ("vit.tflite", "tflite", None),
                                    ("vit_f16.tflite", "tflite", "float16"), ("vit_int8.tflite", "tflite", "int8"),
                                    ("vit.onnx", "onnx", None)]:
        rows.append(export.export(model, f"{args.out}/{name}", fmt, quantization, images, force=True))
    print(f"{args.model} at {args.image_size} px, {model.count_params():,} parameters, 8 random images\n")
    print("| format | bytes | max abs logit diff vs Keras | top-1 agreement |\n|---|---|---|---|")
    for row in rows:
        label = row["format"] + (f" ({row['quantization']})" if row["quantization"] else "")
        print(f"| {label} | {row['bytes']:,} | {row['max_abs_diff']:.2g} | {row['top1_agreement']:.0%} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
