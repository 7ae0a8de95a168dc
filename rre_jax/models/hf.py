"""Hugging Face checkpoint directories: ``config.json`` + safetensors (single file or sharded index).

Tensors are read lazily through ``numpy.memmap`` on the safetensors files: nothing is loaded until a
device shard asks for its slice (``jax.make_array_from_callback``), so a 34B checkpoint is streamed one
tensor -- and on a mesh, one *shard* -- at a time, never held whole on the host.

Model modules describe their layout with a *weight map*: a dict ``param path -> WeightSpec`` that names
the HF tensor and how it is laid out relative to our parameter (transpose, reshape). ``load_params``
checks the map against the checkpoint both ways (missing and unexpected tensors, shapes, dtypes) and
only then materialises anything.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
from typing import Any, Callable, Mapping

import jax
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

SAFE_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class CheckpointError(ValueError):
    """A checkpoint directory does not match what the model expects. The message names file and tensor."""


@dataclasses.dataclass(frozen=True)
class TensorRef:
    file: str
    dtype: Any
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file


def _read_header(path: str) -> dict[str, TensorRef]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in SAFE_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, _ = info["data_offsets"]
        out[name] = TensorRef(path, np.dtype(SAFE_DTYPES[info["dtype"]]), tuple(info["shape"]), 8 + n + start)
    return out


class SafetensorsDir:
    """Name -> lazily mapped tensor, over ``model.safetensors`` or ``model.safetensors.index.json``."""

    def __init__(self, directory: str):
        self.directory = directory
        index = os.path.join(directory, "model.safetensors.index.json")
        single = os.path.join(directory, "model.safetensors")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        elif os.path.exists(single):
            files, weight_map = ["model.safetensors"], None
        else:
            found = sorted(p for p in os.listdir(directory) if p.endswith(".safetensors"))
            if not found:
                raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json "
                                      f"(PyTorch .bin checkpoints are not read; convert with safetensors)")
            files, weight_map = found, None
        self.refs: dict[str, TensorRef] = {}
        for fname in files:
            path = os.path.join(directory, fname)
            if not os.path.exists(path):
                raise CheckpointError(f"{index}: names shard {fname!r}, which is missing")
            for name, ref in _read_header(path).items():
                if weight_map is not None and weight_map.get(name) != fname:
                    continue
                self.refs[name] = ref
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self.refs))
            if missing:
                raise CheckpointError(f"{index}: tensors listed but absent from their shard: {missing[:5]}")

    def __contains__(self, name: str) -> bool:
        return name in self.refs

    def keys(self):
        return self.refs.keys()

    def array(self, name: str) -> np.ndarray:
        """A read-only memmap view of one tensor (no bytes are read until sliced)."""
        ref = self.refs[name]
        return np.memmap(ref.file, dtype=ref.dtype, mode="r", offset=ref.offset, shape=ref.shape)


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """Where our parameter comes from: HF tensor ``name``, then ``transpose`` (axes) and ``shape`` (reshape)."""

    name: str
    transpose: tuple[int, ...] | None = None
    shape: tuple[int, ...] | None = None

    def to_ours(self, x: np.ndarray) -> np.ndarray:
        if self.transpose is not None:
            x = x.transpose(self.transpose)
        if self.shape is not None:
            x = x.reshape(self.shape)
        return x

    def our_shape(self, hf_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of our parameter for an HF tensor of ``hf_shape`` (None if the layouts cannot match)."""
        shape = tuple(hf_shape[i] for i in self.transpose) if self.transpose is not None else tuple(hf_shape)
        if self.shape is not None:
            return tuple(self.shape) if int(np.prod(self.shape)) == int(np.prod(shape)) else None
        return shape

    def to_hf(self, x: np.ndarray, hf_shape: tuple[int, ...]) -> np.ndarray:
        if self.transpose is not None:
            inv = np.argsort(self.transpose)
            pre = tuple(hf_shape[i] for i in self.transpose)
            return np.asarray(x).reshape(pre).transpose(inv)
        return np.asarray(x).reshape(hf_shape)


def flatten(tree) -> dict[tuple[str, ...], Any]:
    out = {}
    def rec(prefix, node):
        if isinstance(node, Mapping):
            for k, v in node.items():
                rec(prefix + (str(k),), v)
        else:
            out[prefix] = node
    rec((), tree)
    return out


def unflatten(flat: Mapping[tuple[str, ...], Any]):
    root: dict = {}
    for path, v in flat.items():
        node = root
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return root


@dataclasses.dataclass(frozen=True)
class StackedWeightSpec:
    """A scanned parameter ``(L, ...)`` stacked from the per-layer HF tensors ``names`` (one per layer),
    each laid out by ``transpose``. Loading reads, for every device shard, only its layers and slice."""

    names: tuple[str, ...]
    transpose: tuple[int, ...] | None = None

    def layer(self, i: int) -> WeightSpec:
        return WeightSpec(self.names[i], self.transpose)


def _sources(spec) -> list[tuple[WeightSpec, int | None]]:
    """(per-tensor spec, layer index or None) for a WeightSpec or StackedWeightSpec."""
    if isinstance(spec, StackedWeightSpec):
        return [(spec.layer(i), i) for i in range(len(spec.names))]
    return [(spec, None)]


def _check(ckpt: SafetensorsDir, path: str, spec, leaf, used: set, problems: list):
    stacked = isinstance(spec, StackedWeightSpec)
    if stacked and len(spec.names) != leaf.shape[0]:
        problems.append(f"{path}: {len(spec.names)} per-layer tensors for {leaf.shape[0]} layers")
        return
    want = tuple(leaf.shape[1:]) if stacked else tuple(leaf.shape)
    for one, _ in _sources(spec):
        if one.name not in ckpt:
            problems.append(f"missing tensor {one.name!r} (for {path})")
            continue
        used.add(one.name)
        ref = ckpt.refs[one.name]
        if one.our_shape(ref.shape) != want:
            problems.append(f"tensor {one.name!r} in {os.path.basename(ref.file)} has shape {ref.shape}, "
                            f"expected {want} after layout change (for {path})")
        elif not (np.issubdtype(ref.dtype, np.floating) or ref.dtype == ml_dtypes.bfloat16):
            problems.append(f"tensor {one.name!r} in {os.path.basename(ref.file)} has dtype {ref.dtype}, "
                            f"expected a floating-point tensor (for {path})")


def _reader(ckpt: SafetensorsDir, spec, dtype):
    """``index -> numpy`` callback that reads only the requested slice (and layers) from the memmaps."""
    if not isinstance(spec, StackedWeightSpec):
        src = spec.to_ours(ckpt.array(spec.name))
        return lambda index: np.asarray(src[index]).astype(dtype)

    def cb(index):
        layers = range(len(spec.names))[index[0]]
        return np.stack([np.asarray(spec.layer(i).to_ours(ckpt.array(spec.names[i]))[index[1:]]).astype(dtype)
                         for i in layers])
    return cb


def load_params(ckpt: SafetensorsDir, weight_map: Mapping[tuple[str, ...], Any], abstract,
                shardings=None, ignore: Callable[[str], bool] = lambda name: False):
    """Params for ``abstract`` (a tree of ShapeDtypeStruct) from ``ckpt`` following ``weight_map``.

    ``weight_map`` values are ``WeightSpec`` (one tensor) or ``StackedWeightSpec`` (per-layer tensors
    stacked on a leading axis). Every leaf of ``abstract`` must be in ``weight_map`` and every tensor
    of the checkpoint must be used (or ``ignore``d, e.g. rotary caches), so no parameter is ever left at
    a random init. Arrays are built shard by shard into ``shardings`` (default: the first local device),
    each shard reading only its slice of the memmap, cast to the leaf's dtype.
    """
    flat_abs = flatten(abstract)
    flat_sh = flatten(shardings) if shardings is not None else {}
    missing_map = sorted(set(flat_abs) - set(weight_map))
    if missing_map:
        raise CheckpointError(f"no checkpoint mapping for parameters {['/'.join(p) for p in missing_map[:5]]}")
    used: set = set()
    problems: list = []
    for path, leaf in flat_abs.items():
        _check(ckpt, "/".join(path), weight_map[path], leaf, used, problems)
    unexpected = sorted(n for n in set(ckpt.keys()) - used if not ignore(n))
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} "
                        f"(the config.json does not describe this checkpoint)")
    if problems:
        raise CheckpointError(f"{ckpt.directory}: " + "; ".join(problems))

    out = {}
    for path, leaf in flat_abs.items():
        sharding = flat_sh.get(path) or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        cb = _reader(ckpt, weight_map[path], leaf.dtype)
        out[path] = jax.make_array_from_callback(tuple(leaf.shape), sharding, cb)
    return unflatten(out)


def export_tensors(params, weight_map: Mapping[tuple[str, ...], Any], dtype=np.float32):
    """HF-named host tensors from our params, one parameter gathered at a time (inverse of load_params)."""
    flat = flatten(params)
    out = {}
    for path, spec in weight_map.items():
        x = np.asarray(jax.device_get(flat[path])).astype(dtype)
        for one, i in _sources(spec):
            xi = x if i is None else x[i]
            hf_shape = tuple(xi.shape[j] for j in np.argsort(one.transpose)) if one.transpose else xi.shape
            out[one.name] = np.ascontiguousarray(one.to_hf(xi, hf_shape))
    return out


def save_safetensors(tensors: Mapping[str, np.ndarray], directory: str, max_shard_bytes: int = 5 << 30,
                     metadata: Mapping[str, str] | None = None):
    """Write ``tensors`` as ``model.safetensors`` or shards + ``model.safetensors.index.json``."""
    os.makedirs(directory, exist_ok=True)
    shards, cur, size = [], {}, 0
    for name, arr in tensors.items():
        nbytes = arr.nbytes
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = arr
        size += nbytes
    shards.append(cur)
    meta = {"format": "pt", **(metadata or {})}
    if len(shards) == 1:
        _save_file(save_file, shards[0], os.path.join(directory, "model.safetensors"), meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _save_file(save_file, shard, os.path.join(directory, fname), meta)
        weight_map.update({k: fname for k in shard})
    total = sum(v.nbytes for v in tensors.values())
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def _save_file(save_file, shard: Mapping[str, np.ndarray], path: str, meta: Mapping[str, str]) -> None:
    """safetensors' ``save_file``; its I/O errors (a full disk, no permission) raised as the ``OSError`` they are,
    naming ``path``."""
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in shard.items()}, path, metadata=dict(meta))
    except Exception as e:
        code = re.search(r"I/O error: (.*?) \(os error (\d+)\)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(2)), code.group(1), path) from e


def read_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise CheckpointError(f"{directory}: no config.json (is this a Hugging Face checkpoint directory?)")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e


def to_numpy(x) -> np.ndarray:
    """Gather a (possibly sharded) array to host numpy; bf16 stays bf16 (ml_dtypes)."""
    return np.asarray(jax.device_get(x))
