"""Choosing a ``tf.distribute`` strategy for the hardware at hand.

``get_strategy()`` picks, in this order: a TPU when one is named (argument,
``"local"`` or ``$TPU_NAME``), ``MultiWorkerMirroredStrategy`` when
``$TF_CONFIG`` describes a cluster of several tasks, ``MirroredStrategy`` when
more than one GPU is visible, and the default strategy otherwise. It logs the
choice and the replica count. Training code in ``keras_vit.training`` works
with all of them (it does not rely on ``model.fit``, which Keras 3.15 cannot
run under ``MultiWorkerMirroredStrategy``).
"""

import dataclasses
import json
import logging
import os
import socket
import time
import urllib.parse

log = logging.getLogger(__name__)
KINDS = ("auto", "tpu", "multi_worker", "mirrored", "default")
TPU_CONNECT_TIMEOUT_S = 10.0
CLUSTER_TIMEOUT_S = 300.0


TF_CONFIG_EXAMPLE = '{"cluster": {"worker": ["host1:port", "host2:port"]}, "task": {"type": "worker", "index": 0}}'
CLUSTER_JOBS = ("chief", "worker")  # the tasks that train together under MultiWorkerMirroredStrategy
WAIT_LOG_EVERY_S = 10.0


def _tf_config():
    """``$TF_CONFIG`` as a dict ({} when unset); a ``ValueError`` naming TF_CONFIG when it is malformed."""
    text = os.environ.get("TF_CONFIG") or "{}"
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"TF_CONFIG is not valid JSON ({error}); expected e.g. {TF_CONFIG_EXAMPLE}.") from None
    cluster = config.get("cluster", {}) if isinstance(config, dict) else None
    if not isinstance(cluster, dict) or not all(
        isinstance(addresses, list) and all(isinstance(a, str) for a in addresses) for addresses in cluster.values()
    ):
        raise ValueError(f"TF_CONFIG must hold a cluster of lists of 'host:port' addresses, e.g. {TF_CONFIG_EXAMPLE}; got {text}.")
    return config


def cluster_spec():
    """The cluster of ``$TF_CONFIG`` (dict), or None when it is unset or names a single task."""
    cluster = _tf_config().get("cluster") or {}
    tasks = sum(len(addresses) for addresses in cluster.values())
    return cluster if tasks > 1 else None


@dataclasses.dataclass(frozen=True)
class Task:
    """This process in the ``$TF_CONFIG`` cluster: its job (``type``), ``index``, ``address`` and whether it is the chief."""

    type: str
    index: int
    address: str
    chief: bool


def cluster_task():
    """This process's ``Task`` in the ``$TF_CONFIG`` cluster, or None without a cluster; checks the task entry."""
    cluster = cluster_spec()
    if cluster is None:
        return None
    task = _tf_config().get("task")
    if not isinstance(task, dict) or task.get("type") not in cluster or not isinstance(task.get("index"), int):
        raise ValueError(f"TF_CONFIG needs this process's task, e.g. {TF_CONFIG_EXAMPLE}; got task {task!r}.")
    kind, index = task["type"], task["index"]
    if not 0 <= index < len(cluster[kind]):
        raise ValueError(f"TF_CONFIG task index {index} is outside its cluster's {len(cluster[kind])} {kind!r} address(es).")
    chief = kind == "chief" or (kind == "worker" and index == 0 and "chief" not in cluster)
    return Task(kind, index, cluster[kind][index], chief)


def _split_address(address):
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"TF_CONFIG address {address!r} is not 'host:port'.")
    return host.strip("[]"), int(port)


def _answers(address, timeout=1.0):
    try:
        socket.create_connection(_split_address(address), timeout=timeout).close()
        return True
    except OSError:
        return False


def _close_pending(listener):
    """Accepts and closes the connections of peers that checked this task, so the queue never fills."""
    while True:
        try:
            connection, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        connection.close()


def wait_for_cluster(timeout, poll_s=0.5):
    """Waits until every other training task of ``$TF_CONFIG`` accepts connections, at most ``timeout`` seconds.

    TensorFlow's own wait for the cluster has no bound and cannot be
    interrupted (it ignores Ctrl-C and SIGTERM), so this waits first, in
    Python: this task listens on its own address meanwhile (peers waiting for
    it see it), logs the tasks still missing every ``WAIT_LOG_EVERY_S``
    seconds, and raises a ``ConnectionError`` naming the addresses that never
    answered. Ctrl-C (KeyboardInterrupt) and SIGTERM stop it.
    """
    task = cluster_task()
    if task is None:
        return
    cluster = cluster_spec()
    others = [a for job in CLUSTER_JOBS for i, a in enumerate(cluster.get(job, [])) if (job, i) != (task.type, task.index)]
    with socket.socket(socket.AF_INET6 if ":" in _split_address(task.address)[0] else socket.AF_INET) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind(("", _split_address(task.address)[1]))
        except OSError as error:
            raise ConnectionError(f"This task's TF_CONFIG address {task.address} cannot be served ({error}): is its port in use?") from None
        listener.listen(64)
        listener.setblocking(False)
        started = last_log = time.monotonic()
        missing = others
        while missing:
            _close_pending(listener)
            missing = [a for a in missing if not _answers(a)]
            waited = time.monotonic() - started
            if not missing:
                break
            if waited >= timeout:
                raise ConnectionError(
                    f"The cluster of TF_CONFIG did not come up within {timeout:g} s: no answer from {', '.join(missing)}. "
                    "Start every task with the same TF_CONFIG cluster (and its own task), check the addresses and the "
                    "firewall, or raise cluster_timeout."
                )
            if time.monotonic() - last_log >= WAIT_LOG_EVERY_S or waited < poll_s:
                log.info(f"Waiting for the cluster ({waited:.0f} s of {timeout:g} s): no answer yet from {', '.join(missing)}.")
                last_log = time.monotonic()
            time.sleep(poll_s)
    log.info(f"All {len(others) + 1} tasks of the cluster answer.")


BFLOAT16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo="/proc/cpuinfo"):
    """The CPU's feature flags (``avx2``, ``avx512_bf16``, ``amx_bf16``, ...) from ``/proc/cpuinfo``; none where
    the file cannot be read (not Linux)."""
    try:
        with open(cpuinfo) as f:
            return next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []


def cpu_has_bfloat16(cpuinfo="/proc/cpuinfo"):
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX), read from ``/proc/cpuinfo``.

    Without it TensorFlow emulates bfloat16 and mixed_bfloat16 is slower than
    float32; where the file cannot be read (not Linux) the answer is False.
    """
    return any(flag in cpu_flags(cpuinfo) for flag in BFLOAT16_CPU_FLAGS)


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


def get_strategy(kind="auto", tpu=None, timeout=TPU_CONNECT_TIMEOUT_S, cluster_timeout=CLUSTER_TIMEOUT_S):
    """Returns a ``tf.distribute.Strategy`` for this machine; see the module docstring.

    Args:
        kind: ``"auto"`` or one of ``"tpu"``, ``"multi_worker"``, ``"mirrored"``, ``"default"``.
        tpu: TPU name or ``grpc://host:port`` address, or ``"local"``; defaults to ``$TPU_NAME``.
        timeout: seconds to wait for a TPU address before a ``ConnectionError``.
        cluster_timeout: seconds a multi-worker task waits for the others (``wait_for_cluster``).
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
        wait_for_cluster(cluster_timeout)
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
    return cluster_task().chief
