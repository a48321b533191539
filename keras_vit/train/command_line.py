"""What the recipes' command lines do with their parsed arguments: resolve the settings, print them, or run.

The recipes (``recipes/``) parse their arguments before importing ``keras_vit`` (so ``--help`` is instant)
and hand them here. Errors a user can fix (a wrong setting, a folder in use, checkpoints of other settings,
a read-only folder, a full disk, an unreachable cluster: ``RUN_ERRORS``) are one line on stderr and exit
status 1, not a traceback.
"""

import json
import logging
import os
import sys

import keras

from keras_vit.train import building, engines, run_folder, runner, settings

RECIPE_DEFAULTS = {"finetune": settings.FINETUNE, "pretrain": settings.PRETRAIN, "pretrain_ssl": settings.PRETRAIN_SSL}


def recipe_main(recipe, args, error, restart=None):
    """Runs ``recipe`` (a key of ``RECIPE_DEFAULTS``) with parsed ``args`` (``preset``, ``output_dir``,
    ``print_config``, ``list_settings``, ``overrides``); ``error(message)`` reports a wrong command line
    (argparse's ``parser.error``: exit status 2). ``restart(backend)``, when given, starts the recipe again
    under another Keras backend (the ``engine`` setting's: ``keras_vit.train.engines``) and does not return.
    Returns the exit status."""
    if args.list_settings:
        print(settings.settings_table(), end="")
        return 0
    try:
        config = settings.load_config(RECIPE_DEFAULTS[recipe], args.preset, args.overrides)
        if args.output_dir:
            config["output_dir"] = args.output_dir
    except ValueError as wrong:
        return error(str(wrong))
    if args.print_config:
        print(json.dumps(config, indent=2))
        return 0
    show_logs()

    def train():
        if restart is not None:
            backend = engines.launch_backend(building.engine_choice(config, can_switch=True),
                                             keras.backend.backend(), "KERAS_BACKEND" in os.environ)
            if backend is not None:
                logging.getLogger(__name__).info("engine=%s: starting again on Keras' %s backend.", config["engine"], backend)
                restart(backend)
        runner.run(config)
        return 0

    return guarded_main(train)


# What a user can fix: wrong settings or data, a folder in use or of another run, files that cannot be read or
# written (a read-only folder, a full disk), an unreachable host or cluster. Other exceptions are bugs: tracebacks.
RUN_ERRORS = (ValueError, OSError, run_folder.FolderInUseError)


def guarded_main(run):
    """``run()``'s exit status (its return value), or 1 after one line on stderr when it fails with one of
    ``RUN_ERRORS``; other exceptions (bugs) keep their traceback."""
    try:
        return run()
    except RUN_ERRORS as failure:
        print(f"error: {describe(failure)}", file=sys.stderr)
        return 1


def describe(failure):
    """One line for ``failure``: an ``OSError`` of a file (a full disk, no permission) names the file and what to do."""
    if isinstance(failure, OSError) and not isinstance(failure, (ConnectionError, run_folder.FolderNotWritableError)) \
            and failure.filename and failure.strerror:
        return (f"cannot write or read {failure.filename}: {failure.strerror}. Free space or fix the permissions, "
                "then re-run the same command: the run resumes from its last checkpoint.")
    return " ".join(str(failure).split())


def show_logs():
    """The command line shows keras_vit's INFO lines (progress, adaptations) when nothing else handles them."""
    logger = logging.getLogger("keras_vit")
    if not logger.handlers and not logging.getLogger().handlers:
        logging.basicConfig(format="%(name)s: %(message)s")
        logger.setLevel(logging.INFO)
