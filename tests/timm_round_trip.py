#!/usr/bin/env python3
"""keras_vit's weights read by timm itself: the CI leg of ``keras_vit.save_weights`` (two environments).

    python tests/timm_round_trip.py export OUT   # keras_vit's environment: writes the files and what timm must give
    python tests/timm_round_trip.py check OUT    # timm's (torch, timm 1.0.31): reads them, prints the table

``export`` writes, for the shared fixtures keras_vit builds and for a model fine-tuned 3 steps by the main job's
recipe (``runner.run`` on conftest's tiny digits run), each layout timm reads: the timm folder (read by
``timm.create_model(config["architecture"], **config["model_args"])`` + strict ``load_state_dict``, and by
``timm.create_model("local-dir:...", pretrained=True)``), the official and big_vision ``.npz`` (read by timm's
``load_pretrained``, its ``_load_weights``, into the model the folder's config makes). Expected outputs: the
fixtures' own reference logits (made by the official code, big_vision and timm), and keras_vit's logits for the
fine-tuned model. ``check`` prints fixture x layout x reader x the largest difference and fails above 1e-5.
"""

import json
import sys
from pathlib import Path

TOLERANCE = 1e-5


def export(out):
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conftest import (TIMM_FIXTURES, TIMM_TODAY, TINY_RUN, big_vision_path, big_vision_reference, fixture_path,
                          load_reference, timm_fixture_model, timm_reference)

    import keras
    import keras_vit
    from keras_vit.train import runner, settings

    cases = []

    def write(label, model, layouts, images, logits, pre_logits):
        """The timm folder and ``layouts``' .npz files of ``model``, and the cases that read them."""
        io = out / f"{label}.io.npz"
        np.savez(io, images=images, logits=logits, pre_logits=pre_logits)
        folder = keras_vit.save_weights(model, out / label)
        case = dict(fixture=label, io=str(io), config=str(folder / "config.json"), folder=str(folder))
        cases.extend(dict(case, layout="timm", reader=reader) for reader in ("load_state_dict", "local-dir"))
        for layout in layouts:
            path = keras_vit.save_weights(model, out / f"{label}.{layout}.npz", layout=layout)
            cases.append(dict(case, layout=layout, reader="load_pretrained", npz=str(path)))

    for name in TIMM_TODAY:
        ref = timm_reference(name)
        # a headless model's head is timm's Identity: its "logits" are the pooled pre-logits
        write(name, timm_fixture_model(name, out), [], ref["images"], ref.get("logits", ref["pre_logits"]),
              ref["pre_logits"])
    for name in ("vit_tiny_token", "vit_tiny_gap"):
        ref, _ = load_reference(name)
        write(name, keras_vit.from_official_checkpoint(fixture_path(name, "ckpt")), ["official"], ref["images"],
              ref["logits"], ref["pre_logits"])
    for name in ("bv_map", "bv_tok"):
        ref, _ = big_vision_reference(name)
        write(name, keras_vit.from_official_checkpoint(big_vision_path(name, "ckpt")), ["big_vision"], ref["images"],
              ref["logits"], ref["out/pre_logits"])

    run = out / "finetuned_run"
    overrides = [f"output_dir={run}", "steps=3", "warmup_steps=1", "eval_every=3", "checkpoint_every=3", "log_every=3"]
    runner.run(settings.load_config(settings.FINETUNE, None, TINY_RUN + overrides))
    model = keras.models.load_model(run / "model.keras")
    images = np.random.default_rng(0).uniform(-1, 1, (4, *model.input.shape[1:])).astype("float32")
    outputs = {key: keras.ops.convert_to_numpy(value) for key, value in model.features(images).items()}
    write("finetuned_3_steps", model, ["official"], images, keras.ops.convert_to_numpy(model(images)),
          outputs["pre_logits"])
    (out / "cases.json").write_text(json.dumps(cases, indent=1))
    print(f"wrote {len(cases)} cases to {out} (timm fixtures from {TIMM_FIXTURES})")


def check(out):
    import numpy as np
    import timm
    import torch
    from safetensors.torch import load_file

    torch.set_grad_enabled(False)
    rows, failed = [], False
    for case in json.loads((out / "cases.json").read_text()):
        config = json.loads(Path(case["config"]).read_text())
        if case["reader"] == "local-dir":
            model = timm.create_model(f"local-dir:{case['folder']}", pretrained=True)
        else:
            model = timm.create_model(config["architecture"], **config["model_args"])
            if case["reader"] == "load_state_dict":
                model.load_state_dict(load_file(Path(case["folder"]) / "model.safetensors"), strict=True)
            else:
                model.load_pretrained(case["npz"])
        with np.load(case["io"], allow_pickle=False) as io:
            images, logits, pre_logits = io["images"], io["logits"], io["pre_logits"]
        model.eval()
        features = model.forward_features(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
        found = {"logits": model.forward_head(features).numpy(),
                 "pre_logits": model.forward_head(features, pre_logits=True).numpy()}
        differences = [float(np.abs(found[key] - expected).max())
                       for key, expected in (("logits", logits), ("pre_logits", pre_logits))]
        failed |= not max(differences) <= TOLERANCE
        rows.append((case["fixture"], case["layout"], case["reader"], *(f"{d:.1e}" for d in differences),
                     f"{np.abs(logits).max():.2g}"))
    header = ("fixture", "layout", "timm reader", "logits: max |diff|", "pre_logits: max |diff|", "max |logit|")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print(" | ".join(cell.ljust(width) for cell, width in zip(row, widths)))
    print(f"timm {timm.__version__}, torch {torch.__version__}: {'FAILED' if failed else 'all'} within {TOLERANCE:g}")
    return 1 if failed else 0


if __name__ == "__main__":
    mode, folder = sys.argv[1], Path(sys.argv[2])
    folder.mkdir(parents=True, exist_ok=True)
    sys.exit(export(folder) if mode == "export" else check(folder))
