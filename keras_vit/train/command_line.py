"""What the recipes' command lines do with their parsed arguments: resolve the settings, print them, or run.

The recipes (``recipes/``) parse their arguments before importing ``keras_vit`` (so ``--help`` is instant)
and hand them here. Errors a user can fix (a wrong setting, a folder in use, checkpoints of other settings,
an unreachable cluster) are one line on stderr and a non-zero exit status, not a traceback.
"""

import json
import logging
import sys

from keras_vit.train import run_folder, runner, settings

RECIPE_DEFAULTS = {"finetune": settings.FINETUNE, "pretrain": settings.PRETRAIN, "pretrain_ssl": settings.PRETRAIN_SSL}


def recipe_main(recipe, args, error):
    """Runs ``recipe`` (a key of ``RECIPE_DEFAULTS``) with parsed ``args`` (``preset``, ``output_dir``,
    ``print_config``, ``list_settings``, ``overrides``); ``error(message)`` reports a wrong command line
    (argparse's ``parser.error``: exit status 2). Returns the exit status."""
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
    try:
        runner.run(config)
    except (settings.SettingError, run_folder.SettingsMismatchError, run_folder.FolderInUseError, ConnectionError) as failure:
        print(f"error: {failure}", file=sys.stderr)
        return 1
    return 0


def show_logs():
    """The command line shows keras_vit's INFO lines (progress, adaptations) when nothing else handles them."""
    logger = logging.getLogger("keras_vit")
    if not logger.handlers and not logging.getLogger().handlers:
        logging.basicConfig(format="%(name)s: %(message)s")
        logger.setLevel(logging.INFO)
