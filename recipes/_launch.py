"""What every recipe does before Keras starts: parse its command line, then start TensorFlow quietly.

``parse_recipe_args`` reads options and ``key=value`` settings in any order (``--preset x base_lr=0.1
--output-dir d seed=1``), and a setting also as an option: ``--seed 1`` or ``--base-lr=0.1`` is ``seed=1``
(every ``--name`` that is not one of the recipe's own options).

Importing ``keras_vit`` imports Keras, and Keras imports TensorFlow (seconds). So the recipes parse their
arguments with this module first (plain Python: ``--help`` answers at once) and import ``keras_vit`` after.
``quiet_start`` then imports TensorFlow with its native start-up notices filtered out of stderr (the oneDNN
and CPU-instruction notices, and on a machine without CUDA drivers the missing-driver notice and the
``cuInit`` error that follows it), which ``TF_CPP_MIN_LOG_LEVEL`` cannot silence because TensorFlow writes
them before its logging starts. Every other line written during the import is shown as written. On JAX, its
warning that no TPU library is installed is left out too.
"""

import argparse
import contextlib
import logging
import os
import sys
import tempfile

START_UP_NOTICES = (
    "All log messages before absl::InitializeLog() is called are written to STDERR",
    "oneDNN custom operations are on",
    "This TensorFlow binary is optimized to use available CPU instructions",
    "To enable the following instructions:",
)
NO_CUDA_DRIVER = "Could not find cuda drivers on your machine"
NO_CUDA_ERRORS = ("failed call to cuInit",)
NO_TPU_NOTICE = "Unable to initialize backend 'tpu'"  # JAX, on every machine without a TPU library


class _NoTpuNotice(logging.Filter):
    def filter(self, record):
        return NO_TPU_NOTICE not in record.getMessage()


def is_start_up_notice(line, without_driver):
    """Whether ``line`` is one of TensorFlow's start-up notices (``without_driver``: no CUDA driver here)."""
    notices = START_UP_NOTICES + ((NO_CUDA_DRIVER,) + NO_CUDA_ERRORS if without_driver else ())
    return any(notice in line for notice in notices)


@contextlib.contextmanager
def _native_stderr_filtered():
    """Collects what is written to file descriptor 2 inside the context, then writes back all but the notices."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as collected:
        os.dup2(collected.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            collected.seek(0)
            lines = collected.read().decode(errors="replace").splitlines(keepends=True)
            without_driver = any(NO_CUDA_DRIVER in line for line in lines)
            sys.stderr.write("".join(line for line in lines if not is_start_up_notice(line, without_driver)))
            sys.stderr.flush()


def quiet_start():
    """Starts TensorFlow (when the Keras backend or the data pipelines need it) without its start-up notices."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    logging.getLogger("jax._src.xla_bridge").addFilter(_NoTpuNotice())
    with _native_stderr_filtered():
        import tensorflow as tf

        tf.config.list_physical_devices()  # device discovery: where the cuInit error comes from


def settings_as_overrides(argv, options):
    """``argv`` with each ``--name VALUE`` or ``--name=VALUE`` whose ``--name`` is not in ``options`` written as the
    setting ``name=VALUE`` (dashes in the name read as underscores)."""
    rewritten, rest = [], list(argv)
    while rest:
        argument = rest.pop(0)
        name, sep, value = argument.partition("=")
        if not argument.startswith("--") or argument == "--" or name in options or (not sep and not rest):
            rewritten.append(argument)
            continue
        rewritten.append(f"{name[2:].replace('-', '_')}={value if sep else rest.pop(0)}")
    return rewritten


def parse_recipe_args(parser, argv=None):
    """``parser``'s arguments from ``argv`` (default ``sys.argv[1:]``): options and ``key=value`` settings in any
    order, and settings given as options (``settings_as_overrides``)."""
    options = set(parser._option_string_actions)  # argparse keeps no public list of its option strings
    return parser.parse_intermixed_args(settings_as_overrides(sys.argv[1:] if argv is None else argv, options))


def recipe_parser(description):
    """The command line of the single-stage recipes (finetune, pretrain, pretrain_ssl)."""
    parser = argparse.ArgumentParser(
        description=description,
        epilog="Every setting, its default and what is allowed: --list-settings (or docs/SETTINGS.md). Settings go "
        "anywhere on the line, as key=value or --key value.",
        allow_abbrev=False,  # --name is one of these options or a setting, never an abbreviation
    )
    parser.add_argument("--preset", help="a JSON file or a preset name in keras_vit/train/presets/")
    parser.add_argument("--output-dir", help="where checkpoints, logs, model and report go")
    parser.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    parser.add_argument("--list-settings", action="store_true", help="print every setting (name, default, rule) and exit")
    parser.add_argument("overrides", nargs="*", help="key=value settings (JSON values), e.g. base_lr=0.003")
    return parser


def restart_on(backend):
    """Starts this recipe again, same command line, on Keras' ``backend`` (``KERAS_BACKEND``); does not return.

    The ``engine`` setting picks the backend after the settings are read, when Keras has already started on its
    default one, which a process cannot change: the recipe runs as a new process (one more start-up, seconds),
    where ``KERAS_BACKEND`` names the backend, so it does not start again.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "KERAS_BACKEND": backend})


def run_recipe(defaults_name, description, argv=None):
    """Parses a single-stage recipe's command line, starts TensorFlow quietly and runs it, on the Keras backend its
    ``engine`` setting names (``restart_on``); the exit status."""
    parser = recipe_parser(description)
    args = parse_recipe_args(parser, argv)
    quiet_start()
    from keras_vit.train import command_line

    return command_line.recipe_main(defaults_name, args, parser.error, restart=restart_on)
