"""PyTorch modules through a real segment: bit-identical, tied, zero-copy, copy-on-write, 4 processes."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed (pip install -e '.[torch]')")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from benchmarks.models import torch_input, torch_mlp  # noqa: E402
from modelshare import EncodeError, SharedModel  # noqa: E402
from modelshare.codecs import codec_for  # noqa: E402

from ..support import workers as _workers  # noqa: E402
from ..support.pss import MiB, run_shared  # noqa: E402
from .test_generic import _address_range, roundtrip  # noqa: E402


class Holder(torch.nn.Module):
    """A module made of whatever the test attaches to it."""

    def forward(self, x: Any) -> Any:  # pragma: no cover - structure only
        return x


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int64, torch.bool,
          torch.uint8, torch.complex64]


def _random_tensor(shape: list[int], dtype: torch.dtype, seed: int) -> Any:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if not dtype.is_floating_point and not dtype.is_complex:
        return torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape, generator=g, dtype=dtype)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


@st.composite
def modules(draw: Any) -> Any:
    root = Holder()
    owners = [root]
    params: list[Any] = []
    for i in range(draw(st.integers(1, 7))):
        if draw(st.booleans()):
            child = Holder()
            draw(st.sampled_from(owners)).add_module(f"sub{i}", child)
            owners.append(child)
        owner = draw(st.sampled_from(owners))
        dtype = draw(st.sampled_from(DTYPES))
        shape = draw(st.lists(st.integers(0, 6), max_size=4))
        tensor = _random_tensor(shape, dtype, draw(st.integers(0, 2**31)))
        layout = draw(st.sampled_from(["plain", "transposed", "strided", "offset"]))
        if layout == "transposed" and tensor.dim() >= 2:
            tensor = tensor.transpose(0, 1)
        elif layout == "strided" and tensor.dim() >= 1:
            tensor = tensor[::2]
        elif layout == "offset" and tensor.dim() >= 1 and tensor.shape[0] > 1:
            tensor = tensor[1:]
        kind = draw(st.sampled_from(["parameter", "buffer", "non-persistent", "attribute", "tie"]))
        if kind == "tie" and params:
            setattr(owner, f"tied{i}", draw(st.sampled_from(params)))
        elif kind == "parameter" or kind == "tie":
            param = torch.nn.Parameter(tensor, requires_grad=tensor.is_floating_point())
            owner.register_parameter(f"p{i}", param)
            params.append(param)
        elif kind == "attribute":
            setattr(owner, f"a{i}", tensor)
        else:
            owner.register_buffer(f"b{i}", tensor, persistent=kind == "buffer")
    return root


def _tensors(module: Any) -> dict[str, Any]:
    found = dict(module.named_parameters(remove_duplicate=False))
    found.update(module.named_buffers(remove_duplicate=False))
    for name, sub in module.named_modules(remove_duplicate=False):
        for attr, value in vars(sub).items():
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
                found[f"{name}.{attr}".lstrip(".")] = value
    return found


def assert_same_module(a: Any, b: Any) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert list(ta) == list(tb)
    for name in ta:
        x, y = ta[name], tb[name]
        assert type(x) is type(y), name
        assert (x.dtype, x.shape, x.stride(), x.storage_offset()) == (y.dtype, y.shape, y.stride(), y.storage_offset())
        assert torch.equal(x, y), name
        assert x.requires_grad == y.requires_grad
    names = list(ta)
    for i, m in enumerate(names):  # ties and shared storages are preserved exactly
        for n in names[i + 1:]:
            assert (ta[m] is ta[n]) == (tb[m] is tb[n]), (m, n)
            same = ta[m].untyped_storage().data_ptr() == ta[n].untyped_storage().data_ptr()
            assert same == (tb[m].untyped_storage().data_ptr() == tb[n].untyped_storage().data_ptr()) or not (
                ta[m].numel() and ta[n].numel()), (m, n)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(module=modules())
def test_any_module_roundtrips_bit_identical(module: Any, tmp_path: Path) -> None:
    codec = codec_for(module)
    assert codec.name == "torch"
    back, mapping = roundtrip(module, tmp_path / "seg", codec)
    assert_same_module(module, back)
    del back
    mapping.close()


def _in_mapping(tensor: Any, mapping: Any) -> bool:
    low, high = _address_range(mapping)
    return low <= tensor.untyped_storage().data_ptr() < high


def _conv_net() -> Any:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(16 * 6 * 6, 10),
    ).eval()
    with torch.no_grad():  # non-trivial running statistics
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    return net


def test_conv_net_outputs_identical_and_weights_are_views(tmp_path: Path) -> None:
    net = _conv_net()
    back, mapping = roundtrip(net, tmp_path / "seg", codec_for(net))
    x = torch.randn(2, 3, 8, 8)
    with torch.inference_mode():
        assert torch.equal(net(x), back(x))
    for name, tensor in _tensors(back).items():
        if tensor.numel():
            assert _in_mapping(tensor, mapping), f"{name} was copied out of the segment"


def test_tensors_inside_any_object_are_shared(tmp_path: Path) -> None:
    import numpy as np

    holder = {"encoder": _conv_net(), "table": torch.arange(10_000.0), "array": np.ones(4096)}
    back, mapping = roundtrip(holder, tmp_path / "seg", codec_for(holder))
    assert codec_for(holder).name == "generic"
    assert _in_mapping(back["table"], mapping) and _in_mapping(back["encoder"][0].weight, mapping)
    assert torch.equal(back["table"], holder["table"])


def test_torchscript_is_zero_copy(tmp_path: Path) -> None:
    net = _conv_net()
    net[4].weight = net[4].weight  # a plain module attribute kept by script
    scripted = torch.jit.script(net)
    back, mapping = roundtrip(scripted, tmp_path / "seg", codec_for(scripted))
    assert isinstance(back, torch.jit.ScriptModule)
    x = torch.randn(2, 3, 8, 8)
    with torch.inference_mode():
        assert torch.equal(scripted(x), back(x))
    for name, tensor in [*back.named_parameters(), *back.named_buffers()]:
        if tensor.numel():
            assert _in_mapping(tensor, mapping), f"{name} was copied out of the segment"
    assert scripted.state_dict()["0.weight"].abs().sum() > 0, "encoding must leave the original intact"


def test_meta_tensors_roundtrip_as_meta(tmp_path: Path) -> None:
    with torch.device("meta"):
        net = torch.nn.Linear(4, 4)
    back, _ = roundtrip(net, tmp_path / "seg", codec_for(net))
    assert back.weight.is_meta and back.weight.shape == (4, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
def test_cuda_tensors_are_refused() -> None:
    net = torch.nn.Linear(4, 4).cuda()
    with pytest.raises(EncodeError, match=r"holds a tensor on cuda.*on the CPU.*device='cuda:N'"):
        codec_for(net).encode(net)


def test_write_to_shared_weight_stays_private(shm_dir: Path, spawn) -> None:
    shared = SharedModel(functools.partial(torch_mlp, 8, width=256), key="cow")
    model = shared.acquire()
    before = next(model.parameters()).detach().clone()
    results = spawn.Queue()
    writer = spawn.Process(target=_workers.torch_write_worker, args=(shared, results), daemon=True)
    writer.start()
    pid, seen = results.get(timeout=120)
    writer.join(60)
    assert writer.exitcode == 0 and seen == 7.0, "the writer sees its own write (and did not crash)"
    assert torch.equal(next(model.parameters()), before), "no other process sees the write"
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # in this process too: private, no segfault
    fresh = _segment_copy(shared)
    assert torch.equal(next(fresh.parameters()), before), "the segment keeps the published weights"
    shared.release(model)


def _segment_copy(shared: SharedModel) -> Any:
    from modelshare._host.format import try_map
    from modelshare.codecs import get_codec

    mapping = try_map(shared.segment_name.seg_path)
    return get_codec("torch").decode(mapping.skeleton, mapping.buffers)


def test_four_processes_share_a_256_mib_torch_mlp(shm_dir: Path, tmp_path: Path, spawn) -> None:
    loader = functools.partial(torch_mlp, 256)
    x = torch_input()
    private = loader()
    path = tmp_path / "mlp.pt"
    torch.save(private, path)
    with torch.inference_mode():
        expected = torch.load(path, weights_only=False)(x)  # Beam's default: each worker loads the file
    del private
    shared = SharedModel(loader, key="torch-mlp-256")
    run = run_shared(spawn, shm_dir, "torch", _workers.torch_use_worker, shared, x)
    weights = 256 * MiB
    print(run.report(weights))
    for out in run.outputs:
        assert torch.equal(out, expected)
    assert run.total_pss <= run.budget(weights), run.report(weights)
    assert run.in_segments == pytest.approx(weights, rel=0.02), run.report(weights)
