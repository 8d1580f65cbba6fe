"""The safe checkpoint reader (treedaps.models.checkpoint): Lightning extras load as placeholders,
tensors come back bitwise, pickles that would call code are refused before anything runs."""
from __future__ import annotations

import argparse
import builtins
import collections
import io
import os
import pickle
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from treedaps.models.checkpoint import (
    CheckpointError, GlobalRef, Placeholder, UnsafeCheckpointError, load_checkpoint,
)

FIX = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "daps_ref"
LIGHTNING = "pytorch_lightning.callbacks.model_checkpoint"


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().resolve_conj().contiguous().reshape(-1).view(torch.uint8)


def assert_same_tensor(out: torch.Tensor, ref: torch.Tensor, key: str) -> None:
    assert type(out) is torch.Tensor, key
    assert (out.dtype, out.shape, out.stride(), out.storage_offset(), out.is_conj()) == \
        (ref.dtype, ref.shape, ref.stride(), ref.storage_offset(), ref.is_conj()), key
    assert torch.equal(bits(out), bits(ref)), f"{key}: bytes differ"


def tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=gen)
    base[0, 0] = float("nan")
    return {
        "w": base, "w_cols": base[:, 1:4], "w_t": base.t(),  # one storage, a non-contiguous view and a transpose
        "half": torch.randn(5, generator=gen).half(), "bf16": torch.randn(3, generator=gen).bfloat16(),
        "steps": torch.arange(7), "mask": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 3), "param": torch.nn.Parameter(torch.ones(2, 2)),
        "conj": torch.randn(3, dtype=torch.cfloat, generator=gen).conj(),
        "fp8": torch.randn(4, generator=gen).to(torch.float8_e4m3fn),
    }


def lightning_checkpoint(monkeypatch, path: Path, state_dict, legacy: bool = False) -> None:
    """A Lightning-era model.ckpt whose callback class lives in a module that is not installed."""
    cls = type("ModelCheckpoint", (), {})
    cls.__module__, cls.__qualname__ = LIGHTNING, "ModelCheckpoint"
    callback = cls()
    callback.dirpath, callback.best_model_score = "logs/checkpoints", torch.tensor(0.25)
    with monkeypatch.context() as patch:  # the module exists only while pickling
        for depth in (1, 2, 3):  # pickle imports the module and its parents
            name = ".".join(LIGHTNING.split(".")[:depth])
            patch.setitem(sys.modules, name, types.ModuleType(name))
        sys.modules[LIGHTNING].ModelCheckpoint = cls
        torch.save({"epoch": 7, "global_step": 1234, "pytorch-lightning_version": "1.4.2",
                    "callbacks": {cls: {"best_model_score": torch.tensor(0.25)}}, "callback": callback,
                    "hyper_parameters": argparse.Namespace(lr=1e-4, name="ldm"), "best": np.float64(0.5),
                    "counts": collections.defaultdict(int, a=2), "tags": {"a", "b"}, "blob": b"\x00\xff",
                    "state_dict": state_dict}, path, _use_new_zipfile_serialization=not legacy)
    assert "pytorch_lightning" not in sys.modules


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_lightning_checkpoint_loads_bitwise_without_importing(monkeypatch, tmp_path, legacy):
    sd = tensors()
    path = tmp_path / "model.ckpt"
    lightning_checkpoint(monkeypatch, path, sd, legacy)
    modules = set(sys.modules)
    out = load_checkpoint(path)
    assert set(sys.modules) == modules  # nothing was imported

    assert set(out["state_dict"]) == set(sd)
    for key, ref in sd.items():
        assert_same_tensor(out["state_dict"][key], ref.detach(), key)
    got = out["state_dict"]
    assert got["w_cols"].untyped_storage().data_ptr() == got["w"].untyped_storage().data_ptr() \
        == got["w_t"].untyped_storage().data_ptr()
    got["w"][1, 1] = 123.0  # shared, as in torch.load
    assert got["w_t"][1, 1] == 123.0 and got["w_cols"][1, 0] == 123.0

    ref = GlobalRef(LIGHTNING, "ModelCheckpoint")
    assert list(out["callbacks"]) == [ref]
    assert torch.equal(out["callbacks"][ref]["best_model_score"], torch.tensor(0.25))
    callback = out["callback"]
    assert isinstance(callback, Placeholder) and callback.ref == ref
    assert callback.state["dirpath"] == "logs/checkpoints"
    assert torch.equal(callback.state["best_model_score"], torch.tensor(0.25))
    hp = out["hyper_parameters"]
    assert repr(hp.ref) == "argparse.Namespace" and hp.state == {"lr": 1e-4, "name": "ldm"}
    assert repr(out["best"].ref).endswith("multiarray.scalar")
    assert out["best"].args[1] == np.float64(0.5).tobytes()
    assert repr(out["counts"].ref) == "collections.defaultdict" and out["counts"].entries == [("a", 2)]
    assert out["tags"] == {"a", "b"} and out["blob"] == b"\x00\xff"
    assert (out["epoch"], out["global_step"], out["pytorch-lightning_version"]) == (7, 1234, "1.4.2")


class Call:
    """Pickles as a call of ``fn(*args)``, as a hostile checkpoint would."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def write_raw(path: Path, pickle_bytes: bytes) -> None:
    """A zip checkpoint holding exactly this data.pkl."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle_bytes)


ATTACKS = {
    f"{os.system.__module__}.system": lambda marker: Call(os.system, f"touch {marker}"),
    "builtins.print": lambda marker: Call(builtins.print, "PRINTED"),
    "builtins.eval": lambda marker: Call(builtins.eval, f"open({str(marker)!r}, 'w').close()"),
    "subprocess.Popen": lambda marker: Call(subprocess.Popen, ["touch", str(marker)]),
}


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("name", list(ATTACKS))
def test_pickle_that_calls_code_is_refused_and_nothing_runs(tmp_path, capfd, name, legacy):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "payload": ATTACKS[name](marker)}, path,
               _use_new_zipfile_serialization=not legacy)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and f"calls {name} " in msg
    assert isinstance(info.value, ValueError)
    assert not marker.exists() and "PRINTED" not in capfd.readouterr().out


def test_protocol0_inst_and_build_on_real_objects_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "inst.ckpt"
    write_raw(path, f"(S'touch {marker}'\nios\nsystem\n.".encode())  # INST os.system
    with pytest.raises(UnsafeCheckpointError, match=r"calls os\.system \(INST/OBJ\)"):
        load_checkpoint(path)
    bare = tmp_path / "bare.pkl"  # a plain pickle file, no torch container
    bare.write_bytes(pickle.dumps(Call(os.system, f"touch {marker}")))
    with pytest.raises(UnsafeCheckpointError, match=r"calls (posix|nt)\.system \(REDUCE\)"):
        load_checkpoint(bare)
    assert not marker.exists()
    write_raw(path, b"\x80\x02ccollections\nOrderedDict\n)R}b.")  # BUILD on an OrderedDict
    with pytest.raises(UnsafeCheckpointError, match="sets the state of a OrderedDict"):
        load_checkpoint(path)
    write_raw(path, b"\x80\x02cnot_installed.mod\nThing\n)R)R.")  # calling a placeholder
    with pytest.raises(UnsafeCheckpointError, match="calls a Placeholder"):
        load_checkpoint(path)
    subclass = Call(torch._tensor._rebuild_from_type_v2, os.system, torch.Tensor, (f"touch {marker}",), {})
    torch.save({"t": subclass}, path)
    with pytest.raises(UnsafeCheckpointError, match="tensor subclass is rebuilt by a GlobalRef"):
        load_checkpoint(path)
    assert not marker.exists()


def test_tensor_reading_past_its_storage_is_refused(tmp_path):
    class StoragePickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", 2) if obj == "STORAGE" else None

    path = tmp_path / "oob.ckpt"
    for size, stride, offset in (((4,), (1,), 0), ((2,), (1,), 1), ((2, 2), (0, 1), 0)):
        buf = io.BytesIO()
        StoragePickler(buf, protocol=2).dump(
            {"w": Call(torch._utils._rebuild_tensor_v2, "STORAGE", offset, size, stride, False, {})})
        write_raw(path, buf.getvalue())
        with zipfile.ZipFile(path, "a") as zf:
            zf.writestr("archive/data/0", np.array([1.0, 2.0], dtype=np.float32).tobytes())
        if stride == (0, 1):  # a broadcast view inside the storage is fine
            assert torch.equal(load_checkpoint(path)["w"], torch.tensor([[1.0, 2.0], [1.0, 2.0]]))
            continue
        with pytest.raises(CheckpointError, match="reads past its storage of 8 bytes"):
            load_checkpoint(path)


@pytest.mark.skipif(not FIX.is_dir(), reason=f"DAPS reference fixtures not found at {FIX}")
@pytest.mark.parametrize("name", ["tiny_ffhq_ldm.ckpt", "tiny_imagenet_ldm.ckpt"])
def test_fixture_checkpoints_equal_torch_load(name):
    ref = torch.load(FIX / name, map_location="cpu", weights_only=True)
    out = load_checkpoint(FIX / name)
    assert list(out) == list(ref) and list(out["state_dict"]) == list(ref["state_dict"])
    assert len(ref["state_dict"]) > 100
    for key, tensor in ref["state_dict"].items():
        assert_same_tensor(out["state_dict"][key], tensor, key)


def test_corrupt_files_give_one_line_naming_the_path(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.arange(1000.0)}}, good)
    raw = good.read_bytes()
    legacy = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": {"w": torch.arange(1000.0)}}, legacy, _use_new_zipfile_serialization=False)
    data_at = raw.index(np.arange(1000, dtype=np.float32)[:4].tobytes())
    cases = {
        "truncated.ckpt": raw[: len(raw) // 2],
        "legacy_truncated.ckpt": legacy.read_bytes()[:-100],
        "garbage.ckpt": bytes(range(256)) * 4,
        "empty.ckpt": b"",
        "flipped.ckpt": raw[:data_at + 8] + bytes([raw[data_at + 8] ^ 1]) + raw[data_at + 9:],  # bad CRC
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        msg = str(info.value)
        assert msg.startswith(f"{path}: ") and "\n" not in msg, (name, msg)
