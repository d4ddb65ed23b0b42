#!/usr/bin/env python3
"""Writes the PyTorch checkpoint fixtures read by tests/unit/torch_checkpoint.cpp.

Well-formed checkpoints, each next to a safetensors export of the same tensors
(names joined with ".", values made contiguous) that the C++ reader must
reproduce exactly:

    saa_like.bin          torch.save of {"proj_module": ..., "SAA_module": ...}
                          laid out like DynamicID's SAA.bin: module state dicts
                          (with their _metadata), F32/F16/BF16/F64/I64/I32/U8/BOOL
                          tensors, a 0-d tensor, a transposed (non-contiguous)
                          tensor, a strided slice with a storage offset, two
                          views sharing one storage, an empty tensor
    saa_like_legacy.bin   the same object with _use_new_zipfile_serialization=False
    saa_like_deflate.bin  saa_like.bin re-packed with deflate-compressed entries
    saa_like_zip64.bin    saa_like.bin re-packed with ZIP64 sizes, offsets and end records
    saa_like_big.bin      saa_like.bin with every storage byte-swapped and
                          byteorder "big" (what a big-endian machine writes)
    saa_like.safetensors  the expected tensors
    misc_p4.bin           pickle protocol 4 (FRAME, MEMOIZE, STACK_GLOBAL...):
                          an nn.Parameter, a list of tensors, scalars, nesting
    misc_p4.safetensors   its expected tensors

Hostile files; each must raise dynamicid::io_error and run nothing:

    evil_os_system.bin     an object whose __reduce__ is os.system("echo pwned")
    evil_eval.bin          builtins.eval("...")
    evil_plain_object.bin  torch.save of an instance of a plain Python class
    truncated.bin          the first half of saa_like.bin
    entry_past_eof.bin     a storage entry whose sizes run past the end of the file
    unknown_opcode.bin     data.pkl holding an opcode that does not exist
    deep_nesting.bin       100000 lists nested in each other
    huge_memo_index.bin    LONG_BINGET of memo key 0xffffffff
    view_past_storage.bin  a tensor view reaching past its storage
    short_storage.bin      a storage record shorter than its element count
    legacy_truncated.bin   saa_like_legacy.bin cut inside its storages

Usage (developer tool only; tests never run it):

    python3 tools/golden/make_pickle_fixtures.py [--out tests/data/pickle]
"""

import argparse
import collections
import io
import os
import pickle
import zipfile
from pathlib import Path

import warnings

import torch
from safetensors.torch import save_file


warnings.filterwarnings("ignore", message="TypedStorage is deprecated")


def build_saa_like():
    torch.manual_seed(0)
    proj = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.GELU(), torch.nn.Linear(6, 8), torch.nn.LayerNorm(8))
    procs = torch.nn.ModuleList([torch.nn.Linear(3, 5, bias=False), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 2)])
    with torch.no_grad():
        procs[1].running_mean.uniform_(-1, 1)
        procs[1].num_batches_tracked.fill_(7)
    proj_sd = proj.state_dict()
    saa_sd = procs.state_dict()

    base = torch.arange(24, dtype=torch.float32) * 0.25 - 3.0
    grid = torch.randn(4, 6)
    proj_sd["extra.transposed"] = torch.randn(3, 5).t()                      # non-contiguous
    proj_sd["extra.column"] = grid[:, 2]                                      # stride 6, offset 2
    proj_sd["extra.shared_a"] = base[:12].view(3, 4)                          # two views of one storage
    proj_sd["extra.shared_b"] = base[6:18].view(2, 6)
    proj_sd["extra.empty"] = torch.zeros(0, 3)
    saa_sd["0.half"] = torch.randn(2, 3).half()
    saa_sd["0.bf16"] = torch.randn(3, 2).to(torch.bfloat16)
    saa_sd["0.bf16_t"] = torch.randn(2, 2, 3).to(torch.bfloat16).permute(2, 0, 1)
    saa_sd["0.double"] = torch.randn(2, 2, dtype=torch.float64)
    saa_sd["0.int32"] = torch.tensor([[1, -2], [3, 2147483647]], dtype=torch.int32)
    saa_sd["0.uint8"] = torch.tensor([0, 7, 255], dtype=torch.uint8)
    saa_sd["0.bool"] = torch.tensor([True, False, True])
    saa_sd["0.scalar"] = torch.tensor(1.5)
    return {"proj_module": proj_sd, "SAA_module": saa_sd}


def flat(tree, prefix=""):
    out = {}
    if isinstance(tree, torch.Tensor):
        out[prefix] = tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flat(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            out.update(flat(v, f"{prefix}.{i}" if prefix else str(i)))
    return out


def export(tree, path):
    tensors = {k: v.detach().contiguous().clone() for k, v in flat(tree).items()}
    save_file(tensors, str(path), metadata={"torch": torch.__version__})


def write_zip(path, entries, compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression=compression) as z:
        for name, data in entries:
            z.writestr(name, data)


def write_zip64(path, entries):
    """A stored archive in which every size and offset goes through ZIP64 records
    (what torch writes for checkpoints past 4 GiB), built by hand because
    zipfile only uses them when it must."""
    import struct
    import zlib
    body, central = bytearray(), bytearray()
    for name, data in entries:
        name_b = name.encode()
        offset = len(body)
        crc = zlib.crc32(data)
        local_extra = struct.pack("<HHQQ", 1, 16, len(data), len(data))
        body += struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 0, 0, 0, 0, crc, 0xFFFFFFFF, 0xFFFFFFFF,
                            len(name_b), len(local_extra)) + name_b + local_extra + data
        extra = struct.pack("<HHQQQ", 1, 24, len(data), len(data), offset)
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0, 0, 0, 0, crc, 0xFFFFFFFF, 0xFFFFFFFF,
                               len(name_b), len(extra), 0, 0, 0, 0, 0xFFFFFFFF) + name_b + extra
    cd_offset = len(body)
    zip64_end = len(body) + len(central)
    tail = struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, len(entries), len(entries), len(central), cd_offset)
    tail += struct.pack("<IIQI", 0x07064B50, 0, zip64_end, 1)
    tail += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    Path(path).write_bytes(bytes(body + central + tail))


def read_zip(path):
    with zipfile.ZipFile(path) as z:
        return [(i.filename, z.read(i.filename)) for i in z.infolist()]


class Evil:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


class Plain:
    def __init__(self):
        self.weights = [1, 2, 3]


class FakeStorage:
    def __init__(self, numel):
        self.numel = numel


class FakeTensor:
    def __init__(self, storage, size, stride):
        self.storage, self.size, self.stride = storage, size, stride

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, self.size, self.stride, False, collections.OrderedDict()))


class StoragePickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, FakeStorage):
            return ("storage", torch.FloatStorage, "0", "cpu", obj.numel)
        return None


def crafted(obj):
    buf = io.BytesIO()
    StoragePickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "tests" / "data" / "pickle"))
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)

    saa = build_saa_like()
    torch.save(saa, out / "saa_like.bin")
    torch.save(saa, out / "saa_like_legacy.bin", _use_new_zipfile_serialization=False)
    export(saa, out / "saa_like.safetensors")

    entries = read_zip(out / "saa_like.bin")
    write_zip(out / "saa_like_deflate.bin", entries, zipfile.ZIP_DEFLATED)
    write_zip64(out / "saa_like_zip64.bin", entries)
    with zipfile.ZipFile(out / "saa_like_zip64.bin") as z:  # Python's reader agrees
        assert z.testzip() is None and [i.filename for i in z.infolist()] == [n for n, _ in entries]

    # Big-endian: each storage's elements byte-swapped, byteorder "big". The
    # element size of each record comes from the storage types its persistent
    # ids name (read from our own trusted fixture with a recording unpickler).
    with zipfile.ZipFile(out / "saa_like.bin") as z:
        pkl = [n for n in z.namelist() if n.endswith("/data.pkl")][0]
        prefix = pkl[: -len("data.pkl")]
    element = {}

    class Recorder(pickle.Unpickler):
        def persistent_load(self, pid):
            element[pid[2]] = torch.tensor([], dtype=pid[1].dtype).element_size()
            return None

        def find_class(self, module, name):
            if name.startswith("_rebuild"):
                return lambda *args: None
            return super().find_class(module, name)

    Recorder(io.BytesIO(dict(entries)[pkl])).load()
    swapped = []
    for name, data in entries:
        if name == prefix + "byteorder":
            data = b"big"
        elif name.startswith(prefix + "data/"):
            es = element[name[len(prefix + "data/"):]]
            data = b"".join(data[i:i + es][::-1] for i in range(0, len(data), es))
        swapped.append((name, data))
    write_zip(out / "saa_like_big.bin", swapped)

    misc = {
        "param": torch.nn.Parameter(torch.randn(2, 3)),
        "list": [torch.ones(2), (torch.zeros(1, 2, dtype=torch.float16), torch.arange(3))],
        "step": 5, "lr": 0.5, "name": "dynamicid", "flag": True, "nothing": None,
        "nested": {"a": {"b": {"c": torch.full((2, 2), 3.0)}}},
        7: torch.tensor([7.0]),
    }
    torch.save(misc, out / "misc_p4.bin", pickle_protocol=4)
    export(misc, out / "misc_p4.safetensors")

    # ---- hostile --------------------------------------------------------------
    torch.save({"x": Evil(os.system, "echo pwned")}, out / "evil_os_system.bin")
    torch.save({"x": Evil(eval, "__import__('os').system('echo pwned')")}, out / "evil_eval.bin")
    torch.save(Plain(), out / "evil_plain_object.bin")

    good = (out / "saa_like.bin").read_bytes()
    (out / "truncated.bin").write_bytes(good[: len(good) // 2])

    # Central and local sizes of data/0 set far past the end of the file.
    data = bytearray(good)
    name = (prefix + "data/0").encode()
    for sig, csize_at, usize_at, name_len_at, fixed in ((b"PK\x01\x02", 20, 24, 28, 46), (b"PK\x03\x04", 18, 22, 26, 30)):
        pos = 0
        while True:
            pos = data.find(sig, pos)
            assert pos >= 0
            n = int.from_bytes(data[pos + name_len_at:pos + name_len_at + 2], "little")
            if data[pos + fixed:pos + fixed + n] == name:
                break
            pos += 4
        data[pos + csize_at:pos + csize_at + 4] = (0x7FFFFFF0).to_bytes(4, "little")
        data[pos + usize_at:pos + usize_at + 4] = (0x7FFFFFF0).to_bytes(4, "little")
    (out / "entry_past_eof.bin").write_bytes(bytes(data))

    write_zip(out / "unknown_opcode.bin", [("archive/data.pkl", b"\x80\x02}q\x00\xff."), ("archive/version", b"3\n")])
    write_zip(out / "deep_nesting.bin",
              [("archive/data.pkl", b"\x80\x02" + b"]" * 100000 + b"a" * 99999 + b"."), ("archive/version", b"3\n")],
              zipfile.ZIP_DEFLATED)
    write_zip(out / "huge_memo_index.bin",
              [("archive/data.pkl", b"\x80\x02}r\x00\x00\x00\x80j\xff\xff\xff\xff."), ("archive/version", b"3\n")])
    write_zip(out / "view_past_storage.bin",
              [("archive/data.pkl", crafted({"w": FakeTensor(FakeStorage(4), (3, 2), (2, 1))})),
               ("archive/data/0", b"\0" * 16), ("archive/version", b"3\n")])
    write_zip(out / "short_storage.bin",
              [("archive/data.pkl", crafted({"w": FakeTensor(FakeStorage(6), (3, 2), (2, 1))})),
               ("archive/data/0", b"\0" * 16), ("archive/version", b"3\n")])

    legacy = (out / "saa_like_legacy.bin").read_bytes()
    (out / "legacy_truncated.bin").write_bytes(legacy[:-10])

    for p in sorted(out.iterdir()):
        print(f"{p.name:28s} {p.stat().st_size:8d} bytes")


if __name__ == "__main__":
    main()
