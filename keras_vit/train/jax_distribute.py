"""The JAX strategies of the recipes: ``keras.distribution`` on a device mesh, in one process or several.

``strategy=jax_data|jax_fsdp|jax_tensor`` picks ``keras_vit.distribution``'s ``"data"``, ``"fsdp"`` or
``"tensor"`` layout; ``mesh_shape`` the mesh: ``[devices]`` (the default: every device) for data and FSDP,
``[batch, model]`` for tensor parallelism (default: one row per process, its local devices on the ``model``
axis). Several processes (hosts) form one run through ``jax.distributed``, started by
``keras.distribution.initialize`` from Keras' variables ``KERAS_DISTRIBUTION_JOB_ADDRESSES`` (the coordinator's
``host:port`` first), ``KERAS_DISTRIBUTION_NUM_PROCESSES`` and ``KERAS_DISTRIBUTION_PROCESS_ID``; on a Cloud TPU
pod JAX finds the rest itself once ``KERAS_DISTRIBUTION_NUM_PROCESSES`` is set. Each process then reads its own
part of every batch (``keras_vit.train.data.pipeline``'s ``shard``); process 0 writes the outputs.
"""

import logging
import os

import keras
import numpy as np

from keras_vit.distribution import batch_axis, model_parallel

log = logging.getLogger(__name__)
STRATEGIES = {"jax_data": "data", "jax_fsdp": "fsdp", "jax_tensor": "tensor"}
CLUSTER_VARIABLES = ("KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES", "KERAS_DISTRIBUTION_PROCESS_ID")


def initialize_processes():
    """Joins the ``jax.distributed`` cluster the ``CLUSTER_VARIABLES`` describe (once; nothing without them)."""
    import jax

    if not any(os.environ.get(name) for name in CLUSTER_VARIABLES) or jax.distributed.is_initialized():
        return
    keras.distribution.initialize()
    log.info("Process %d of %d (jax.distributed), %d local of %d devices.", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())


def process():
    """``(index, count)`` of this process among the run's JAX processes; ``(0, 1)`` on other backends."""
    if keras.backend.backend() != "jax":
        return 0, 1
    import jax

    return jax.process_index(), jax.process_count()


def mesh(strategy, mesh_shape=None):
    """The ``keras.distribution.DeviceMesh`` of ``strategy`` (a key of ``STRATEGIES``) over every device."""
    import jax

    devices = keras.distribution.list_devices()
    if STRATEGIES[strategy] == "tensor":
        shape, names = mesh_shape or [jax.process_count(), jax.local_device_count()], ("batch", "model")
    else:
        shape, names = mesh_shape or [len(devices)], ("batch",)
    if len(shape) != len(names) or int(np.prod(shape)) != len(devices):
        from keras_vit.train.settings import SettingError

        raise SettingError(
            f"mesh_shape={list(shape)} is not allowed with strategy={strategy!r}: expected "
            f"{'[batch, model]' if len(names) == 2 else '[devices]'} with a product of {len(devices)}, the devices of "
            f"this run ({jax.process_count()} process(es) x {jax.local_device_count()}).",
            "mesh_shape", mesh_shape,
        )
    return keras.distribution.DeviceMesh(tuple(shape), names, devices)


def distribution(strategy, mesh_shape=None):
    """The run's ``keras.distribution`` (not set here): ``keras_vit.distribution.model_parallel`` on ``mesh``.

    The pipeline shards its batches per process itself, so Keras' own dataset sharding is off.
    """
    return model_parallel(mesh(strategy, mesh_shape), STRATEGIES[strategy], auto_shard_dataset=False)


def batch_parts(distribution):
    """How many parts the batch is split into: the size of the distribution's batch axis."""
    device_mesh = distribution.device_mesh
    axis = batch_axis(device_mesh, distribution.strategy, distribution.axis)
    return device_mesh.shape[list(device_mesh.axis_names).index(axis)]


def host_array(variable):
    """The whole value of ``variable`` as a NumPy array in this process, gathered from every process that holds
    a part (a collective: every process calls it, in the same order)."""
    value = variable.value if isinstance(variable, keras.Variable) else variable
    if keras.backend.backend() == "jax" and not value.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(value, tiled=True))
    return keras.ops.convert_to_numpy(value)


def saveable(model):
    """A model this process can save with ``model.save``: ``model`` itself in a single process; in a run of several
    processes (call it in every one: the weights are gathered), on process 0 a copy of ``model`` on its own devices
    holding the whole weights (without the optimizer's state, which the checkpoints hold), None on the others. Call
    it outside the run's ``keras.distribution``."""
    index, count = process()
    if count == 1:
        return model
    arrays = [host_array(weight) for weight in model.weights]
    if index != 0:
        return None
    copy = type(model).from_config(model.get_config())
    copy.set_weights(arrays)
    return copy
