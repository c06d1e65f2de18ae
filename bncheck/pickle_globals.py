"""What a global named in a pickle does when ``torch.load(weights_only=False)`` resolves it: the allow-list.

bncheck never resolves a global, but torch's unpickler does, and then calls it with arguments the file chooses.
Every global a checkpoint names is graded here, from its name alone and without importing anything:

- :attr:`Risk.SAFE`: on the allow-list below. Nothing is reported.
- :attr:`Risk.CODE_EXECUTION`: a known way to run code, write or delete files, or reach the network (BN101).
- :attr:`Risk.UNKNOWN`: everything else, such as the class of a fully pickled user model (``__main__.MLP``) or a
  library's config class. bncheck cannot tell what the class does when it is rebuilt, so it is reported (BN102)
  rather than hidden.

**What may be allowed.** A name is on the allow-list only if constructing or calling it with attacker-chosen
arguments, then ``__setstate__``, ``append``/``extend`` or ``__setitem__`` on the result (everything a pickle can
do to an object), cannot run code, write files or reach the network. The arguments can only be plain data,
tensors, or objects built from other globals of the same pickle, and those are graded themselves. So a chain of
allowed callables stays harmless unless one of its links is a global that is not allowed: a payload passed as
the ``func`` of ``torch._tensor._rebuild_from_type_v2`` or the ``bit_generator_ctor`` of numpy's
``__randomstate_ctor`` is its own global and is graded on its own. Accordingly:

- torch's tensor rebuild functions, storage classes, dtypes, ``torch.Size``/``torch.device`` and the TorchScript
  list helpers: the globals that torch itself writes (also on torch's ``weights_only`` allow-list). Not
  ``torch.storage._load_from_bytes``, which is ``torch.load`` of nested bytes.
- ``torch.nn.modules.<module>.<Class>`` and ``torch.nn.parameter.*``: a fully pickled model's layers. Their
  ``__init__`` allocates tensors and their ``__setstate__`` updates ``__dict__``; calling one runs ``forward``,
  arithmetic on its own tensors and hooks, which are globals of the pickle themselves.
- TorchScript's ``__torch__.*`` class names: resolved against the archive's own compiled TorchScript classes, never
  as Python modules (no ``__torch__`` module exists, so Python's unpickler cannot import one).
- numpy arrays, dtypes, scalars and random generator states: they rebuild data only (a generator constructor takes
  a callable, which is again a global of the pickle). Not ``numpy.load``/``numpy.save``/``numpy.memmap`` and their
  ``lib`` modules (``allow_pickle`` loads nested pickles, the others open files).
- ``collections.OrderedDict``, ``defaultdict``, ``Counter``, ``deque``, ``datetime`` values, ``decimal``, ``uuid.UUID``,
  ``typing`` special forms and a few builtin types: containers and values. ``operator.getitem`` subscripts an
  object, and every object a pickle can build from allowed globals subscripts harmlessly (``typing.Optional[int]``
  is pickled as ``operator.getitem(typing.Union, ...)``). ``builtins.type`` builds ``type(None)`` in the same
  pickles; a class it creates holds only pickled values.
- Classes that real checkpoints carry and that only hold values: ``argparse.Namespace``, ``types.SimpleNamespace``,
  ``pathlib`` paths (constructing a path touches no file; its methods do, see below), ``platform.uname_result``
  (a named tuple; the rest of ``platform`` runs commands), omegaconf's ``DictConfig``/``ListConfig``/metadata/nodes
  (``__setstate__`` updates ``__dict__``; interpolations run only registered resolvers when read) and Lightning's
  ``AttributeDict`` (a dict).

Not allowed, although they are classes: ``logging.FileHandler`` opens a file when constructed, ``zipfile.ZipFile``
and ``tarfile``/``gzip``/``bz2``/``lzma`` create and write files, ``imaplib.IMAP4_stream`` runs a shell command,
``torch.fx.GraphModule`` executes generated code, and ``functools.partial``/``operator.attrgetter``/``methodcaller``
turn any object into a call.

**How names are resolved.** A pickle names a global as a module and a name. Python imports the module and then,
for protocol 4 and later (which a file can declare whatever wrote it), walks the name's dots as attributes: module
``gzip`` with name ``os.system`` is ``os.system``, because ``gzip`` imported ``os``; ``__main__`` with
``__builtins__.eval`` is ``eval``. The reader records such a global as ``module:dotted.name``. A global is code
execution when any of these holds:

- the module, or a module its attribute path reaches (``torch`` + ``fx.graph_module._exec_with_source``), is on the
  list of modules whose names run code (``os``, ``subprocess``, ``builtins`` except a few types, ``torch.fx``...),
  or its full name is on the list of single functions (``torch.serialization.load``, ``logging.FileHandler``...);
- any attribute along the path names such a module (``logging:os.system``, ``numpy:lib.npyio.pickle.loads``):
  the attribute of a module named like a module is, in practice, that module;
- any attribute along the path is a dunder (``__builtins__``, ``__globals__``, ``__class__``, ``__subclasses__``):
  these reach every object of the process;
- the path goes on past an allowed class into its attributes (``pathlib.Path.write_text``,
  ``collections.OrderedDict.fromkeys``): a method called with an attacker-chosen ``self`` and arguments, which torch
  never writes, and for ``pathlib`` writes files;
- its last part is the name of a deserialiser or a runner (``load``, ``loads``, ``system``, ``popen``, ``eval``,
  ``exec``...): whatever module holds it (``joblib.load``, ``yaml.load``, ``dill.loads``), such a function loads
  or runs what it is given.

picklescan's (``mmaitre314/picklescan``) and fickling's (``trailofbits/fickling``) deny-lists were the starting point
of the code-execution lists; every name either flags is code execution here too. Their lists are deny-lists: a name
missing from them passes. Here a name missing from every list is at least reported as unknown.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

__all__ = ["Risk", "grade_global", "split_global"]


class Risk(enum.Enum):
    SAFE = "safe"
    UNKNOWN = "unknown"
    CODE_EXECUTION = "code execution"


def _names(text: str) -> list[str]:
    return text.split()


# torch's own globals: the rebuild functions of torch._weights_only_unpickler, storage classes, dtypes and friends.
_TORCH_STORAGES = _names(
    "DoubleStorage FloatStorage HalfStorage BFloat16Storage LongStorage IntStorage ShortStorage CharStorage "
    "ByteStorage BoolStorage ComplexDoubleStorage ComplexFloatStorage QInt8Storage QUInt8Storage QInt32Storage "
    "QUInt4x2Storage QUInt2x4Storage UntypedStorage TypedStorage"
)
_TORCH_VALUES = _names(
    # dtypes (torch.float32 is pickled as the global torch.float32)
    "float64 float32 float16 bfloat16 int64 int32 int16 int8 uint8 uint16 uint32 uint64 bool complex32 complex64 "
    "complex128 qint8 quint8 qint32 quint4x2 quint2x4 float8_e4m3fn float8_e5m2 float8_e4m3fnuz float8_e5m2fnuz "
    "float8_e8m0fnu float4_e2m1fn_x2 bits8 bits16 bits1x8 bits2x4 bits4x2 int1 int2 int3 int4 int5 int6 int7 uint1 "
    "uint2 uint3 uint4 uint5 uint6 uint7 float double half long int short cfloat cdouble chalf "
    # layouts, memory formats and quantisation schemes
    "strided sparse_coo sparse_csr sparse_csc sparse_bsr sparse_bsc jagged _mkldnn contiguous_format "
    "channels_last channels_last_3d preserve_format per_tensor_affine per_tensor_symmetric per_channel_affine "
    "per_channel_symmetric per_channel_affine_float_qparams "
    # classes
    "Size device Tensor dtype layout memory_format qscheme"
)
_TORCH_REBUILDS = _names(
    "_rebuild_tensor _rebuild_tensor_v2 _rebuild_tensor_v3 _rebuild_parameter _rebuild_parameter_with_state "
    "_rebuild_qtensor _rebuild_sparse_tensor _rebuild_meta_tensor_no_storage _rebuild_nested_tensor "
    "_rebuild_wrapper_subclass _rebuild_device_tensor_from_numpy _rebuild_device_tensor_from_cpu_tensor"
)
_TORCH_LEGACY_TENSORS = _names(
    "DoubleTensor FloatTensor HalfTensor BFloat16Tensor LongTensor IntTensor ShortTensor CharTensor ByteTensor "
    "BoolTensor"
)

SAFE_GLOBALS: frozenset[str] = frozenset(
    [f"torch.{name}" for name in _TORCH_STORAGES + _TORCH_VALUES + _TORCH_LEGACY_TENSORS]
    + [f"torch.storage.{name}" for name in _TORCH_STORAGES]
    + [f"torch._utils.{name}" for name in _TORCH_REBUILDS]
    + [
        "torch._tensor._rebuild_from_type",
        "torch._tensor._rebuild_from_type_v2",
        "torch._tensor.Tensor",
        "torch.serialization._get_layout",
        "torch.torch_version.TorchVersion",
        "torch.nn.parameter.Parameter",
        "torch.nn.parameter.Buffer",
        "torch.nn.parameter.UninitializedParameter",
        "torch.nn.parameter.UninitializedBuffer",
        "torch.nn.modules.module._IncompatibleKeys",
        # TorchScript archives: typed lists and tagged values; each returns its argument
        "torch.jit._pickle.build_intlist",
        "torch.jit._pickle.build_doublelist",
        "torch.jit._pickle.build_boollist",
        "torch.jit._pickle.build_tensorlist",
        "torch.jit._pickle.build_complexlist",
        "torch.jit._pickle.restore_type_tag",
        # numpy arrays, dtypes, scalars and random generator states (numpy 1 and 2 module names)
        "numpy.ndarray",
        "numpy.dtype",
        "numpy.core.multiarray._reconstruct",
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray._reconstruct",
        "numpy._core.multiarray.scalar",
        "numpy.random._pickle.__randomstate_ctor",
        "numpy.random._pickle.__generator_ctor",
        "numpy.random._pickle.__bit_generator_ctor",
        "numpy.random._mt19937.MT19937",
        "numpy.random._pcg64.PCG64",
        "numpy.random._pcg64.PCG64DXSM",
        "numpy.random._philox.Philox",
        "numpy.random._sfc64.SFC64",
        "numpy.random.bit_generator.SeedSequence",
        "numpy.random.bit_generator.__pyx_unpickle_SeedSequence",
        "numpy.random.mtrand.RandomState",
        "numpy.random._generator.Generator",
        # how pickle itself writes bytes, objects of protocols 0/1 and ordered dicts
        "_codecs.encode",
        "copyreg._reconstructor",
        "collections.OrderedDict",
        "collections.defaultdict",
        "collections.Counter",
        "collections.deque",
        "builtins.set",
        "builtins.frozenset",
        "builtins.slice",
        "builtins.complex",
        "builtins.bytearray",
        "builtins.bytes",
        "builtins.int",
        "builtins.float",
        "builtins.str",
        "builtins.bool",
        "builtins.tuple",
        "builtins.list",
        "builtins.dict",
        "builtins.range",
        "builtins.object",
        "builtins.type",
        "builtins.NoneType",
        "builtins.Ellipsis",
        "builtins.NotImplemented",
        "operator.getitem",
        "_operator.getitem",
        "typing.Any",
        "typing.Union",
        "typing.Optional",
        "typing.List",
        "typing.Dict",
        "typing.Tuple",
        "typing.Set",
        "typing.FrozenSet",
        "typing.Sequence",
        "typing.Mapping",
        "typing.Callable",
        "typing.Literal",
        # values
        "datetime.datetime",
        "datetime.date",
        "datetime.time",
        "datetime.timedelta",
        "datetime.timezone",
        "decimal.Decimal",
        "fractions.Fraction",
        "uuid.UUID",
        # classes real checkpoints carry, which only hold values
        "argparse.Namespace",
        "types.SimpleNamespace",
        "pathlib.Path",
        "pathlib.PosixPath",
        "pathlib.WindowsPath",
        "pathlib.PurePath",
        "pathlib.PurePosixPath",
        "pathlib.PureWindowsPath",
        "pathlib._local.Path",
        "pathlib._local.PosixPath",
        "pathlib._local.WindowsPath",
        "pathlib._local.PurePath",
        "pathlib._local.PurePosixPath",
        "pathlib._local.PureWindowsPath",
        "platform.uname_result",
        "omegaconf.dictconfig.DictConfig",
        "omegaconf.listconfig.ListConfig",
        "omegaconf.base.ContainerMetadata",
        "omegaconf.base.Metadata",
        "omegaconf.base.UnionNode",
        "lightning.fabric.utilities.data.AttributeDict",
        "lightning_fabric.utilities.data.AttributeDict",
        "lightning.pytorch.utilities.parsing.AttributeDict",
        "pytorch_lightning.utilities.parsing.AttributeDict",
    ]
)

# Packages of classes: <package>.<module>.<Class> (or <package>.<Class>) for a class name that starts upper-case.
_SAFE_CLASS_PACKAGES: dict[str, int] = {"torch.nn.modules": 2, "omegaconf.nodes": 1}

# fmt: off
# Modules every name of which (and of their submodules) runs code, touches files or the network, unless it is on
# the allow-list above (builtins.set, platform.uname_result, uuid.UUID...).
CODE_EXECUTION_MODULES: frozenset[str] = frozenset(
    {
        # processes and the interpreter
        "os", "posix", "nt", "subprocess", "_posixsubprocess", "_winapi", "sys", "pty", "commands", "popen2",
        "multiprocessing", "_multiprocessing", "signal", "_signal", "threading", "_thread", "atexit", "resource",
        "builtins", "__builtin__", "__builtins__", "_sitebuiltins", "site", "gc", "inspect", "ctypes", "_ctypes",
        # running or importing code
        "code", "codeop", "runpy", "importlib", "_imp", "_frozen_importlib", "_frozen_importlib_external",
        "zipimport", "pkgutil", "imp", "marshal", "types", "operator", "_operator", "functools", "_functools",
        "typing", "copyreg", "pdb", "bdb", "cProfile", "profile", "_lsprof", "timeit", "trace", "doctest", "pydoc",
        "unittest", "test", "idlelib", "lib2to3", "compileall", "py_compile", "_pyrepl", "_osx_support",
        "_aix_support", "uuid", "platform", "ensurepip", "venv", "pip", "setuptools", "distutils", "pexpect",
        # nested pickles and other deserialisers
        "pickle", "_pickle", "cPickle", "pickletools", "dill", "cloudpickle", "joblib", "shelve", "dbm",
        "yaml", "jsonpickle", "pandas.io.pickle",
        # files
        "io", "_io", "shutil", "tempfile", "fileinput", "glob", "filecmp", "linecache", "mmap", "zipfile",
        "tarfile", "gzip", "bz2", "lzma", "sqlite3", "_sqlite3", "logging", "syslog", "mailbox", "webbrowser",
        # network
        "socket", "_socket", "ssl", "_ssl", "select", "selectors", "socketserver", "asyncio", "http", "httplib",
        "urllib", "urllib2", "urllib3", "requests", "httpx", "aiohttp", "ftplib", "smtplib", "imaplib", "poplib",
        "telnetlib", "nntplib", "xmlrpc",
        # torch and numpy entry points that load, compile or run code, or write files
        "torch.hub", "torch.fx", "torch._dynamo", "torch._inductor", "torch._export", "torch.export", "torch.jit",
        "torch._C", "torch.ops", "torch._ops", "torch.package", "torch.compiler", "torch.distributed",
        "torch.multiprocessing", "torch.utils.collect_env", "torch.utils.cpp_extension", "torch.utils._config_module",
        "torch.utils.bottleneck", "torch.utils.benchmark", "torch.utils.data.datapipes", "torch.testing",
        "torch.cuda.memory", "torch.profiler", "torch.autograd.profiler", "torch.onnx", "torch._higher_order_ops",
        "numpy.f2py", "numpy.distutils", "numpy.testing", "numpy.ctypeslib", "numpy.lib.npyio", "numpy.lib._npyio_impl",
        "numpy.lib.format", "numpy.lib._format_impl", "numpy.core.memmap", "numpy._core.memmap",
        "numpy.lib.utils", "numpy.lib._utils_impl",
    }
)
# fmt: on

# Single globals that run code or write files, in modules whose other names may be harmless.
CODE_EXECUTION_GLOBALS: frozenset[str] = frozenset(
    {
        "torch.load",
        "torch.save",
        "torch.compile",
        "torch.serialization.load",
        "torch.serialization._load",
        "torch.serialization.save",
        "torch.serialization._legacy_load",
        "torch.storage._load_from_bytes",
        "torch.from_file",
        "torch.cuda._memory_viz",
        "numpy.load",
        "numpy.save",
        "numpy.savez",
        "numpy.savez_compressed",
        "numpy.savetxt",
        "numpy.loadtxt",
        "numpy.genfromtxt",
        "numpy.fromfile",
        "numpy.fromregex",
        "numpy.memmap",
        "numpy.DataSource",
        "numpy.lib.DataSource",
        "pandas.read_pickle",
        "sklearn.externals.joblib",
    }
)

# fmt: off
# A global whose last part is one of these loads, compiles or runs what it is given, whatever module holds it.
CODE_EXECUTION_LEAVES: frozenset[str] = frozenset(
    {
        "system", "popen", "popen2", "popen3", "spawn", "spawnl", "spawnv", "spawnve", "execl", "execv", "execve",
        "execvp", "exec", "eval", "execfile", "compile_file", "runcode", "runsource", "runctx", "run_path",
        "run_module", "import_module", "load", "loads", "load_library", "load_config", "_load_from_bytes",
        "_exec_with_source", "getattr", "setattr", "delattr", "attrgetter", "methodcaller", "partial",
        "check_output", "check_call", "getoutput", "getstatusoutput", "Popen", "unsafe_load", "full_load",
    }
)
# fmt: on


def split_global(name: str) -> tuple[str, tuple[str, ...]]:
    """The module a recorded global imports and the attribute path Python walks from it.

    The reader records ``module.name`` when the name has no dot, and ``module:dotted.name`` when it does.
    """
    if ":" in name:
        module, _, path = name.partition(":")
        return module, tuple(path.split("."))
    module, _, attribute = name.rpartition(".")
    return module, (attribute,)


def _is_dunder(part: str) -> bool:
    return len(part) > 4 and part.startswith("__") and part.endswith("__")


def _safe(full: str) -> bool:
    if full in SAFE_GLOBALS:
        return True
    parts = full.split(".")
    if parts[0] == "__torch__":
        return len(parts) > 1 and all(p and not _is_dunder(p) for p in parts[1:])
    for package, depth in _SAFE_CLASS_PACKAGES.items():
        rest = full.removeprefix(package + ".").split(".") if full.startswith(package + ".") else []
        if len(rest) == depth and rest[-1][:1].isupper() and all(p.isidentifier() for p in rest):
            return True
    return False


def _code_execution_path(parts: Sequence[str]) -> bool:
    """Whether the dotted path, read from its start, is or goes through a code-execution module or global."""
    return any(
        ".".join(parts[:end]) in CODE_EXECUTION_MODULES or ".".join(parts[:end]) in CODE_EXECUTION_GLOBALS
        for end in range(1, len(parts) + 1)
    )


def grade_global(name: str) -> Risk:
    """How dangerous the global ``name`` (as the reader records it: ``module.name`` or ``module:dotted.name``) is
    to resolve and call."""
    module, path = split_global(name)
    module_parts = module.split(".")
    full_parts = [*module_parts, *path]
    full = ".".join(full_parts)
    if len(path) == 1 and _safe(full):
        return Risk.SAFE
    if any(_is_dunder(p) for p in path):
        return Risk.CODE_EXECUTION
    if _code_execution_path(full_parts):
        return Risk.CODE_EXECUTION
    # the attribute path: an attribute named like a module is that module (gzip.os is os, argparse._os is os)
    if any(_code_execution_path((path[start].lstrip("_"), *path[start + 1 :])) for start in range(len(path))):
        return Risk.CODE_EXECUTION
    # methods of an allowed class, called with an attacker-chosen self (pathlib.Path.write_text)
    if any(_safe(".".join(full_parts[:end])) for end in range(len(module_parts) + 1, len(full_parts))):
        return Risk.CODE_EXECUTION
    if full_parts[-1] in CODE_EXECUTION_LEAVES:
        return Risk.CODE_EXECUTION
    return Risk.UNKNOWN
