"""Choosing a ``tf.distribute`` strategy for the hardware at hand.

``get_strategy()`` picks, in this order: a TPU when one is named (argument,
``"local"`` or ``$TPU_NAME``), ``MultiWorkerMirroredStrategy`` when
``$TF_CONFIG`` describes a cluster of several tasks, ``MirroredStrategy`` when
more than one GPU is visible, and the default strategy otherwise. It logs the
choice and the replica count. Training code in ``keras_vit.training`` works
with all of them (it does not rely on ``model.fit``, which Keras 3.15 cannot
run under ``MultiWorkerMirroredStrategy``).
"""

import json
import logging
import os
import socket
import urllib.parse

log = logging.getLogger(__name__)
KINDS = ("auto", "tpu", "multi_worker", "mirrored", "default")
TPU_CONNECT_TIMEOUT_S = 10.0


def cluster_spec():
    """The cluster of ``$TF_CONFIG`` (dict), or None when it is unset or names a single task."""
    config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    cluster = config.get("cluster") or {}
    tasks = sum(len(addresses) for addresses in cluster.values())
    return cluster if tasks > 1 else None


BFLOAT16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_bfloat16(cpuinfo="/proc/cpuinfo"):
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX), read from ``/proc/cpuinfo``.

    Without it TensorFlow emulates bfloat16 and mixed_bfloat16 is slower than
    float32; where the file cannot be read (not Linux) the answer is False.
    """
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return any(flag in flags for flag in BFLOAT16_CPU_FLAGS)


def default_precision(strategy):
    """The fastest mixed-precision policy for ``strategy``'s devices (benchmarks/RESULTS.md).

    ``"mixed_bfloat16"`` on TPUs and on CPUs with native bfloat16,
    ``"mixed_float16"`` on GPUs, ``"float32"`` on other CPUs.
    """
    import tensorflow as tf

    if isinstance(strategy, tf.distribute.TPUStrategy):
        return "mixed_bfloat16"
    if tf.config.list_logical_devices("GPU"):
        return "mixed_float16"
    return "mixed_bfloat16" if cpu_has_bfloat16() else "float32"


def _check_reachable(address, timeout):
    """Fails fast when a grpc:// TPU address does not answer (TF would otherwise wait forever)."""
    parsed = urllib.parse.urlsplit(address if "://" in address else f"grpc://{address}")
    if not parsed.hostname or not parsed.port:
        return
    try:
        socket.create_connection((parsed.hostname, parsed.port), timeout=timeout).close()
    except OSError as error:
        raise ConnectionError(
            f"TPU at {address} cannot be reached within {timeout:.0f} s ({error}). Check the TPU name or address "
            "and that this machine may reach it, or run with kind='default'."
        ) from None


def _tpu_strategy(tpu, timeout):
    import tensorflow as tf

    if tpu not in ("local", "") and ("://" in tpu or ":" in tpu):
        _check_reachable(tpu, timeout)
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, tf.errors.OpError) as error:
        raise ConnectionError(f"No TPU {tpu!r} could be initialised: {error}") from None
    return tf.distribute.TPUStrategy(resolver)


def get_strategy(kind="auto", tpu=None, timeout=TPU_CONNECT_TIMEOUT_S):
    """Returns a ``tf.distribute.Strategy`` for this machine; see the module docstring.

    Args:
        kind: ``"auto"`` or one of ``"tpu"``, ``"multi_worker"``, ``"mirrored"``, ``"default"``.
        tpu: TPU name or ``grpc://host:port`` address, or ``"local"``; defaults to ``$TPU_NAME``.
        timeout: seconds to wait for a TPU address before a ``ConnectionError``.
    """
    import tensorflow as tf

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
    tpu = tpu if tpu is not None else os.environ.get("TPU_NAME")
    if kind == "tpu" or (kind == "auto" and tpu):
        if not tpu:
            raise ValueError("kind='tpu' needs a TPU: pass tpu='name', 'local' or an address, or set TPU_NAME.")
        strategy, why = _tpu_strategy(tpu, timeout), f"TPU {tpu}"
    elif kind == "multi_worker" or (kind == "auto" and cluster_spec()):
        strategy, why = tf.distribute.MultiWorkerMirroredStrategy(), "TF_CONFIG cluster"
    elif kind == "mirrored" or (kind == "auto" and len(tf.config.list_logical_devices("GPU")) > 1):
        # All GPUs; without GPUs all logical CPUs (tests split the CPU into several).
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        strategy, why = tf.distribute.MirroredStrategy([d.name for d in devices]), "several local devices"
    else:
        strategy, why = tf.distribute.get_strategy(), "no TPU, no cluster, at most one GPU"
    log.info(f"Strategy: {type(strategy).__name__} ({why}), {strategy.num_replicas_in_sync} replica(s).")
    return strategy


def is_chief(strategy):
    """True on the task that writes outputs (worker 0 / chief; always True without a cluster)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not cluster_spec():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type == "chief" or (task_type == "worker" and task_id == 0 and "chief" not in cluster_spec())
