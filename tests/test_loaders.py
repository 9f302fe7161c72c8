"""modelshare.loaders: the same model as a plain load, without a private copy of the weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelshare import Processes, SharedModel, loader_fingerprint, memory
from modelshare._host.inventory import list_segments
from modelshare.loaders import JoblibMmap, OnCpu, Pretrained, TorchStateDict


def _mlp(width: int):
    import torch

    return torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, 4))


def _mlp_with_scratch(width: int):
    import torch

    model = _mlp(width)
    model.register_buffer("scratch", torch.ones(width), persistent=False)  # not in any state dict
    return model


def test_torch_state_dict_builds_the_same_model_over_the_mapped_file(tmp_path: Path, shm_dir: Path) -> None:
    torch = pytest.importorskip("torch")
    path = tmp_path / "mlp.pt"
    torch.manual_seed(0)
    reference = _mlp(64).eval()
    torch.save(reference.state_dict(), path)
    loader = TorchStateDict(_mlp, path, params={"width": 64})
    model = loader()
    x = torch.randn(3, 64)
    with torch.inference_mode():
        assert torch.equal(model(x), reference(x))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert loader_fingerprint(loader) != loader_fingerprint(TorchStateDict(_mlp, path, params={"width": 65}))
    with SharedModel(loader, key="lean-torch").use() as shared:  # shareable, and the same outputs
        with torch.inference_mode():
            assert torch.equal(shared(x), reference(x))
    del shared


def test_a_safetensors_file_builds_the_same_model_and_versions_it(tmp_path: Path, shm_dir: Path) -> None:
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors is not installed")
    path = tmp_path / "model.safetensors"
    reference = _mlp(64).eval()
    safetensors_torch.save_file(reference.state_dict(), str(path))
    shared = SharedModel(TorchStateDict(_mlp, path, params={"width": 64}), key="hf-style")
    x = torch.randn(3, 64)
    with shared.use() as model, torch.inference_mode():
        assert torch.equal(model(x), reference(x))
    del model
    retrained = _mlp(64).eval()
    safetensors_torch.save_file(retrained.state_dict(), str(path))  # new weights, same path
    assert shared.refresh() is True, "the file's identity is the version"
    with shared.use() as model, torch.inference_mode():
        assert torch.equal(model(x), retrained(x))
    del model


def test_a_state_dict_that_misses_a_buffer_says_which_or_falls_back(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    path = tmp_path / "mlp.pt"
    torch.save(_mlp(32).state_dict(), path)
    with pytest.raises(ValueError, match="does not set scratch.*pass fallback="):
        TorchStateDict(_mlp_with_scratch, path, params={"width": 32})()
    built = TorchStateDict(_mlp_with_scratch, path, params={"width": 32},
                           fallback=lambda: _mlp_with_scratch(32))()
    assert built.scratch.sum() == 32


def test_joblib_mmap_gives_views_of_the_file(tmp_path: Path) -> None:
    joblib = pytest.importorskip("joblib")
    path = tmp_path / "arrays.joblib"
    joblib.dump({"w": np.arange(100_000, dtype=np.float64)}, path)
    loaded = JoblibMmap(path)()
    assert isinstance(loaded["w"], np.memmap) and loaded["w"][-1] == 99_999


def test_on_cpu_moves_what_can_move_and_leaves_the_rest() -> None:
    torch = pytest.importorskip("torch")
    assert OnCpu(lambda: torch.ones(3))().device.type == "cpu"
    assert OnCpu(lambda: {"w": 1})() == {"w": 1}


def _tiny_gpt2(folder: Path, **save: Any) -> Any:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=500, n_positions=64)
    import torch

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder, **save)
    return model


@pytest.mark.parametrize("save", [{}, {"max_shard_size": "200KB"}], ids=["one file", "sharded"])
def test_pretrained_is_from_pretrained_without_the_copy(tmp_path: Path, shm_dir: Path, save: dict) -> None:
    import torch

    reference = _tiny_gpt2(tmp_path, **save)
    ids = torch.tensor([[1, 2, 3, 4]])
    model = Pretrained(tmp_path, "AutoModelForCausalLM")()
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # tied again
    base = Pretrained(tmp_path)()  # the checkpoint of the model with its head, into the base model
    with torch.inference_mode():
        assert torch.equal(base(ids).last_hidden_state, reference.transformer(ids).last_hidden_state)
    shared = SharedModel(Pretrained(tmp_path, "AutoModelForCausalLM"), key="gpt2", share=Processes(map_files=True))
    with shared.use() as held, torch.inference_mode():
        assert torch.equal(held(ids).logits, reference(ids).logits)
        assert memory.segment_bytes(shm_dir) < 1 << 20  # the weights stay in the safetensors files
        (info,) = list_segments(shm_dir)
        assert len(info.files) == len(Pretrained(tmp_path).files) - 1  # every weights file mapped, not config.json


def test_pretrained_names_what_is_missing_or_wrong(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        Pretrained(tmp_path)()
    _tiny_gpt2(tmp_path)
    with pytest.raises(ValueError, match="model_class"):
        Pretrained(tmp_path, "BertModel")()
