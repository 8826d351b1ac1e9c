#!/usr/bin/env python3
"""Write PyTorch `.bin` fixtures (torch.save zip archives) from the micro safetensors checkpoints.

    python3 tests/data/bin/make_bin_fixture.py            # writes tests/data/bin/{keyfan,hpcai}/
    python3 tests/data/bin/make_bin_fixture.py --verify   # also torch.load them back (needs torch)
    python3 tests/data/bin/make_bin_fixture.py --resave   # also tests/data/bin/torch-saved/ (needs torch)

No torch is needed to write them: the archive is written here the way torch.save lays it out.
Checked against torch 2.15: torch.load(weights_only=True) returns the safetensors values, and
torch.save of the loaded state dicts writes a byte-identical data.pkl and the same records.
`--resave` stores the keyfan shards once more through torch.save itself (views, shared storages
and the index kept), so the reader is also tested on archives written by torch.

* A zip of stored (uncompressed) records under one folder: `<archive>/data.pkl`,
  `.format_version` ("1"), `.storage_alignment` ("64"), `byteorder` ("little"),
  `data/<key>` (the raw storages), `version` ("3\n"), `.data/serialization_id`. torch names the folder after
  the file (`pytorch_model-00001-of-00002`) when saving to a path, `archive` when saving to a
  file object; both occur here. Storage records start on 64-byte boundaries, padded with an
  extra field in the local header as torch's writer does.
* `data.pkl` is a protocol-2 pickle of the state dict. Each tensor reduces to
  `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())`, and
  each storage is a persistent id `('storage', torch.BFloat16Storage, '<key>', 'cpu', numel)`,
  keys numbered in order of first use. The pickle module itself writes these opcodes, through
  stand-ins for the torch globals (plain objects registered under torch's module names).

The two fixtures exercise what the Rust reader must handle, with values that stay bit-exact:

* keyfan/ (from tests/data/micro/hf): two shards + pytorch_model.bin.index.json, all bf16;
  the 8 experts of a projection are views into one stacked storage (storage offsets); the
  attention weights are transposed views of an [in, out] storage (strides (1, out), not
  contiguous); lm_head shares the embedding's storage.
* hpcai/ (from tests/data/micro/hf-hpcai): one pytorch_model.bin holding an OrderedDict with
  `_metadata` (as model.state_dict() pickles); norms as HalfStorage, routers as FloatStorage,
  the rest bf16, each tensor in its own contiguous storage.
"""

import argparse
import collections
import io
import json
import os
import pickle
import struct
import sys
import types
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------------------------
# Stand-ins for the globals torch.save refers to. pickle writes a function or class as
# GLOBAL '<__module__> <__qualname__>' after checking that the name resolves to the same object,
# so registering these modules makes the stock pickler emit exactly torch's references.


def _stand_in_modules():
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise RuntimeError("stand-in: never called")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch._utils = utils
    storages = {}
    for name, dtype in (("BFloat16Storage", "BF16"), ("HalfStorage", "F16"), ("FloatStorage", "F32")):
        cls = type(name, (), {"__module__": "torch"})
        setattr(torch, name, cls)
        storages[dtype] = cls
    return {"torch": torch, "torch._utils": utils}, _rebuild_tensor_v2, storages


MODULES, REBUILD, STORAGE_TYPES = _stand_in_modules()
ELEM = {"BF16": 2, "F16": 2, "F32": 4}


class Storage:
    def __init__(self, dtype, data):
        assert len(data) % ELEM[dtype] == 0
        self.dtype, self.data, self.key = dtype, data, None

    @property
    def numel(self):
        return len(self.data) // ELEM[self.dtype]


class Tensor:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def __reduce_ex__(self, protocol):
        args = (self.storage, self.offset, tuple(self.size), tuple(self.stride), False,
                collections.OrderedDict())
        return (REBUILD, args)


class TorchPickler(pickle.Pickler):
    def __init__(self, f):
        super().__init__(f, protocol=2)
        self.storages = []

    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            if obj.key is None:
                obj.key = str(len(self.storages))
                self.storages.append(obj)
            return ("storage", STORAGE_TYPES[obj.dtype], obj.key, "cpu", obj.numel)
        return None


def torch_save(state, path, archive):
    saved = {k: sys.modules.get(k) for k in MODULES}
    sys.modules.update(MODULES)
    try:
        buf = io.BytesIO()
        p = TorchPickler(buf)
        p.dump(state)
    finally:
        for k, m in saved.items():
            if m is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = m
    records = [("data.pkl", buf.getvalue()), (".format_version", b"1"),
               (".storage_alignment", b"64"), ("byteorder", b"little")]
    records += [("data/" + s.key, s.data) for s in p.storages]
    records += [("version", b"3\n"), (".data/serialization_id", b"0" * 40)]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for name, data in records:
            full = f"{archive}/{name}"
            zi = zipfile.ZipInfo(full, date_time=(1980, 1, 1, 0, 0, 0))
            # Pad the local header so the record's data starts on a 64-byte boundary.
            header_end = z.fp.tell() + 30 + len(full.encode())
            pad = (-(header_end + 4)) % 64
            zi.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
            z.writestr(zi, data)
            assert (header_end + 4 + pad) % 64 == 0


# ---------------------------------------------------------------------------------------------
# Safetensors in, without numpy.


def read_safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    base = 8 + n
    out = {}
    for name, info in header.items():
        s, e = info["data_offsets"]
        out[name] = (info["dtype"], list(info["shape"]), raw[base + s:base + e])
    return out


def read_checkpoint(d):
    index = os.path.join(d, "model.safetensors.index.json")
    if os.path.exists(index):
        files = sorted(set(json.load(open(index))["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out = {}
    for f in files:
        out.update(read_safetensors(os.path.join(d, f)))
    return out


def values(dtype, data):
    if dtype == "BF16":
        return [struct.unpack("<f", struct.pack("<I", h << 16))[0]
                for h in struct.unpack(f"<{len(data) // 2}H", data)]
    if dtype == "F32":
        return list(struct.unpack(f"<{len(data) // 4}f", data))
    if dtype == "F16":
        return list(struct.unpack(f"<{len(data) // 2}e", data))
    raise ValueError(dtype)


def encode(dtype, vals):
    """Encode f32-representable values, refusing any that the target cannot hold exactly."""
    if dtype == "BF16":
        out = []
        for v in vals:
            (bits,) = struct.unpack("<I", struct.pack("<f", v))
            assert bits & 0xFFFF == 0, v
            out.append(bits >> 16)
        return struct.pack(f"<{len(out)}H", *out)
    fmt = {"F16": "e", "F32": "f"}[dtype]
    data = struct.pack(f"<{len(vals)}{fmt}", *vals)
    assert values(dtype, data) == vals, f"not exact in {dtype}"
    return data


def transpose(data, rows, cols, elem):
    """Row-major [rows, cols] -> row-major [cols, rows]."""
    items = [data[i:i + elem] for i in range(0, len(data), elem)]
    return b"".join(items[r * cols + c] for c in range(cols) for r in range(rows))


def contiguous(dtype, shape, data):
    stride = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        stride[i] = stride[i + 1] * shape[i + 1]
    return Tensor(Storage(dtype, data), 0, shape, stride)


# ---------------------------------------------------------------------------------------------


def make_keyfan(src, out):
    w = read_checkpoint(src)
    assert all(dt == "BF16" for dt, _, _ in w.values())
    shards = ({}, {})
    emb_dt, emb_shape, emb = w["transformer.in_out_embed.weight"]
    emb_t = contiguous("BF16", emb_shape, emb)
    shards[0]["transformer.in_out_embed.weight"] = emb_t
    if "lm_head.weight" in w:
        assert w["lm_head.weight"][2] == emb, "lm_head is a tied copy"
        shards[0]["lm_head.weight"] = Tensor(emb_t.storage, 0, emb_shape, emb_t.stride)
    layers = sorted({int(n.split(".")[2]) for n in w if n.startswith("transformer.decoder_layer.")})
    for li, layer in enumerate(layers):
        shard = shards[min(li, 1)]
        pre = f"transformer.decoder_layer.{layer}."
        experts = sorted({int(n[len(pre):].split(".")[1]) for n in w if n.startswith(pre + "moe.")})
        for proj in ("linear", "linear_v", "linear_1"):
            names = [f"{pre}moe.{e}.{proj}.weight" for e in experts]
            shape = w[names[0]][1]
            stacked = Storage("BF16", b"".join(w[n][2] for n in names))
            numel = shape[0] * shape[1]
            for e, n in enumerate(names):
                shard[n] = Tensor(stacked, e * numel, shape, [shape[1], 1])
        for name in sorted(n for n in w if n.startswith(pre) and ".moe." not in n):
            dt, shape, data = w[name]
            if ".multi_head_attention." in name:
                rows, cols = shape
                shard[name] = Tensor(Storage(dt, transpose(data, rows, cols, 2)), 0, shape, [1, rows])
            else:
                shard[name] = contiguous(dt, shape, data)
    dt, shape, data = w["transformer.rms_norm.weight"]
    shards[1]["transformer.rms_norm.weight"] = contiguous(dt, shape, data)
    assert sum(len(s) for s in shards) == len(w)
    os.makedirs(out, exist_ok=True)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
        torch_save(shard, os.path.join(out, fname), fname[:-len(".bin")])
        for n, t in shard.items():
            weight_map[n] = fname
            total += len(w[n][2])
    with open(os.path.join(out, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    copy_config(src, out)


def make_hpcai(src, out):
    w = read_checkpoint(src)
    # What nn.Module.state_dict() returns: an OrderedDict with a `_metadata` attribute.
    state = collections.OrderedDict()
    for name in sorted(w):
        dt, shape, data = w[name]
        if name.endswith(".scale"):
            target = "F16"
        elif name.endswith("moe_block.gate.weight"):
            target = "F32"
        else:
            target = dt
        if target != dt:
            data = encode(target, values(dt, data))
        state[name] = contiguous(target, shape, data)
    state._metadata = collections.OrderedDict([("", {"version": 1}), ("model", {"version": 1})])
    os.makedirs(out, exist_ok=True)
    torch_save(state, os.path.join(out, "pytorch_model.bin"), "archive")
    copy_config(src, out)


def copy_config(src, out, name="config.json"):
    with open(os.path.join(src, name)) as f:
        cfg = f.read()
    with open(os.path.join(out, name), "w") as f:
        f.write(cfg)


def verify(src, out):
    """torch.load the archives and compare every tensor with the safetensors values."""
    import torch

    w = read_checkpoint(src)
    got = {}
    for f in sorted(os.listdir(out)):
        if f.endswith(".bin"):
            got.update(torch.load(os.path.join(out, f), map_location="cpu", weights_only=True))
    assert set(got) == set(w), set(got) ^ set(w)
    for name, (dt, shape, data) in w.items():
        t = got[name]
        assert list(t.shape) == shape, name
        assert t.float().flatten().tolist() == values(dt, data), name
    print(f"verified with torch {torch.__version__}: {len(got)} tensors in {out}")


def resave(src, out):
    """torch.load the keyfan shards and torch.save them again, views and sharing intact."""
    import torch

    os.makedirs(out, exist_ok=True)
    for f in sorted(os.listdir(src)):
        if f.endswith(".bin"):
            torch.save(torch.load(os.path.join(src, f), weights_only=True), os.path.join(out, f))
        elif f.endswith(".json"):
            copy_config(src, out, f)
    print(f"wrote {out} with torch {torch.__version__}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--micro", default=os.path.join(ROOT, "tests/data/micro"))
    ap.add_argument("--out", default=os.path.join(ROOT, "tests/data/bin"))
    ap.add_argument("--verify", action="store_true", help="torch.load the results (needs torch)")
    ap.add_argument("--resave", action="store_true",
                    help="also write <out>/torch-saved with torch.save itself (needs torch)")
    args = ap.parse_args()
    jobs = [(make_keyfan, "hf", "keyfan"), (make_hpcai, "hf-hpcai", "hpcai")]
    for make, src, dst in jobs:
        make(os.path.join(args.micro, src), os.path.join(args.out, dst))
        print(f"wrote {os.path.join(args.out, dst)}")
    if args.resave:
        resave(os.path.join(args.out, "keyfan"), os.path.join(args.out, "torch-saved"))
        jobs.append((None, "hf", "torch-saved"))
    if args.verify:
        for _, src, dst in jobs:
            verify(os.path.join(args.micro, src), os.path.join(args.out, dst))


if __name__ == "__main__":
    main()
