"""models/safe_pickle.py: every kind of dangerous global is refused before unpickling, and the
allow-list is exactly the documented one (issue 29).

The payloads are written with `torch.save` and a pickler that can name any `module.name` (also
ones that do not exist here, such as `nt.system`), so each file references exactly the global
under test next to allowed ones. Where the global can create a file, the payload would create
`marker` if it were unpickled by plain `pickle`."""

from __future__ import annotations

import pickle
import types

import pytest
import torch

from xdlm.models import safe_pickle
from xdlm.models.safe_pickle import Inert, plain, safe_load


class _Callable:
    def __call__(self, *args):  # pickle's REDUCE wants a callable; never called here
        raise AssertionError("a payload was called while pickling")


class G(_Callable):
    """The global `module.name`, pickled as a GLOBAL opcode naming it (never imported here)."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name


class Call(_Callable):
    """Pickles as REDUCE: `fn(*args)` runs when the file is unpickled."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


class _Pickler(pickle._Pickler):
    dispatch = dict(pickle._Pickler.dispatch)

    def _save_global_name(self, obj: G) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[G] = _save_global_name


PICKLE_MODULE = types.SimpleNamespace(Pickler=_Pickler, __name__="pickle")


def _write(path, payload) -> None:
    ckpt = {"state_dict": {"backbone.w": torch.arange(4.0)}, "hyper_parameters": {"x": payload}}
    torch.save(ckpt, path, pickle_module=PICKLE_MODULE)


def _payloads(marker):
    """name -> a payload referencing that global (and allowed ones only)."""
    m = str(marker)
    touch, code = f"touch {m}", f"open({m!r}, 'w').close()"
    path = Call(G("pathlib", "PosixPath"), m)  # allowed: an Inert placeholder
    return {
        "os.system": Call(G("os", "system"), touch),
        "posix.system": Call(G("posix", "system"), touch),
        "nt.system": Call(G("nt", "system"), touch),
        "posix.execv": Call(G("posix", "execv"), "/usr/bin/touch", ["touch", m]),
        "subprocess.Popen": Call(G("subprocess", "Popen"), ["touch", m]),
        "subprocess.run": Call(G("subprocess", "run"), ["touch", m]),
        "builtins.eval": Call(G("builtins", "eval"), code),
        "builtins.exec": Call(G("builtins", "exec"), code),
        "builtins.compile": Call(G("builtins", "compile"), code, "x", "exec"),
        "builtins.getattr": Call(Call(G("builtins", "getattr"), path, "touch")),
        "builtins.__import__": Call(G("builtins", "__import__"), "os"),
        "builtins.open": Call(G("builtins", "open"), m, "w"),
        "importlib.import_module": Call(G("importlib", "import_module"), "os"),
        "functools.partial": Call(Call(G("functools", "partial"), path)),
        "operator.methodcaller": Call(Call(G("operator", "methodcaller"), "touch"), path),
        "torch.serialization.load": Call(G("torch.serialization", "load"), m),
        "torch.load": Call(G("torch", "load"), m),
        "torch._C._jit_set_profiling_mode": Call(G("torch._C", "_jit_set_profiling_mode"), True),
        "shutil.rmtree": Call(G("shutil", "rmtree"), str(marker.parent / "victim")),
        "pty.spawn": Call(G("pty", "spawn"), ["touch", m]),
        "socket.socket": Call(G("socket", "socket")),
        "socket.create_connection": Call(G("socket", "create_connection"), ("127.0.0.1", 9)),
        "ctypes.CDLL": Call(G("ctypes", "CDLL"), "libc.so.6"),
        "runpy.run_path": Call(G("runpy", "run_path"), m),
        "marshal.loads": Call(G("marshal", "loads"), b"\xe3"),
        "types.FunctionType": Call(G("types", "FunctionType"), None, {}),
        "pickle.loads": Call(G("pickle", "loads"), b"x"),
        # names that share a prefix with an allowed module, and an unknown package
        "numpyx.system": Call(G("numpyx", "system"), touch),
        "omegaconf_evil.run": Call(G("omegaconf_evil", "run"), touch),
        "typing_extensions.x": Call(G("typing_extensions", "x")),
        "evil_package.run": Call(G("evil_package", "run"), touch),
    }


KINDS = sorted(_payloads(__import__("pathlib").Path("m")))


@pytest.mark.parametrize("name", KINDS)
def test_each_dangerous_global_is_refused_before_unpickling(tmp_path, name):
    marker, victim = tmp_path / "PWNED", tmp_path / "victim"
    victim.mkdir()
    _write(tmp_path / "evil.ckpt", _payloads(marker)[name])
    with pytest.raises(ValueError, match="refusing to load") as err:
        safe_load(tmp_path / "evil.ckpt")
    assert f"references [{name!r}]" in str(err.value)  # exactly this global, nothing else
    assert not marker.exists() and victim.is_dir()


@pytest.mark.parametrize("name", ["os.system", "builtins.eval", "subprocess.Popen", "nt.system"])
def test_partial_wrapping_a_dangerous_global_is_refused(tmp_path, name):
    marker = tmp_path / "PWNED"
    inner = _payloads(marker)[name]
    _write(tmp_path / "evil.ckpt", Call(Call(G("functools", "partial"), inner.fn, *inner.args)))
    with pytest.raises(ValueError, match="refusing to load") as err:
        safe_load(tmp_path / "evil.ckpt")
    assert f"references {sorted(['functools.partial', name])!r}" in str(err.value)
    assert not marker.exists()


def test_the_payloads_are_live(tmp_path):
    """The file format is real: plain unpickling runs the payload (here one that only writes a
    file in tmp_path), so a refusal above is what keeps it from running."""
    marker = tmp_path / "PWNED"
    _write(tmp_path / "evil.ckpt", _payloads(marker)["builtins.exec"])
    torch.load(tmp_path / "evil.ckpt", weights_only=False)
    assert marker.exists()


def test_the_allow_list_is_exactly_the_documented_one():
    """docs/security.md and docs/reproduce.md name these; a new entry needs a review (a whole
    module is allowed only because its names become `Inert`, never the real object)."""
    assert safe_pickle.METADATA_MODULES == {
        "omegaconf", "hydra", "transformers", "tokenizers", "lightning", "lightning_fabric",
        "pytorch_lightning", "numpy", "typing", "pathlib",
    }  # fmt: skip
    assert safe_pickle.METADATA_NAMES == {
        "builtins.dict", "builtins.list", "builtins.tuple", "builtins.set", "builtins.int",
        "builtins.float", "builtins.str", "builtins.bool", "builtins.object",
        "collections.defaultdict", "collections.OrderedDict",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("module", "name"),
    [("pathlib", "Path.touch"), ("numpy", "savetxt"), ("omegaconf.dictconfig", "DictConfig")],
)
def test_allowed_globals_become_inert_and_never_run(tmp_path, module, name):
    """An allowed name that would write `marker` if it were the real object (Path.touch,
    numpy.savetxt) loads as an `Inert` that only recorded its arguments."""
    marker = tmp_path / "PWNED"
    _write(tmp_path / "meta.ckpt", Call(G(module, name), str(marker)))
    data = safe_load(tmp_path / "meta.ckpt")
    meta = data["hyper_parameters"]["x"]
    assert isinstance(meta, Inert) and meta.args == (str(marker),) and not marker.exists()
    assert torch.equal(data["state_dict"]["backbone.w"], torch.arange(4.0))
    assert plain(data["hyper_parameters"]) == {"x": None}


def test_plain_reads_recorded_container_state():
    node = Inert.__new__(Inert)
    node.__setstate__({"_val": 3})
    config = Inert.__new__(Inert)
    config.__setstate__({"_content": {"a": node, "b": [node, (1, "s")]}})
    assert plain({"c": config, "n": Inert()}) == {"c": {"a": 3, "b": [3, [1, "s"]]}, "n": None}
    assert repr(config) == "Inert(...)"


class _Container:
    """Pickles as an allowed omegaconf class rebuilt with `state` and list items (the BUILD and
    APPEND / APPENDS opcodes)."""

    def __init__(self, state, items=None):
        self.state, self.items = state, items

    def __reduce__(self):
        cls = G("omegaconf.listconfig", "ListConfig")
        return (cls, (), self.state, None if self.items is None else iter(self.items))


def test_inert_records_its_state_and_items_on_it_are_refused(tmp_path):
    """omegaconf containers pickle their content as state (BUILD): recorded. torch's restricted
    unpickler appends only to real lists: items on a placeholder make the file unreadable."""
    _write(tmp_path / "meta.ckpt", _Container({"_content": [1, 2]}))
    meta = safe_load(tmp_path / "meta.ckpt")["hyper_parameters"]["x"]
    assert (meta.state, meta.args, meta.kwargs) == ({"_content": [1, 2]}, (), {})
    assert plain(meta) == [1, 2]
    for items in ([7], [1, 2, 3]):
        _write(tmp_path / "items.ckpt", _Container(None, items))
        with pytest.raises(ValueError, match="could not read .*items.ckpt as a tensor checkpoint"):
            safe_load(tmp_path / "items.ckpt")


def test_a_missing_file_and_a_file_that_is_no_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        safe_load(tmp_path / "none.ckpt")
    assert str(err.value) == f"no checkpoint file at {tmp_path / 'none.ckpt'}"
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    with pytest.raises(ValueError) as err:
        safe_load(tmp_path / "text.ckpt")
    text = str(err.value)
    assert text.startswith(f"{tmp_path / 'text.ckpt'} is not a zip-format PyTorch checkpoint (")
    assert text.endswith(
        "); files written by torch.save since PyTorch 1.6 are (Lightning .ckpt included); "
        "legacy ones are not read"
    )


def test_the_refusal_is_one_message_naming_file_and_globals(tmp_path):
    _write(tmp_path / "evil.ckpt", Call(G("os", "system"), "true"))
    with pytest.raises(ValueError) as err:
        safe_load(tmp_path / "evil.ckpt")
    assert str(err.value) == (
        f"refusing to load {tmp_path / 'evil.ckpt'}: it references ['os.system'], which a model "
        "checkpoint never needs and which could run code when unpickled. Only tensors, plain "
        "containers and the metadata of Lightning / omegaconf / transformers are accepted."
    )


def test_a_pickle_that_fails_to_rebuild_and_a_non_dict_are_refused(tmp_path):
    _write(tmp_path / "bad.ckpt", Call(G("torch._utils", "_rebuild_tensor_v2"), "bad"))
    with pytest.raises(ValueError, match="could not read .*bad.ckpt as a tensor checkpoint"):
        safe_load(tmp_path / "bad.ckpt")
    torch.save([torch.zeros(1)], tmp_path / "list.ckpt")
    with pytest.raises(ValueError) as err:
        safe_load(tmp_path / "list.ckpt")
    assert str(err.value) == f"{tmp_path / 'list.ckpt'} holds a list, not a checkpoint dict"


def test_a_gpu_checkpoint_loads_on_the_cpu_mapped_from_the_file(tmp_path, monkeypatch):
    """Official checkpoints were saved on GPUs: their storages say "cuda:0". They load onto
    the CPU, and the tensors are memory-mapped from the file (a multi-GB .ckpt does not need
    its size in RAM)."""
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save({"state_dict": {"w": torch.arange(3.0)}}, tmp_path / "gpu.ckpt")
    w = safe_load(tmp_path / "gpu.ckpt")["state_dict"]["w"]
    assert w.device.type == "cpu" and torch.equal(w, torch.arange(3.0))
    assert _mapped_from(w, tmp_path / "gpu.ckpt")


def _mapped_from(tensor, path) -> bool:
    """Whether `tensor`'s memory lies in a mapping of the file `path` (/proc/self/maps)."""
    ptr = tensor.untyped_storage().data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            if line.rstrip().endswith(str(path)):
                low, high = (int(x, 16) for x in line.split()[0].split("-"))
                if low <= ptr < high:
                    return True
    return False


def test_the_environment_cannot_turn_off_the_restricted_unpickler(tmp_path, monkeypatch):
    """TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD changes torch.load's default, never an explicit
    `weights_only=True`: an allowed name still loads as Inert and never runs."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "PWNED"
    _write(tmp_path / "meta.ckpt", Call(G("numpy", "savetxt"), str(marker), [1.0]))
    meta = safe_load(tmp_path / "meta.ckpt")["hyper_parameters"]["x"]
    assert isinstance(meta, Inert) and not marker.exists()
