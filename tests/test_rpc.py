"""Models split across llama.cpp RPC workers: two real `ggsteer rpc-server` processes on loopback
hold every layer; captures, training, every hook op and generation must equal the local model."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import warnings

import llama_cpp
import numpy as np
import pytest
from support.models import TIGHT_LLAMA_KWARGS
from support.oracle import last_logits, random_vector
from support.rpc import CLI, stop

from ggsteer import ControlVector, SteeredModel, TrainingWarning
from ggsteer.runtime.rpc import (
    EXIT_WORKER_LOST,
    RpcWorkerError,
    check_worker,
    free_port,
    library_path,
    parse_endpoints,
    start_local_worker,
)
from ggsteer.steering.interventions import Condition
from ggsteer.train import make_dataset, preset_dataset

pytestmark = pytest.mark.skipif(library_path("libggml-rpc") is None,
                                reason="llama-cpp-python was built without -DGGML_RPC=ON")

TINY = {"n_ctx": 256, "n_batch": 128, "n_seq_max": 16, **TIGHT_LLAMA_KWARGS}
PROMPTS = ["i am very happy and the dog", "the dog is", "a sad cat and the bad dog today"]


def ran_since(model, before: dict) -> dict:
    return {path: count - before[path] for path, count in model.hook.counts().items()}


@pytest.fixture(scope="module")
def workers():
    ports = [free_port(), free_port()]
    processes = [start_local_worker(port) for port in ports]
    yield [f"127.0.0.1:{port}" for port in ports]
    for process in processes:
        process.send_signal(signal.SIGTERM)
    for process in processes:
        # SIGTERM stops a worker cleanly, even one with a client connected
        _, error = process.communicate(timeout=10)
        assert process.returncode == 0 and "ggsteer rpc-server: stopped" in error


@pytest.fixture(scope="module")
def remote(tiny_model_path, workers):
    model = SteeredModel(tiny_model_path, rpc_servers=workers, **TINY)
    yield model
    model.close()


@pytest.fixture(autouse=True)
def no_controls(tiny_model, remote):
    for model in (tiny_model, remote):
        model.reset_control()
    yield
    for model in (tiny_model, remote):
        model.reset_control()


def test_every_layer_lives_on_a_worker(tiny_model, remote):
    """A capture of a layer whose rows are in host memory reads them in place; one on a worker
    needs a transfer: every layer of the remote model takes one, no layer of the local one."""
    for il in range(remote.n_layer):
        for model, transfers in ((tiny_model, 0), (remote, 1)):
            before = model.hook.counts()
            model.hidden_states(["the dog is"], layers=[il])
            assert ran_since(model, before)["row_transfers"] == transfers, (il, model is remote)


def test_capture_equals_local_capture(tiny_model, remote):
    local = tiny_model.hidden_states(PROMPTS, pool="all")
    split = remote.hidden_states(PROMPTS, pool="all")
    for a, b in zip(local, split):
        relative = np.abs(a - b).max() / np.abs(a).max()
        print(f"capture max relative error {relative:.3g}")
        # same batch composition, same CPU kernels on the workers: the same bits
        np.testing.assert_array_equal(a, b)


def test_vector_trained_across_workers_equals_local(tiny_model, remote):
    pairs = make_dataset("i am very {persona} and", ["happy", "good"], ["sad", "bad"],
                         ["i feel", "the dog is", "today i", "a cat and the dog"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainingWarning)  # the tiny model's random weights separate little
        local = ControlVector.train(tiny_model, pairs, method="pca_diff", layers=[0, 1, 2])
        split = ControlVector.train(remote, pairs, method="pca_diff", layers=[0, 1, 2])
    for il in (0, 1, 2):
        a, b = local.directions[il], split.directions[il]
        cosine = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
        assert abs(cosine) >= 0.999, (il, cosine)


def condition_that_holds(model):
    """A condition just under the prompt's own cosine: it holds only if the worker's rows were read right."""
    cond = random_vector(model, 52, layers=(0, 1, 2))
    hidden = model.hidden_states([PROMPTS[0]], layers=[0], pool="mean")[0, 0]
    cosine = float(hidden @ cond.directions[0] / np.linalg.norm(hidden) / np.linalg.norm(cond.directions[0]))
    return Condition(cond * float(np.sign(cosine)), abs(cosine) - 1e-3, 0)


OPTIONS = [{"op": "add"}, {"op": "ablate"}, {"op": "clamp", "strength": -2.0},
           {"op": "add_normalized", "strength": 1.3}, {"op": "add", "when": "generated"}, {"op": "add", "first_k": 3},
           {"op": "add", "condition": "holds"}]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_steered_logits_and_text_equal_local(tiny_model, remote, options):
    vector = random_vector(tiny_model, 51, scale=3.0)
    options = dict(options)
    strength = options.pop("strength", 1.0)
    if options.get("condition") == "holds":
        options["condition"] = condition_that_holds(tiny_model)
    results = []
    for model in (tiny_model, remote):
        model.set_control(vector, strength, layers=[1, 2], **options)
        before = model.hook.counts()
        logits = last_logits(model, PROMPTS[0])
        text = []
        if options.get("op") != "add_normalized":  # Llama's own loop runs past max_tokens there, locally too
            text.append(model.create_completion(PROMPTS[1], max_tokens=12, temperature=0)["choices"][0]["text"])
        counts = ran_since(model, before)
        text += model.generate_batch([PROMPTS[1]], [model.controls], max_tokens=12)
        results.append((logits, text, counts))
    (local_logits, local_text, local_counts), (logits, text, counts) = results
    np.testing.assert_array_equal(logits, local_logits)
    assert text == local_text
    if options == {"op": "add"}:
        # plain addition is llama.cpp's own adapter on the workers: the hook never runs
        assert counts["copy_path"] == 0 and counts["host_kernel"] == 0
    else:
        # the hook's ops ran on the workers' rows, through the copy path (get, kernel, set)
        assert counts["copy_path"] > 0 and counts["host_kernel"] == 0
        assert local_counts["copy_path"] == 0 and local_counts["host_kernel"] == counts["copy_path"]
    with remote.unsteered():
        assert not np.array_equal(last_logits(remote, PROMPTS[0]), logits) or options.get("when") == "generated"


def test_per_sequence_vectors_equal_local(tiny_model, remote):
    a, b = random_vector(tiny_model, 17, scale=4.0), random_vector(tiny_model, 18, scale=4.0)
    prompts = PROMPTS + ["today i feel"]
    controls = [[(a, 1.0)], None, [tiny_model.intervention(b, 1.0, op="ablate", layers=[1, 2])], [(a, 0.5), (b, 0.5)]]
    local = tiny_model.generate_batch(prompts, controls, max_tokens=12)
    before = remote.hook.counts()
    split = remote.generate_batch(prompts, controls, max_tokens=12)
    assert split == local
    assert len(set(split)) == 4
    assert ran_since(remote, before)["copy_path"] > 0


def test_busy_worker_is_a_clear_error_not_a_hang(tiny_model_path, remote, workers):
    """A worker serves one host at a time (the `remote` model holds both): a second model is refused
    within the hello timeout, naming the worker."""
    start = time.monotonic()
    with pytest.raises(RpcWorkerError, match=f"RPC worker {workers[0]}: no answer within"):
        SteeredModel(tiny_model_path, rpc_servers=workers, **TINY)
    assert time.monotonic() - start < 15


LOAD_THEN_WAIT = """
import sys
from ggsteer import SteeredModel
model = SteeredModel(sys.argv[1], rpc_servers=sys.argv[2].split(","), n_ctx=256, n_batch=128, n_threads=1)
print("loaded", flush=True)
sys.stdin.readline()
"""


def test_worker_lost_while_idle_ends_at_exit_without_hanging(tiny_model_path):
    """The model is freed at exit, which talks to the dead worker: one line and status 75, not a
    deadlock (the abort handler runs on ggml's dispatcher thread, without Python's lock)."""
    port = free_port()
    worker = start_local_worker(port)
    try:
        command = [sys.executable, "-c", LOAD_THEN_WAIT, str(tiny_model_path), f"127.0.0.1:{port}"]
        client = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        assert client.stdout.readline().strip() == "loaded"
        stop(worker)
        _, error = client.communicate("\n", timeout=30)
        assert client.returncode == EXIT_WORKER_LOST, error
        assert f"ggsteer: error: RPC worker 127.0.0.1:{port} stopped answering" in error
    finally:
        stop(worker)


def saved_vector(model, tmp_path):
    path = tmp_path / "v.gguf"
    random_vector(model, 51, scale=3.0).save(path)
    return str(path)


def test_worker_down_at_load_names_it(tiny_model, tiny_model_path, tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"
    with pytest.raises(RpcWorkerError, match=f"RPC worker {endpoint}: cannot connect"):
        SteeredModel(tiny_model_path, rpc_servers=[endpoint], **TINY)
    with pytest.raises(ValueError, match="bad RPC endpoint 'nohost'"):
        parse_endpoints("nohost")
    vector = saved_vector(tiny_model, tmp_path)
    command = CLI + ["generate", "-m", str(tiny_model_path), "-p", "the", "-v", vector, "--rpc", endpoint]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert f"ggsteer: error: RPC worker {endpoint}: cannot connect" in result.stderr
    assert "Traceback" not in result.stderr


def test_rpc_server_refuses_a_network_address_without_the_flag():
    result = subprocess.run(CLI + ["rpc-server", "--host", "0.0.0.0", "--port", str(free_port())],
                            check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "no authentication" in result.stderr and "--allow-network" in result.stderr


GENERATE_UNTIL_KILLED = """
import sys
from ggsteer import SteeredModel
model = SteeredModel(sys.argv[1], rpc_servers=sys.argv[2].split(","), n_ctx=256, n_batch=128, n_threads=1)
print("loaded", flush=True)
while True:
    model.create_completion("the dog is", max_tokens=200, temperature=0)
"""


def test_worker_killed_mid_request_then_restarted(tiny_model, tiny_model_path, tmp_path):
    ports = [free_port(), free_port()]
    processes = [start_local_worker(port) for port in ports]
    endpoints = [f"127.0.0.1:{port}" for port in ports]
    try:
        command = [sys.executable, "-c", GENERATE_UNTIL_KILLED, str(tiny_model_path), ",".join(endpoints)]
        client = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert client.stdout.readline().strip() == "loaded"
        time.sleep(0.5)  # generating now
        processes[1].kill()
        killed_at = time.monotonic()
        status = client.wait(timeout=30)
        elapsed = time.monotonic() - killed_at
        error = client.communicate()[1]
        assert status == EXIT_WORKER_LOST, error
        assert elapsed < 10
        assert f"ggsteer: error: RPC worker {endpoints[1]} stopped answering" in error
        # the survivor is free again, the restarted worker serves the next run
        stop(processes[1])
        processes[1] = start_local_worker(ports[1])
        check_worker(endpoints[0])
        vector = saved_vector(tiny_model, tmp_path)
        result = subprocess.run(CLI + ["generate", "-m", str(tiny_model_path), "-p", "the dog is", "--temp", "0",
                                       "-n", "8", "--threads", "1", "-v", vector, "--layers", "1-2",
                                       "--rpc", ",".join(endpoints)],
                                check=False, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        local = SteeredModel(tiny_model_path, n_threads=1, n_threads_batch=1)
        try:
            steering = local.intervention(ControlVector.load(vector), 1.0, layers=[1, 2])
            (expected,) = local.generate_batch(["the dog is"], [steering], max_tokens=8)  # greedy, as --temp 0
        finally:
            local.close()
        # text mode reads "\r" as a newline
        assert result.stdout == expected.replace("\r", "\n") + "\n"
    finally:
        for process in processes:
            stop(process)


class PlainBufferModel(SteeredModel):
    """Weights in plain CPU buffers, as a worker keeps them: no repacking for this host's kernels."""

    @property
    def model_params(self):
        return self.__dict__["_plain_params"]

    @model_params.setter
    def model_params(self, params) -> None:
        params.use_extra_bufts = False
        self.__dict__["_plain_params"] = params


def default_model_runs(model, vector) -> dict:
    """Last-token logits and greedy text unsteered, with the vector added (adapter) and ablated (hook)."""
    runs = {}
    for name, options in (("plain", None), ("add", {"strength": 0.6}), ("ablate", {"strength": 1.0, "op": "ablate"})):
        if options is None:
            model.reset_control()
        else:
            model.set_control(vector, **options)
        logits = last_logits(model, "Today I")
        text = model.create_completion("Today I", max_tokens=10, temperature=0)["choices"][0]["text"]
        runs[name] = (logits, text)
    model.reset_control()
    return runs


def test_default_model_steered_across_workers(default_model):
    """Gemma 3 270M (Q4_K_M) on two workers equals, bit for bit, this host with its weights in plain
    buffers as the workers keep them, unsteered, added and ablated. This host's default repacks Q4_K
    weights for other matmul kernels; the gap to that is printed (see docs/rpc.md)."""
    ports = [free_port(), free_port()]
    processes = [start_local_worker(port, threads=1) for port in ports]
    try:
        pairs = preset_dataset("happy", max_suffixes=8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TrainingWarning)  # few pairs: some layers separate weakly
            vector = ControlVector.train(default_model, pairs, method="mean_diff")
        remote_model = SteeredModel(None, rpc_servers=[f"127.0.0.1:{p}" for p in ports], n_threads=1, n_ctx=512)
        plain_model = PlainBufferModel(None, n_threads=1, n_ctx=512)
        try:
            before = remote_model.hook.counts()["copy_path"]
            runs = {name: default_model_runs(model, vector) for name, model in
                    (("repacked", default_model), ("plain", plain_model), ("remote", remote_model))}
            copies = remote_model.hook.counts()["copy_path"] - before
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", TrainingWarning)
                split_vector = ControlVector.train(remote_model, pairs, method="mean_diff")
                plain_vector = ControlVector.train(plain_model, pairs, method="mean_diff")
        finally:
            remote_model.close()
            plain_model.close()
        for case in ("plain", "add", "ablate"):
            np.testing.assert_array_equal(runs["remote"][case][0], runs["plain"][case][0])
            assert runs["remote"][case][1] == runs["plain"][case][1]
            gap = np.abs(runs["remote"][case][0] - runs["repacked"][case][0]).max()
            print(f"{case}: workers vs repacked local: max logit gap {gap:.3g}; texts {runs['remote'][case][1]!r} "
                  f"vs {runs['repacked'][case][1]!r}")
        assert runs["remote"]["add"][1] != runs["remote"]["plain"][1]  # steering acts on the workers
        assert copies > 0  # the ablation ran in the hook, on the workers' rows
        def cosine(a, b):
            return abs(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))

        for il in vector.layers:
            assert cosine(plain_vector.directions[il], split_vector.directions[il]) >= 0.999, il
        repacked = min(cosine(vector.directions[il], split_vector.directions[il]) for il in vector.layers)
        print(f"vector trained on the workers vs on the repacked local model: min |cos| over layers {repacked:.5f}")
    finally:
        for process in processes:
            stop(process)


def test_llama_cpp_exposes_the_devices_field():
    """The device list goes in through llama_model_params.devices (Llama has no argument for it)."""
    assert "devices" in dict(llama_cpp.llama_model_params._fields_)


def test_tensor_split_options_are_checked_before_loading(tiny_model, tiny_model_path, tmp_path, capsys):
    from ggsteer.cli.main import main

    vector = saved_vector(tiny_model, tmp_path)
    base = ["generate", "-m", str(tiny_model_path), "-p", "the", "-v", vector]
    assert main(base + ["--tensor-split", "1,1"]) == 2
    assert "--tensor-split needs --rpc" in capsys.readouterr().err
    assert main(base + ["--rpc", "127.0.0.1:1,127.0.0.1:2", "--tensor-split", "1,1,1"]) == 2
    assert "--tensor-split has 3 values for 2 --rpc workers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(base + ["--rpc", "127.0.0.1:1", "--tensor-split", "0,0"])
    assert "proportions must be >= 0, not all 0" in capsys.readouterr().err


def test_tensor_split_places_layers(tiny_model_path, capfd):
    """--tensor-split 0,1 puts every layer on the second worker (llama.cpp's load log says where)."""
    ports = [free_port(), free_port()]
    processes = [start_local_worker(port) for port in ports]
    try:
        capfd.readouterr()
        model = SteeredModel(tiny_model_path, rpc_servers=[f"127.0.0.1:{p}" for p in ports], tensor_split=[0, 1],
                             verbose=True, **TINY)
        try:
            log = capfd.readouterr().err
            devices = dict(re.findall(r"using device (RPC\d+) \((127\.0\.0\.1:\d+)\)", log))
            placed = re.findall(r"layer +\d+ assigned to device (\S+),", log)
            assert len(placed) == model.n_layer + 1  # the blocks and the output layer
            assert {devices[name] for name in placed} == {f"127.0.0.1:{ports[1]}"}
            model.hidden_states(["the dog is"], layers=[0, 1, 2])
            assert model.hook.counts()["row_transfers"] == 3
        finally:
            model.close()
    finally:
        for process in processes:
            stop(process)
