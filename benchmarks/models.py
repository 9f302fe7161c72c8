"""Models the benchmarks (and tests) generate themselves, sized by argument: nothing downloaded."""

from __future__ import annotations

from typing import Any

import numpy as np

MiB = 1 << 20


class NumpyMLP:
    """A plain-Python model made of numpy arrays: float32 ReLU layers, normalised per layer."""

    def __init__(self, layers: list[tuple[np.ndarray, np.ndarray]]) -> None:
        self.layers = layers

    def __call__(self, x: np.ndarray) -> np.ndarray:
        for weight, bias in self.layers:
            x = np.maximum(x @ weight + bias, 0.0)
            x /= max(float(np.abs(x).max()), 1.0)
        return x

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes + b.nbytes for w, b in self.layers)


def numpy_mlp(total_mib: int, width: int = 4096, seed: int = 0) -> NumpyMLP:
    """An MLP of ``width`` x ``width`` float32 layers, about ``total_mib`` MiB of weights in all."""
    rng = np.random.default_rng(seed)
    n_layers = max(1, total_mib * MiB // (4 * width * width))
    return NumpyMLP([(rng.random((width, width), dtype=np.float32) - 0.5, rng.random(width, dtype=np.float32))
                     for _ in range(n_layers)])


def sample_input(width: int = 4096, batch: int = 4) -> np.ndarray:
    """A fixed batch of inputs, the same in every process."""
    return np.random.default_rng(123).random((batch, width), dtype=np.float32)


def torch_mlp(total_mib: int, width: int = 2048, seed: int = 0) -> Any:
    """A ``torch.nn.Sequential`` MLP of ``width``-wide float32 Linear+ReLU layers, ~``total_mib`` MiB."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    n_layers = max(1, total_mib * MiB // (4 * width * width))
    layers: list[Any] = []
    for _ in range(n_layers):
        linear = torch.nn.Linear(width, width)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(width, width, generator=generator) / width**0.5)
            linear.bias.copy_(torch.randn(width, generator=generator) * 0.1)
        layers += [linear, torch.nn.ReLU()]
    return torch.nn.Sequential(*layers).eval().requires_grad_(False)  # an inference model: outputs pickle


def torch_input(width: int = 2048, batch: int = 4) -> Any:
    """A fixed batch of inputs for ``torch_mlp``."""
    import torch

    return torch.randn(batch, width, generator=torch.Generator().manual_seed(123))


def onnx_mlp(total_mib: int, width: int = 2048, seed: int = 0) -> Any:
    """An ``onnx.ModelProto`` MLP (MatMul + Add + Relu per layer, float32), ~``total_mib`` MiB of initializers."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    n_layers = max(1, total_mib * MiB // (4 * width * width))
    initializers, nodes, previous = [], [], "x"
    for i in range(n_layers):
        weight = ((rng.random((width, width), dtype=np.float32) - 0.5) / np.float32(width**0.5)).astype(np.float32)
        bias = rng.random(width, dtype=np.float32) * np.float32(0.1)
        initializers += [numpy_helper.from_array(weight, f"w{i}"), numpy_helper.from_array(bias, f"b{i}")]
        nodes += [helper.make_node("MatMul", [previous, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
                  helper.make_node("Relu", [f"a{i}"], [f"r{i}"])]
        previous = f"r{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info(previous, TensorProto.FLOAT, ["N", width])],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def onnx_input(width: int = 2048, batch: int = 4) -> np.ndarray:
    """A fixed batch of inputs for ``onnx_mlp``."""
    return np.random.default_rng(123).random((batch, width), dtype=np.float32)


def sklearn_knn(total_mib: int, features: int = 256, seed: int = 0) -> Any:
    """A ``KNeighborsClassifier`` fitted on ~``total_mib`` MiB of float64 points (its weights are the data)."""
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(seed)
    points = rng.standard_normal((max(8, total_mib * MiB // (8 * features)), features))
    return KNeighborsClassifier(n_neighbors=5, algorithm="brute").fit(points, (points[:, 0] > 0).astype(int))


def sklearn_input(features: int = 256, batch: int = 16) -> np.ndarray:
    """A fixed batch of queries for ``sklearn_knn``."""
    return np.random.default_rng(123).standard_normal((batch, features))
