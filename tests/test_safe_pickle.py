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
