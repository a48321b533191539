#!/usr/bin/env python3
"""Export a model (.keras or official .npz) to SavedModel, TFLite (float32/float16/int8), ONNX or OpenVINO, verified against Keras.

    python tools/export.py runs/main/finetune/model.keras exported/vit_tflite_int8.tflite --format tflite --quantization int8

What the artefacts take (H x W x C: the model's input):
  saved_model  serving_default: encoded images (string [B]); serve_pixels: uint8 [B, h, w, 1|3|4]; any size,
               resized and mapped to [-1, 1] inside; outputs logits, top_k_classes, top_k_scores, ok (per image)
  tflite       float32 [1, H, W, C] in [-1, 1] ((pixels - 127.5) / 127.5), already resized: nothing is resized
               or normalised inside; outputs [1, classes] logits. Run it with LiteRT (pip install ai-edge-litert).
  onnx         float32 [B, H, W, C] in [-1, 1], already resized; outputs [B, classes] logits.
  openvino     OpenVINO IR: OUTPUT is the .xml, its weights go to the .bin beside it; input and outputs as onnx.
"""

import argparse
import json
import sys


def main(argv=None):
    from keras_vit.export import FORMATS

    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="a .keras model or an official .npz checkpoint")
    parser.add_argument("output", help="output path (a folder for saved_model, a file otherwise)")
    parser.add_argument("--format", choices=FORMATS, default="saved_model", help="what each takes: see below")
    parser.add_argument("--quantization", choices=["float16", "int8"], help="TFLite only")
    parser.add_argument("--images", nargs="*", default=[], help="image files to compare on, resized to the model's (native) size (default: 8 random images)")
    parser.add_argument("--top-k", type=int, default=5, help="SavedModel: classes returned by the signatures")
    parser.add_argument("--force", action="store_true", help="replace an existing output (never the input model)")
    args = parser.parse_args(argv)

    import keras

    import keras_vit
    from keras_vit import export
    from keras_vit.preprocessing import load_images
    from keras_vit.pretrained.load import architecture_of

    try:
        model = keras_vit.from_official_checkpoint(args.model) if args.model.endswith(".npz") else keras.models.load_model(args.model)
    except (OSError, ValueError) as error:
        print(f"error: cannot load {args.model}: {error}", file=sys.stderr)
        return 1
    images = None
    if args.images:
        arch = architecture_of(model)  # a model of any size is compared at its native size
        images = load_images(args.images, arch.native_image_size, arch.channels)
    try:
        result = export.export(
            model, args.output, args.format, args.quantization, images, args.top_k, args.force, inputs=[args.model]
        )
    except (FileExistsError, ValueError, ImportError, export.ExportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    print(f"{result['format']}{'/' + result['quantization'] if result['quantization'] else ''}: {result['bytes']:,} bytes, "
          f"largest |logit - Keras| {result['max_abs_diff']:.3g}, top-1 agreement {result['top1_agreement']:.1%}")
    return 0


if __name__ == "__main__":
    from keras_vit.cli import tool_main

    sys.exit(tool_main(main, "export.py"))
