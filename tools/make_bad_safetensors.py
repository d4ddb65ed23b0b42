#!/usr/bin/env python3
"""Regenerates tests/data/bad_safetensors/: one small hostile file per case.

Every file in that directory must make dynamicid::io::safetensors_file raise
io_error; tests/unit/io_safetensors.cpp replays them all and the fuzz smoke
test uses them as seeds. Keep only sample files in the directory.

    python3 tools/make_bad_safetensors.py [output_dir]
"""
import json
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "..", "tests", "data", "bad_safetensors")


def framed(header, data=b"", length=None):
    """8-byte little-endian length, header bytes, data; length may lie."""
    if isinstance(header, str):
        header = header.encode("utf-8")
    n = len(header) if length is None else length
    return struct.pack("<Q", n) + header + data


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def obj(d, data=b"\0" * 8):
    return framed(json.dumps(d, separators=(",", ":")), data)


CASES = {
    # framing
    "empty_file": b"",
    "shorter_than_length_field": b"\x10\x00\x00",
    "header_length_past_end": framed("{}", length=100),
    "header_length_u64_max": framed("{}", length=2**64 - 1),
    "header_length_over_cap": framed("{}", length=100 * 1024 * 1024 + 1),
    "header_length_zero": framed("", length=0) + b"{}",
    # JSON syntax
    "invalid_json_truncated": framed('{"a": {"dtype": "F32"'),
    "invalid_json_trailing_garbage": framed("{} x"),
    "invalid_json_nul_padding": framed("{}\0\0\0\0\0\0"),
    "invalid_utf8_name": framed(b'{"\xff\xfe":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'),
    "deeply_nested_arrays": framed("[" * 5000 + "]" * 5000),
    "deeply_nested_objects": framed('{"a":' * 5000 + "1" + "}" * 5000),
    "nested_object_in_shape": obj({"a": {"dtype": "F32", "shape": [{"x": 1}], "data_offsets": [0, 4]}}),
    # JSON shape
    "json_array_not_object": framed("[1,2,3]"),
    "json_string_not_object": framed('"safetensors"'),
    "json_number_not_object": framed("42"),
    "json_null_not_object": framed("null"),
    # entries
    "entry_is_number": obj({"a": 5}),
    "entry_is_array": obj({"a": [1, 2]}),
    "entry_missing_dtype": obj({"a": {"shape": [2], "data_offsets": [0, 8]}}),
    "entry_missing_shape": obj({"a": {"dtype": "F32", "data_offsets": [0, 8]}}),
    "entry_missing_data_offsets": obj({"a": {"dtype": "F32", "shape": [2]}}),
    "dtype_not_string": obj({"a": {"dtype": 4, "shape": [2], "data_offsets": [0, 8]}}),
    "dtype_unknown": obj({"a": entry(dtype="C64")}),
    "dtype_lowercase": obj({"a": entry(dtype="f32")}),
    "shape_not_array": obj({"a": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}}),
    "shape_negative_dim": obj({"a": entry(shape=(-2,))}),
    "shape_float_dim": obj({"a": entry(shape=(2.0,))}),
    "shape_string_dim": obj({"a": entry(shape=("2",))}),
    "shape_dim_above_int64": obj({"a": entry(shape=(2**63,))}),
    "shape_dim_above_uint64": framed('{"a":{"dtype":"F32","shape":[99999999999999999999999],"data_offsets":[0,8]}}', b"\0" * 8),
    "shape_product_overflow": obj({"a": entry(shape=(2**32, 2**32, 2**32), offsets=(0, 0))}),
    "shape_bytes_overflow": obj({"a": entry(dtype="F64", shape=(2**62,), offsets=(0, 0))}),
    "shape_rank_too_large": obj({"a": entry(shape=(1,) * 9 + (2,))}),
    "offsets_not_array": obj({"a": {"dtype": "F32", "shape": [2], "data_offsets": 8}}),
    "offsets_one_int": obj({"a": entry(offsets=(8,))}),
    "offsets_three_ints": obj({"a": entry(offsets=(0, 8, 16))}),
    "offsets_negative": obj({"a": entry(offsets=(-8, 0))}),
    "offsets_float": obj({"a": entry(offsets=(0, 8.0))}),
    "offsets_string": obj({"a": entry(offsets=("0", "8"))}),
    "offsets_begin_after_end": obj({"a": entry(offsets=(8, 0))}),
    "offsets_end_past_data": obj({"a": entry(offsets=(0, 8))}, data=b"\0" * 4),
    "offsets_end_u64_max": obj({"a": entry(offsets=(2**64 - 8, 2**64 - 1))}),
    "offsets_overlap": obj({"a": entry(offsets=(0, 8)), "b": entry(offsets=(4, 12))}, data=b"\0" * 12),
    "offsets_same_range": obj({"a": entry(offsets=(0, 8)), "b": entry(offsets=(0, 8))}),
    "byte_count_mismatch": obj({"a": entry(shape=(3,), offsets=(0, 8))}),
    "byte_count_mismatch_empty_shape": obj({"a": entry(shape=(0,), offsets=(0, 8))}),
    "duplicate_tensor_name": framed(
        '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
        b"\0" * 8),
    "duplicate_field_in_entry": framed('{"a":{"dtype":"F32","dtype":"I64","shape":[2],"data_offsets":[0,8]}}', b"\0" * 8),
    "duplicate_metadata_key": framed('{"__metadata__":{"k":"v","k":"w"}}'),
    # metadata
    "metadata_not_object": obj({"__metadata__": "format=pt"}),
    "metadata_value_number": obj({"__metadata__": {"epoch": 3}}),
    "metadata_value_null": obj({"__metadata__": {"k": None}}),
    "metadata_value_object": obj({"__metadata__": {"k": {"x": "y"}}}),
}


def main():
    out = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_OUT)
    os.makedirs(out, exist_ok=True)
    for name, blob in sorted(CASES.items()):
        with open(os.path.join(out, name + ".safetensors"), "wb") as f:
            f.write(blob)
    print(f"wrote {len(CASES)} files to {out}")


if __name__ == "__main__":
    main()
