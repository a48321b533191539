"""The training application: settings, data pipelines, strategies, the training loops, the recipe runner, tuning.

``settings`` (the typed schema of every recipe setting), ``building`` (a run's environment, data, model and loop),
``trainer`` (``Trainer``, a ``tf.distribute`` loop) and ``fit_loop`` (``FitLoop``, Keras' own loop on every
backend), ``optimization``, ``checkpointing``, ``callbacks``, ``data``, ``distribute``, ``reporting``,
``run_folder``, ``runner`` (``run(config)``), ``command_line`` and ``tuning``. The model library (``keras_vit``
outside this package) never imports from here.
"""
