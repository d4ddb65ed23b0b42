#!/usr/bin/env python3
"""Writes torch golden cases for dynamicid's primitive ops.

Each case is one safetensors file in the project's golden format:

    param.<name>         weights (float64)
    input.<name>         inputs (float64); input.grad_output is the upstream
                         gradient g of the scalar loss = sum(output * g)
    output.y             the forward result
    output.grad_<name>   d loss / d <name> for every input and param, by autograd

__metadata__["config"] is a JSON object whose "module" names the torch call and
whose other fields are its arguments; "atol"/"rtol" are the tolerances the case
asks for (everything is float64, so they are tight). __metadata__["torch"]
records the torch version that computed the numbers.

Usage (developer tool only; tests never run it):

    pip install torch numpy
    python3 tools/golden/make_primitive_goldens.py [--out tests/data/golden/torch]
                                                   [--misc tests/data/golden/misc]
"""

import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
import struct

TOLERANCE = {"atol": 1e-10, "rtol": 1e-10}


def rand(generator, *shape, low=-1.0, high=1.0):
    return torch.rand(*shape, generator=generator, dtype=torch.float64) * (high - low) + low


class case_builder:
    """Collects named leaves, runs fn, and records outputs and gradients."""

    def __init__(self, seed):
        self.generator = torch.Generator().manual_seed(seed)
        self.inputs = {}
        self.params = {}

    def input(self, name, *shape, low=-1.0, high=1.0):
        t = rand(self.generator, *shape, low=low, high=high).requires_grad_(True)
        self.inputs[name] = t
        return t

    def param(self, name, *shape, low=-1.0, high=1.0):
        t = rand(self.generator, *shape, low=low, high=high).requires_grad_(True)
        self.params[name] = t
        return t

    def finish(self, y, config):
        grad_output = rand(self.generator, *y.shape)
        loss = (y * grad_output).sum()
        leaves = list(self.inputs.items()) + list(self.params.items())
        grads = torch.autograd.grad(loss, [t for _, t in leaves], allow_unused=True)
        tensors = {}
        for name, t in self.params.items():
            tensors[f"param.{name}"] = t.detach().contiguous()
        for name, t in self.inputs.items():
            tensors[f"input.{name}"] = t.detach().contiguous()
        tensors["input.grad_output"] = grad_output.contiguous()
        tensors["output.y"] = y.detach().contiguous()
        for (name, t), g in zip(leaves, grads):
            tensors[f"output.grad_{name}"] = (g if g is not None else torch.zeros_like(t)).detach().contiguous()
        cfg = dict(config)
        cfg.update(TOLERANCE)
        return tensors, cfg


def case_linear():
    b = case_builder(1)
    x = b.input("x", 3, 5, 7)
    w = b.param("weight", 6, 7)
    bias = b.param("bias", 6)
    return b.finish(F.linear(x, w, bias), {"module": "torch.nn.functional.linear"})


def matmul_case(seed, a_shape, b_shape, transpose_a, transpose_b):
    def make():
        b = case_builder(seed)
        a = b.input("a", *a_shape)
        m = b.input("b", *b_shape)
        lhs = a.transpose(-1, -2) if transpose_a else a
        rhs = m.transpose(-1, -2) if transpose_b else m
        return b.finish(torch.matmul(lhs, rhs),
                        {"module": "torch.matmul", "transpose_a": transpose_a, "transpose_b": transpose_b})
    return make


def conv_case(seed, x_shape, w_shape, stride, padding, dilation, groups):
    def make():
        b = case_builder(seed)
        x = b.input("x", *x_shape)
        w = b.param("weight", *w_shape)
        bias = b.param("bias", w_shape[0])
        y = F.conv2d(x, w, bias, stride=stride, padding=padding, dilation=dilation, groups=groups)
        return b.finish(y, {"module": "torch.nn.functional.conv2d", "stride": stride, "padding": padding,
                            "dilation": dilation, "groups": groups})
    return make


def case_group_norm():
    b = case_builder(20)
    x = b.input("x", 2, 6, 4, 3, low=-2.0, high=3.0)
    w = b.param("weight", 6)
    bias = b.param("bias", 6)
    return b.finish(F.group_norm(x, 3, w, bias, eps=1e-5),
                    {"module": "torch.nn.functional.group_norm", "num_groups": 3, "eps": 1e-5})


def case_layer_norm():
    b = case_builder(21)
    x = b.input("x", 3, 4, 10, low=-2.0, high=3.0)
    w = b.param("weight", 10)
    bias = b.param("bias", 10)
    return b.finish(F.layer_norm(x, [10], w, bias, eps=1e-5),
                    {"module": "torch.nn.functional.layer_norm", "normalized_shape": [10], "eps": 1e-5})


def softmax_case(seed, dim):
    def make():
        b = case_builder(seed)
        x = b.input("x", 2, 5, 7, low=-4.0, high=4.0)
        return b.finish(torch.softmax(x, dim=dim), {"module": "torch.softmax", "dim": dim})
    return make


def unary_case(seed, module, fn, extra=None):
    def make():
        b = case_builder(seed)
        x = b.input("x", 4, 5, 6, low=-4.0, high=4.0)
        cfg = {"module": module}
        cfg.update(extra or {})
        return b.finish(fn(x), cfg)
    return make


def case_geglu():
    b = case_builder(40)
    x = b.input("x", 3, 4, 12, low=-3.0, high=3.0)
    hidden, gate = x.chunk(2, dim=-1)
    return b.finish(hidden * F.gelu(gate),
                    {"module": "geglu", "note": "hidden, gate = x.chunk(2, -1); hidden * gelu(gate) (diffusers GEGLU without its projection)"})


def binary_case(seed, module, fn, a_shape, b_shape, b_low=-1.0, b_high=1.0):
    def make():
        b = case_builder(seed)
        a = b.input("a", *a_shape)
        m = b.input("b", *b_shape, low=b_low, high=b_high)
        return b.finish(fn(a, m), {"module": module})
    return make


def reduce_case(seed, module, fn, dims):
    def make():
        b = case_builder(seed)
        x = b.input("x", 2, 3, 4, 5)
        return b.finish(fn(x, dim=dims, keepdim=False), {"module": module, "dim": dims, "keepdim": False})
    return make


def case_permute():
    b = case_builder(60)
    x = b.input("x", 2, 3, 4, 5)
    dims = [2, 0, 3, 1]
    return b.finish(x.permute(*dims), {"module": "torch.permute", "dims": dims})


def case_cat():
    b = case_builder(61)
    x0 = b.input("x0", 2, 3, 4)
    x1 = b.input("x1", 2, 5, 4)
    x2 = b.input("x2", 2, 1, 4)
    return b.finish(torch.cat([x0, x1, x2], dim=1), {"module": "torch.cat", "dim": 1, "inputs": ["x0", "x1", "x2"]})


def case_interpolate():
    b = case_builder(62)
    x = b.input("x", 2, 3, 4, 5)
    return b.finish(F.interpolate(x, scale_factor=2, mode="nearest"),
                    {"module": "torch.nn.functional.interpolate", "scale_factor": 2, "mode": "nearest"})


def sdpa_case(seed, q_shape, k_shape, v_shape, scale):
    def make():
        b = case_builder(seed)
        q = b.input("q", *q_shape, low=-2.0, high=2.0)
        k = b.input("k", *k_shape, low=-2.0, high=2.0)
        v = b.input("v", *v_shape)
        y = F.scaled_dot_product_attention(q, k, v, scale=scale)
        return b.finish(y, {"module": "torch.nn.functional.scaled_dot_product_attention", "scale": scale})
    return make


CASES = {
    "linear": case_linear,
    "matmul_batched": matmul_case(2, (2, 3, 4, 5), (2, 3, 5, 6), False, False),
    "matmul_transpose_a": matmul_case(3, (3, 5, 4), (3, 5, 6), True, False),
    "matmul_transpose_b": matmul_case(4, (3, 4, 5), (3, 6, 5), False, True),
    "matmul_transpose_ab": matmul_case(5, (2, 3, 5, 4), (2, 3, 6, 5), True, True),
    "matmul_shared_b": matmul_case(6, (3, 4, 5), (5, 6), False, False),
    "conv2d_stride2_pad1_groups2": conv_case(10, (2, 4, 7, 6), (6, 2, 3, 3), 2, 1, 1, 2),
    "conv2d_dilation2": conv_case(11, (1, 3, 8, 9), (4, 3, 3, 3), 1, 2, 2, 1),
    "group_norm": case_group_norm,
    "layer_norm": case_layer_norm,
    "softmax_last": softmax_case(30, -1),
    "softmax_dim1": softmax_case(31, 1),
    "silu": unary_case(32, "torch.nn.functional.silu", F.silu),
    "gelu_erf": unary_case(33, "torch.nn.functional.gelu", lambda x: F.gelu(x), {"approximate": "none"}),
    "gelu_tanh": unary_case(34, "torch.nn.functional.gelu", lambda x: F.gelu(x, approximate="tanh"), {"approximate": "tanh"}),
    "quick_gelu": unary_case(35, "quick_gelu", lambda x: x * torch.sigmoid(1.702 * x),
                             {"note": "x * sigmoid(1.702 x), as CLIP uses"}),
    "relu": unary_case(36, "torch.nn.functional.relu", F.relu),
    "sigmoid": unary_case(37, "torch.sigmoid", torch.sigmoid),
    "tanh": unary_case(38, "torch.tanh", torch.tanh),
    "geglu": case_geglu,
    "add_broadcast": binary_case(50, "torch.add", torch.add, (2, 3, 4), (3, 1)),
    "mul_broadcast": binary_case(51, "torch.mul", torch.mul, (2, 1, 4), (3, 1)),
    "div_broadcast": binary_case(52, "torch.div", torch.div, (2, 3, 4), (1, 4), b_low=0.5, b_high=2.0),
    "sum_axes": reduce_case(53, "torch.sum", torch.sum, [1, 3]),
    "mean_axes": reduce_case(54, "torch.mean", torch.mean, [0, 2]),
    "permute": case_permute,
    "cat": case_cat,
    "interpolate_nearest2": case_interpolate,
    "sdpa": sdpa_case(70, (2, 5, 8), (2, 7, 8), (2, 7, 6), None),
    "sdpa_heads_scaled": sdpa_case(71, (2, 2, 3, 4), (2, 2, 6, 4), (2, 2, 6, 5), 0.3),
}


DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


def save_safetensors(path, tensors, metadata):
    """Writes a standard safetensors file with a sorted, reproducible header
    (tensors in name order, header padded with spaces to 8 bytes)."""
    header = {"__metadata__": dict(sorted(metadata.items()))}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        data = t.numpy().astype(t.numpy().dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for data in blobs:
            f.write(data)


def write(path, tensors, config):
    metadata = {"config": json.dumps(config, sort_keys=True), "torch": torch.__version__,
                "source": "tools/golden/make_primitive_goldens.py"}
    save_safetensors(path, tensors, metadata)


def main():
    root = Path(__file__).resolve().parents[2]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(root / "tests/data/golden/torch"))
    parser.add_argument("--misc", default=str(root / "tests/data/golden/misc"))
    args = parser.parse_args()

    torch.set_default_dtype(torch.float64)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    total = 0
    for name, make in CASES.items():
        tensors, config = make()
        path = out / f"{name}.safetensors"
        write(path, tensors, config)
        total += os.path.getsize(path)
        print(f"{path.name}  {config['module']}")
    print(f"{len(CASES)} cases, {total} bytes")

    # A fixture naming a module no runner knows (the runner must report it, exit 2).
    misc = Path(args.misc)
    misc.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(99)
    x = torch.rand(2, 3, generator=g, dtype=torch.float64)
    write(misc / "unsupported_module.safetensors", {"input.x": x, "output.y": x.clone()},
          {"module": "nonexistent.module.for_tests"})
    print(misc / "unsupported_module.safetensors")


if __name__ == "__main__":
    main()
