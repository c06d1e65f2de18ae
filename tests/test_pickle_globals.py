"""The allow-list: every name a pickle can give is graded safe, unknown or code execution, from its name alone."""

from __future__ import annotations

import sys

import pytest

from bncheck.pickle_globals import SAFE_GLOBALS, Risk, grade_global, split_global

CODE_EXECUTION = [
    "posix.system",
    "os.system",
    "nt.system",
    "os.path.join",
    "subprocess.Popen",
    "builtins.eval",
    "builtins.exec",
    "builtins.getattr",
    "builtins.__import__",
    "builtins.open",
    "runpy.run_path",
    "importlib.import_module",
    "operator.attrgetter",
    "operator.methodcaller",
    "operator.add",  # operator also has call, attrgetter and methodcaller: only getitem is allowed
    "functools.partial",
    "pickle.loads",
    "_pickle.loads",
    "shutil.rmtree",
    "socket.create_connection",
    "webbrowser.open",
    "torch.hub.load",
    # run code or write files when torch unpickles them (issue 11)
    "torch.storage._load_from_bytes",
    "torch.utils.collect_env.run",
    "torch.fx.graph_module._exec_with_source",
    "torch.fx.graph_module.reduce_graph_module",
    "torch._inductor.codecache:PyCodeCache.load",
    "torch._inductor.codecache.compile_file",
    "torch.serialization.load",
    "torch.load",
    "torch.save",
    "numpy.load",
    "numpy.lib.npyio.load",
    "numpy.memmap",
    "numpy.testing._private.utils.runstring",
    "imaplib.IMAP4_stream",
    "uuid._get_command_stdout",
    "_osx_support._read_output",
    "_aix_support._read_cmd_output",
    "lib2to3.pgen2.grammar:Grammar.loads",
    "lib2to3.pgen2.pgen:ParserGenerator.make_label",
    "idlelib.run:Executive.runcode",
    "idlelib.pyshell:ModifiedInterpreter.runcommand",
    "logging.FileHandler",
    "logging.config.listen",
    "zipfile.ZipFile",
    "tarfile.open",
    "gzip.open",
    "platform.popen",
    "types.CodeType",
    "typing.get_type_hints",  # evaluates string annotations an object carries
    "copyreg.add_extension",
    # dotted attribute paths: protocol 4 walks them from the imported module
    "gzip:os.system",
    "logging:os.system",
    "argparse:_os.system",
    "numpy:lib.npyio.pickle.loads",
    "torch:fx.graph_module._exec_with_source",
    "__main__:__builtins__.eval",
    "collections:OrderedDict.__init__.__globals__",
    "pathlib:Path.write_text",
    "torch:Tensor.tofile",
    # names of deserialisers and runners in modules bncheck knows nothing about
    "joblib.load",
    "yaml.load",
    "dill.loads",
    "somewhere.else:Runner.system",
]

UNKNOWN = [
    "__main__.MLP",
    "my_project.models.ResNet",
    "my_project.models:ResNet.Config",
    "transformers.training_args.TrainingArguments",
    "torch.optim.adam.Adam",
    "torch.nn.modules.conv.conv2d",  # not a class name
    "cosmos.Galaxy",  # 'os' inside another name is not os
    "pathlib.Path.write_text",  # module 'pathlib.Path' cannot be imported: nothing is resolved
]

SAFE = [
    "argparse.Namespace",
    "types.SimpleNamespace",
    "pathlib.PosixPath",
    "pathlib.WindowsPath",
    "platform.uname_result",
    "omegaconf.dictconfig.DictConfig",
    "omegaconf.listconfig.ListConfig",
    "omegaconf.base.ContainerMetadata",
    "omegaconf.base.Metadata",
    "omegaconf.nodes.AnyNode",
    "omegaconf.nodes.IntegerNode",
    "lightning.fabric.utilities.data.AttributeDict",
    "pytorch_lightning.utilities.parsing.AttributeDict",
    "torch.nn.modules.batchnorm.BatchNorm1d",
    "torch.nn.modules.container.Sequential",
    "torch.nn.parameter.Parameter",
    "torch._utils._rebuild_qtensor",
    "torch.FloatStorage",
    "torch.float32",
    "torch.serialization._get_layout",
    "torch.torch_version.TorchVersion",
    "__torch__.torch.nn.modules.conv.___torch_mangle_0.Conv1d",
    "__torch__.my_project.io.Net",  # resolved by TorchScript, never imported as Python
    "collections.OrderedDict",
    "collections.defaultdict",
    "builtins.set",
    "builtins.type",
    "operator.getitem",
    "_operator.getitem",
    "typing.Union",
    "typing.Any",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.random._pickle.__randomstate_ctor",
    "uuid.UUID",
    "datetime.datetime",
]


@pytest.mark.parametrize("name", CODE_EXECUTION)
def test_code_execution(name: str) -> None:
    assert grade_global(name) is Risk.CODE_EXECUTION


@pytest.mark.parametrize("name", UNKNOWN)
def test_unknown(name: str) -> None:
    assert grade_global(name) is Risk.UNKNOWN


@pytest.mark.parametrize("name", SAFE)
def test_safe(name: str) -> None:
    assert grade_global(name) is Risk.SAFE


def test_dotted_names_split_where_the_import_ends() -> None:
    assert split_global("gzip:os.system") == ("gzip", ("os", "system"))
    assert split_global("posix.system") == ("posix", ("system",))


def test_grading_imports_nothing() -> None:
    before = set(sys.modules)
    for name in CODE_EXECUTION + UNKNOWN + SAFE:
        grade_global(name)
    assert set(sys.modules) == before


def test_every_stand_in_of_the_reader_is_on_the_allow_list() -> None:
    from bncheck.loaders.restricted_pickle import RestrictedUnpickler

    stand_ins = RestrictedUnpickler(b".", lambda *_: None)._safe  # type: ignore[arg-type, return-value]
    assert {name for name in stand_ins if grade_global(name) is not Risk.SAFE} == set()
    assert set(stand_ins) <= SAFE_GLOBALS
