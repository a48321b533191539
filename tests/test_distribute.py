"""Multi-worker start-up: TF_CONFIG checks and the bounded, interruptible wait for the other tasks."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO
from keras_vit.train import distribute


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _lone_worker_config():
    """TF_CONFIG of worker 0 in a two-worker cluster whose worker 1 never starts."""
    ports = [_free_port(), _free_port()]
    return {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]}, "task": {"type": "worker", "index": 0}}


@pytest.mark.parametrize(
    "tf_config, named",
    [
        ("{cluster: worker}", "JSON"),
        ('{"cluster": {"worker": "127.0.0.1:1"}}', "host:port"),
        ('{"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}}', "task"),
        ('{"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "task": {"type": "worker", "index": 2}}', "index 2"),
    ],
)
def test_malformed_tf_config_names_tf_config(monkeypatch, tf_config, named):
    monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(ValueError) as raised:
        distribute.cluster_task()
    assert "TF_CONFIG" in str(raised.value) and named in str(raised.value) and "\n" not in str(raised.value)


def _lone_worker(timeout, env_extra=None):
    tf_config = _lone_worker_config()
    script = (
        "import logging; logging.basicConfig(level=logging.INFO)\n"  # what a recipe's entry point does
        f"from keras_vit.train import distribute; distribute.get_strategy('auto', cluster_timeout={timeout})"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TF_CONFIG": json.dumps(tf_config), **(env_extra or {})},
        # As a worker started from a terminal: a test run started in the background (`cmd &` in a script)
        # inherits an ignored SIGINT, and a process that starts with SIGINT ignored never sees Ctrl-C.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    return process, tf_config["cluster"]["worker"][1]


@pytest.mark.slow
def test_a_lone_worker_gives_up_after_the_timeout_naming_the_missing_peer():
    process, peer = _lone_worker(3)
    output, _ = process.communicate(timeout=50)
    assert process.returncode == 1
    waiting = [line for line in output.splitlines() if "Waiting for the cluster" in line]
    assert waiting and peer in waiting[0]
    (error,) = [line for line in output.splitlines() if line.startswith("ConnectionError:")]
    assert "TF_CONFIG" in error and peer in error and "3 s" in error


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_stop_a_waiting_worker(stop):
    process, _ = _lone_worker(600)
    lines = []
    for line in process.stdout:  # the wait has begun once it says so
        lines.append(line)
        if "Waiting for the cluster" in line:
            break
    sent = time.monotonic()
    process.send_signal(stop)
    output, _ = process.communicate(timeout=20)
    assert time.monotonic() - sent < 10
    assert process.returncode == -stop, "".join(lines) + output  # Python ends with the signal after a KeyboardInterrupt too
    assert ("KeyboardInterrupt" in output) == (stop == signal.SIGINT)


@pytest.mark.slow
def test_two_workers_find_each_other():
    """Each task listens on its address while it waits, so two waiting tasks see each other (no deadlock)."""
    ports = [_free_port(), _free_port()]
    addresses = [f"127.0.0.1:{p}" for p in ports]
    # After the wait each task serves its port, as TensorFlow's server does next.
    script = (
        "import logging, socket, sys, time; logging.basicConfig(level=logging.INFO); from keras_vit.train import distribute; distribute.wait_for_cluster(40); "
        "server = socket.create_server(('', int(sys.argv[1]))); print('ready', flush=True); time.sleep(60)"
    )
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(ports[i])], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**env, "TF_CONFIG": json.dumps({"cluster": {"worker": addresses}, "task": {"type": "worker", "index": i}})},
        )
        for i in range(2)
    ]
    try:
        for worker in workers:
            lines = []
            for line in worker.stdout:
                lines.append(line)
                if line.strip() == "ready":
                    break
            assert lines[-1].strip() == "ready" and "All 2 tasks of the cluster answer." in "".join(lines), "".join(lines)
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()
