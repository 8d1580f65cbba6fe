"""Read a PyTorch checkpoint (a CompVis / Lightning ``model.ckpt``) without running its pickle.

``torch.load(weights_only=False)`` runs whatever the pickle asks for, and ``weights_only=True`` refuses a
Lightning checkpoint as soon as it names a class torch does not know (callbacks such as
``pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint``, ``argparse.Namespace`` hyper-parameters,
numpy scalars). ``load_checkpoint`` reads both file formats of ``torch.save`` itself:

* zip (PyTorch >= 1.6): ``<name>/data.pkl`` plus one record ``<name>/data/<key>`` per storage, with the
  persistent id ``('storage', storage_type, key, location, numel)`` (as ``torch.serialization._load``);
* legacy (``_use_new_zipfile_serialization=False``): magic number, protocol and sys-info pickles, the
  object pickle with ids ``('storage', storage_type, root_key, location, numel, view_metadata)``, the list
  of storage keys, then per key an int64 element count and the raw bytes (as ``_legacy_load``). The
  older tar format (PyTorch <= 0.3) is refused with one line.

The pickle runs on Python's pure-Python unpickler (``pickle._Unpickler``), with every opcode that could
call or mutate something replaced (the idea of ``torch._weights_only_unpickler``; the code is our own). The rule:

1. Nothing is imported and nothing outside the allow list is ever called. The allow list: torch's
   tensor rebuild functions (``torch._utils._rebuild_tensor[_v2|_v3]``, ``_rebuild_parameter[_with_state]``,
   ``torch._tensor._rebuild_from_type[_v2]``), re-implemented here with checked arguments and always on
   the CPU; storage types and dtypes as plain values; ``collections.OrderedDict``, ``set``, ``frozenset``,
   ``complex``, ``slice``, ``bytearray`` and ``_codecs.encode`` (how protocol 2 writes bytes), the last two
   for str/bytes arguments only; ``torch.Size`` and ``torch.device``. Everything else the pickle names
   becomes a ``GlobalRef``, an inert token.
2. Calling a ``GlobalRef`` (REDUCE, NEWOBJ, NEWOBJ_EX, INST, OBJ) gives a ``Placeholder`` that only
   records the call's arguments and, through BUILD / APPEND(S) / SETITEM(S) / ADDITEMS, its state and
   items. That is what becomes of Lightning callbacks, hyper-parameter namespaces, ``omegaconf``
   containers or numpy scalars: data nobody calls, and a module that is not installed is fine.
3. Except when the global lives in a module that can run code (``_CODE_MODULES``: os, posix,
   subprocess, builtins, sys, importlib, pickle, torch's non-rebuild functions, ...): an honest
   checkpoint never calls those, so such a pickle is an attack or a broken file, and loading stops
   with an ``UnsafeCheckpointError`` naming the global. Refusing every call of an unknown global
   instead would refuse honest files (numpy scalars and ``defaultdict`` are such calls). The list only
   decides between a loud refusal and a silent placeholder; safety rests on rule 1, so a function of a
   module missing from the list is never run either.
4. BUILD on anything but a placeholder (which would call e.g. ``Tensor.__setstate__``) and the EXT
   opcodes (which read the process-wide copyreg extension cache) are refused.

Tensors share storages as in ``torch.load``, but parameters and tensor subclasses come back as plain
tensors (``requires_grad``, hooks and subclass state dropped): a state dict needs only their values.

Over 300 lines: one safe unpickler for both torch.save formats; splitting it would spread the
safety argument above over several files.
"""
from __future__ import annotations

import _compat_pickle
import io
import logging
import pickle
import struct
import sys
import tarfile
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "UnsafeCheckpointError", "GlobalRef", "Placeholder", "load_checkpoint"]

log = logging.getLogger(__name__)

_CODE_MODULES = frozenset({
    "builtins", "os", "posix", "nt", "posixpath", "ntpath", "sys", "subprocess", "importlib", "runpy",
    "shutil", "socket", "pickle", "_pickle", "marshal", "types", "code", "codeop", "ctypes", "_ctypes",
    "functools", "operator", "_operator", "copyreg", "io", "_io", "pty", "multiprocessing", "threading",
    "_thread", "signal", "tempfile", "webbrowser", "timeit", "pdb", "bdb", "inspect", "platform",
    "asyncio", "gc", "torch",
})
_LEGACY_MAGIC, _LEGACY_PROTOCOL = 0x1950A86A20F9469CFC6C, 1001


class CheckpointError(ValueError):
    """The file cannot be read as a checkpoint (corrupt, truncated, unsupported format)."""


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """The pickle would call a global outside the allow list that can run code; nothing was run."""


class GlobalRef:
    """A global the pickle names but the loader does not allow: module and name only, never imported."""
    __slots__ = ("module", "name")

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    @property
    def runs_code(self) -> bool:
        return self.module.split(".")[0] in _CODE_MODULES

    def __eq__(self, other):
        return isinstance(other, GlobalRef) and (self.module, self.name) == (other.module, other.name)

    def __hash__(self):
        return hash((self.module, self.name))

    def __repr__(self):
        return f"{self.module}.{self.name}"


class Placeholder:
    """What a call of a ``GlobalRef`` left: the global, the call's args / kwargs, the BUILD state and
    the items the pickle appended, added or set; never called, never rebuilt."""

    def __init__(self, ref: GlobalRef, args: tuple = (), kwargs: dict | None = None):
        self.ref, self.args, self.kwargs = ref, args, kwargs or {}
        self.state, self.items, self.entries = None, [], []

    def append(self, item):
        self.items.append(item)

    def extend(self, items):
        self.items.extend(items)

    def add(self, item):
        self.items.append(item)

    def __setitem__(self, key, value):
        self.entries.append((key, value))

    def __repr__(self):
        return f"Placeholder({self.ref!r})"


class _StorageType:
    """``torch.FloatStorage`` and friends as the pickle names them: only their dtype is used."""
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class _StorageRef:
    """A window of ``nbytes`` bytes at ``offset`` of a CPU storage, read as ``dtype``."""
    def __init__(self, storage: torch.UntypedStorage, dtype: torch.dtype, offset: int, nbytes: int):
        self.storage, self.dtype, self.offset, self.nbytes = storage, dtype, offset, nbytes


# ----------------------------------------------------------------------------- allow list
def _ints(x, what: str) -> tuple[int, ...]:
    if not isinstance(x, (tuple, list)) or not all(type(v) is int and v >= 0 for v in x):
        raise CheckpointError(f"tensor {what} is not a tuple of non-negative ints: {x!r}")
    return tuple(x)


def _tensor(storage, offset, size, stride, dtype=None) -> torch.Tensor:
    """``torch._utils._rebuild_tensor``: a CPU tensor viewing ``storage``, bounds checked."""
    if not isinstance(storage, _StorageRef):
        raise CheckpointError(f"a tensor's storage is a {type(storage).__name__}, not a storage record")
    dtype = storage.dtype if dtype is None else dtype
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"a tensor's dtype is a {type(dtype).__name__}")
    (offset,), size, stride = _ints((offset,), "offset"), _ints(size, "size"), _ints(stride, "stride")
    if len(size) != len(stride) or storage.offset % dtype.itemsize:
        raise CheckpointError(f"tensor size {size} / stride {stride} / storage offset do not fit together")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if 0 not in size and (last + 1) * dtype.itemsize > storage.nbytes:
        raise CheckpointError(f"tensor size {size} stride {stride} offset {offset} reads past its "
                              f"storage of {storage.nbytes} bytes")
    start = storage.offset // dtype.itemsize + offset
    return torch.empty(0, dtype=dtype).set_(storage.storage, start, size, stride)


def _tensor_v2(storage, offset, size, stride, requires_grad, hooks, metadata=None):
    t = _tensor(storage, offset, size, stride)
    if metadata:  # conj / neg bits of complex views
        if not (isinstance(metadata, dict) and set(metadata) <= {"conj", "neg"}
                and all(type(v) is bool for v in metadata.values())):
            raise CheckpointError(f"unsupported tensor metadata {metadata!r}")
        torch._utils.set_tensor_metadata(t, metadata)
    return t


def _tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    return _tensor_v2(_StorageRef(storage.storage, dtype, storage.offset, storage.nbytes)
                      if isinstance(storage, _StorageRef) else storage, offset, size, stride,
                      requires_grad, hooks, metadata)


def _parameter(data, *requires_grad_hooks_state):
    if not isinstance(data, torch.Tensor):
        raise CheckpointError(f"a parameter's data is a {type(data).__name__}, not a tensor")
    return data


def _from_type(func, new_type, args, state=None):
    """``torch._tensor._rebuild_from_type_v2``: only our rebuild functions; the subclass is dropped."""
    if not any(func is f for f in _REBUILDERS) or not isinstance(args, tuple):
        raise UnsafeCheckpointError(f"refused: a tensor subclass is rebuilt by a {type(func).__name__}")
    return func(*args)


def _encode(text, encoding="utf-8"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise CheckpointError(f"_codecs.encode with {type(text).__name__} / {encoding!r} is not allowed")
    return text.encode(encoding)


def _bytearray(*args):
    if not all(isinstance(a, (bytes, str)) for a in args):
        raise CheckpointError("bytearray() is only allowed on bytes or str")
    return bytearray(*args)


_REBUILDERS = (_tensor, _tensor_v2, _tensor_v3, _parameter)
_CALLABLES: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor"): _tensor, ("torch._utils", "_rebuild_tensor_v2"): _tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _tensor_v3, ("torch._utils", "_rebuild_parameter"): _parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _from_type, ("torch._tensor", "_rebuild_from_type"): _from_type,
    ("collections", "OrderedDict"): OrderedDict, ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex, ("builtins", "slice"): slice, ("builtins", "bytearray"): _bytearray,
    ("_codecs", "encode"): _encode, ("torch", "Size"): torch.Size, ("torch", "device"): torch.device,
}
_CALLABLE_IDS = frozenset(id(f) for f in _CALLABLES.values())
_DTYPES = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}
_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexDoubleStorage": torch.complex128,
    "ComplexFloatStorage": torch.complex64, "UntypedStorage": torch.uint8,
}


# ----------------------------------------------------------------------------- unpickler
class _SafeUnpickler(pickle._Unpickler):
    """Python's unpickler with find_class, the calling opcodes, BUILD and EXT replaced (see module doc)."""
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, persistent_load=None):
        super().__init__(file, encoding="utf-8")
        self._persistent_load = persistent_load
        self.refs: set[str] = set()

    def persistent_load(self, pid):
        if self._persistent_load is None:
            raise CheckpointError("a persistent id where none is expected")
        return self._persistent_load(pid)

    def find_class(self, module, name):
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        module = "torch._tensor" if module == "torch.tensor" else module
        if (module, name) in _CALLABLES:
            return _CALLABLES[module, name]
        if module in ("torch", "torch.cuda", "torch.storage") and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name]
        self.refs.add(f"{module}.{name}")
        return GlobalRef(module, name)

    def _call(self, func, args, kwargs, opcode: str):
        if isinstance(func, GlobalRef):
            if func.runs_code:
                raise UnsafeCheckpointError(
                    f"refused: the pickle calls {func!r} ({opcode}), which is not on the safe loader's allow "
                    "list and can run code; nothing was run")
            return Placeholder(func, tuple(args), dict(kwargs))
        if id(func) not in _CALLABLE_IDS:
            raise UnsafeCheckpointError(f"refused: the pickle calls a {type(func).__name__} object ({opcode})")
        return func(*args, **kwargs)

    def load_reduce(self):
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args, {}, "REDUCE")

    def load_newobj(self):
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args, {}, "NEWOBJ")

    def load_newobj_ex(self):
        kwargs, args = self.stack.pop(), self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args, kwargs, "NEWOBJ_EX")

    def _instantiate(self, klass, args):  # INST and OBJ
        self.append(self._call(klass, args, {}, "INST/OBJ"))

    def load_build(self):
        state, inst = self.stack.pop(), self.stack[-1]
        if not isinstance(inst, Placeholder):
            raise UnsafeCheckpointError(f"refused: the pickle sets the state of a {type(inst).__name__} (BUILD)")
        inst.state = state

    def load_ext(self):
        raise CheckpointError("the pickle uses the copyreg extension registry (EXT opcodes)")

    for _op, _fn in ((pickle.REDUCE, load_reduce), (pickle.NEWOBJ, load_newobj),
                     (pickle.NEWOBJ_EX, load_newobj_ex), (pickle.BUILD, load_build),
                     (pickle.EXT1, load_ext), (pickle.EXT2, load_ext), (pickle.EXT4, load_ext)):
        dispatch[_op[0]] = _fn
    del _op, _fn


def _storage_pid(pid, length: int) -> tuple:
    if not (isinstance(pid, tuple) and len(pid) == length and pid[0] in ("storage", b"storage")
            and isinstance(pid[1], _StorageType) and type(pid[4]) is int and pid[4] >= 0):
        raise CheckpointError(f"unexpected persistent id {pid!r}")
    return pid


# ----------------------------------------------------------------------------- file formats
def _load_zip(path: Path) -> tuple[Any, set[str]]:
    with zipfile.ZipFile(path) as zf:
        pkl = [n for n in zf.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pkl) != 1:
            raise CheckpointError("zip archive without exactly one <name>/data.pkl (not a torch.save file)")
        prefix = pkl[0].removesuffix("data.pkl")
        names = set(zf.namelist())
        order = zf.read(prefix + "byteorder").decode() if prefix + "byteorder" in names else "little"
        storages: dict[str, torch.UntypedStorage] = {}

        def persistent_load(pid):
            _, stype, key, _location, numel = _storage_pid(pid, 5)
            nbytes = numel * stype.dtype.itemsize
            if key not in storages:
                name = f"{prefix}data/{key}"
                if name not in names or zf.getinfo(name).file_size != nbytes:
                    raise CheckpointError(f"record {name} is missing or does not hold {nbytes} bytes")
                data = zf.read(name)  # checks the record's CRC
                storage = (torch.frombuffer(bytearray(data), dtype=torch.uint8).untyped_storage()
                           if nbytes else torch.UntypedStorage(0))
                if order != sys.byteorder:
                    storage.byteswap(stype.dtype)
                storages[key] = storage
            return _StorageRef(storages[key], stype.dtype, 0, storages[key].nbytes())

        unpickler = _SafeUnpickler(io.BytesIO(zf.read(pkl[0])), persistent_load)
        return unpickler.load(), unpickler.refs


def _load_legacy(f) -> tuple[Any, set[str]]:
    try:
        magic = _SafeUnpickler(f).load()
    except UnsafeCheckpointError:  # a bare hostile pickle: say what it calls
        raise
    except Exception:
        magic = None
    if magic != _LEGACY_MAGIC:
        raise CheckpointError("not a PyTorch checkpoint (neither a zip archive nor a legacy torch.save file)")
    protocol, sys_info = _SafeUnpickler(f).load(), _SafeUnpickler(f).load()
    if protocol != _LEGACY_PROTOCOL or not isinstance(sys_info, dict):
        raise CheckpointError(f"legacy checkpoint with unknown protocol {protocol!r}")
    if sys_info.get("little_endian", True) != (sys.byteorder == "little"):
        raise CheckpointError("legacy checkpoint written on a machine of the other byte order")
    roots: dict[str, tuple[torch.UntypedStorage, int]] = {}  # key -> (storage, element size)

    def persistent_load(pid):
        if isinstance(pid, tuple) and pid[:1] in (("module",), (b"module",)):
            return pid[1]  # a pickled nn.Module class: its GlobalRef
        _, stype, key, _location, numel, view = _storage_pid(pid, 6)
        item = stype.dtype.itemsize
        if key not in roots:
            roots[key] = torch.UntypedStorage(numel * item), item
        root = roots[key][0]
        if view is None:
            return _StorageRef(root, stype.dtype, 0, root.nbytes())
        _, offset, size = view
        if offset < 0 or size < 0 or (offset + size) * item > root.nbytes():
            raise CheckpointError(f"storage view {view!r} reaches past its storage")
        return _StorageRef(root, stype.dtype, offset * item, size * item)

    unpickler = _SafeUnpickler(f, persistent_load)
    result, keys = unpickler.load(), _SafeUnpickler(f).load()
    if not isinstance(keys, list) or set(keys) != set(roots):
        raise CheckpointError("the legacy storage key list does not match the storages the pickle uses")
    for key in keys:
        (storage, item), head = roots[key], f.read(8)
        nbytes = storage.nbytes()
        data = f.read(nbytes) if len(head) == 8 and struct.unpack("=q", head)[0] * item == nbytes else b""
        if len(data) != nbytes:
            raise CheckpointError(f"legacy storage {key} is truncated or has the wrong size")
        if nbytes:
            torch.empty(0, dtype=torch.uint8).set_(storage).copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    return result, unpickler.refs


def load_checkpoint(path: str | Path) -> Any:
    """Unpickle the ``torch.save`` file at ``path`` onto the CPU under the module doc's rules.

    Raises ``UnsafeCheckpointError`` (a refused call, one line naming the global) or ``CheckpointError``
    (corrupt, truncated or unsupported file), both naming ``path``; nothing from the file is run.
    """
    path = Path(path)
    with open(path, "rb") as f:  # a missing file raises its own error, which names the path
        zipped = f.read(4) in (b"PK\x03\x04", b"PK\x05\x06")
    try:
        if zipped:
            result, refs = _load_zip(path)
        elif tarfile.is_tarfile(path):
            raise CheckpointError("tar checkpoint of PyTorch <= 0.3: not supported, re-save it with torch.save")
        else:
            with open(path, "rb") as f:
                result, refs = _load_legacy(f)
    except CheckpointError as err:
        raise type(err)(f"{path}: {' '.join(str(err).split())}") from None
    except Exception as err:  # whatever a damaged file makes the readers raise
        msg = " ".join(f"{type(err).__name__}: {err}".split())
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({msg})") from err
    if refs:
        log.info("%s: kept as inert placeholders (never imported or called): %s", path, ", ".join(sorted(refs)))
    return result
