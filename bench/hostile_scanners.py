"""bncheck beside the pickle scanners people already run, on one hostile corpus and one healthy set, side by side.

    python bench/hostile_scanners.py [--timeout 120] [--jobs 2] [--keep DIR] [--tools bncheck,picklescan,...]

Builds into a temporary folder the payloads the tests build (tests/test_hostile*.py, tests/test_archive_views.py,
fuzz/mutations.py: the builders are imported from there, so the corpus follows the tests), each in its own folder.
Every payload only creates the file ``marker`` in its own folder if something ever runs it. Beside them, a healthy
set: state dicts in every container, Lightning-style checkpoints whose hyper-parameters hold harmless classes,
safetensors, a fully pickled model of torch classes only, and the shipped fixtures/good/*.

Then runs each scanner on each file the way its documentation tells users to, each as a separate process with a
timeout, in a scratch working directory:

  bncheck         bncheck inspect --json PATH
  picklescan      picklescan --path PATH                      (exit 0 clean, 1 dangerous global, 2 scan failed)
  modelscan       modelscan -p PATH                           (0 clean, 1 issues, 2 errors, 3 no supported file)
  fickling        fickling --check-safety --json-output X PATH  (0 clean, 1 unsafe, 2 parse error)
  fickling-api    what fickling's own --huggingface mode does per file: polyglot.find_file_properties, then
                  scan_zip_archive for a zip and scan_file for a pickle (the fickling CLI reads only bare pickles)

All five run from this interpreter's environment (``pip install modelscan fickling`` beside the test extras). A
shard index's folder is given to each tool as the folder (fickling, which takes one pickle, gets each file in it).

Each verdict is one of:
  flagged   the tool's failing verdict (bncheck: BN101; the others: their "unsafe" exit code)
  warned    not failing, but a warning about a global (bncheck: BN102 only)
  refused   the tool could not scan it (error, parse failure, timeout, "no supported file")
  clean     a clean verdict: on a hostile file this is a miss, and any flag or warning on a healthy file is a
            false positive

Only bncheck's pickle findings (BN101, BN102) and its errors count; its statistics rules (BN001...) are ignored.
After each run the case's marker is checked (so a tool that ran a payload is named), and after all runs every
folder of the corpus is searched for a marker. Prints the table, then every miss and every false positive.
``--prove-live`` then runs ``torch.load(weights_only=False)`` on each hostile file, in a child process, after that
check, and lists every file where torch disagrees with the corpus's label: each case says whether torch.load runs
its payload (a few hold a pickle that only torch.jit.load, tarfile or zipfile-based readers reach; the listing
marks those).
This is a benchmark, not a test: it never decides pass or fail.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import types
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "fuzz")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from mutations import save_tar  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from test_archive_views import (  # noqa: E402
    crc_broken,
    evil,
    local_name_changed,
    members,
    with_evil_pickle,
    zip_of,
)
from test_hostile import obj_pickle  # noqa: E402
from test_hostile_corpus import (  # noqa: E402
    PAYLOADS,
    PLACES,
    Reduce,
    healthy_model_state,
    inst_pickle,
    place,
    python_code,
    shell,
    write_runpy_target,
)
from test_hostile_globals import (  # noqa: E402
    HARMLESS,
    LEGACY_PAYLOAD,
    LIVE,
    AttributeDict,
    legacy_pickle_spans,
    trained,
    with_dotted_global,
)
from torch import nn  # noqa: E402

BIN = Path(sys.executable).parent
VERDICTS = ("flagged", "warned", "refused", "clean")


@dataclass
class Case:
    name: str
    path: Path
    hostile: bool
    marker: Path | None = None
    torch_runs: bool = True  # torch.load(weights_only=False) runs the payload (False: only other readers see it)
    folder: Path | None = None


@dataclass
class Run:
    verdict: str
    detail: str
    executed: bool = False


@dataclass
class Corpus:
    root: Path
    cases: list[Case] = field(default_factory=list)

    def folder(self, name: str) -> Path:
        slug = "".join(c if c.isalnum() or c in "-." else "_" for c in name)
        path = self.root / f"{len(self.cases):03d}-{slug}"
        path.mkdir(parents=True)
        return path

    def hostile(self, name: str, build: Callable[[Path, Path], Path], *, torch_runs: bool = True) -> None:
        folder = self.folder(name)
        marker = folder / "marker"
        write_runpy_target(marker)  # runpy payloads run this file; it too only creates the marker
        path = build(marker, folder)
        assert not marker.exists(), f"building {name} ran its payload"
        self.cases.append(Case(name, path, True, marker, torch_runs, folder))

    def healthy(self, name: str, build: Callable[[Path], Path]) -> None:
        folder = self.folder(name)
        self.cases.append(Case(name, build(folder), False, folder=folder))


# --- the hostile corpus -------------------------------------------------------------------------------------------


def rewrite_zip(source: Path, target: Path, edit: Callable[[str, bytes], bytes]) -> Path:
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, edit(info.filename, src.read(info)))
    return target


def zip_with_data_pkl(make: Callable[[Path], bytes]) -> Callable[[Path, Path], Path]:
    def build(marker: Path, folder: Path) -> Path:
        torch.save(healthy_model_state(), folder / "clean.pt")
        return rewrite_zip(
            folder / "clean.pt", folder / "model.pt", lambda n, d: make(marker) if n.endswith("data.pkl") else d
        )

    return build


def in_state_dict(make: Callable[[Path], object]) -> Callable[[Path, Path], Path]:
    def build(marker: Path, folder: Path) -> Path:
        torch.save({"state_dict": healthy_model_state(), "extra": make(marker)}, folder / "model.pt")
        return folder / "model.pt"

    return build


def dotted(module: str, name: str) -> Callable[[Path, Path], Path]:
    def build(marker: Path, folder: Path) -> Path:
        code = python_code(marker) if name.endswith("exec") else shell(marker)
        path = folder / "model.pt"
        torch.save({"state_dict": healthy_model_state(), "extra": Reduce(os.system, code)}, path)
        with_dotted_global(path, module, name)
        return path

    return build


def chained(marker: Path) -> object:
    from numpy.random import _pickle as np_random_pickle

    return Reduce(np_random_pickle.__randomstate_ctor, shell(marker), os.system)


def legacy_pickle(which: int) -> Callable[[Path, Path], Path]:
    def build(marker: Path, folder: Path) -> Path:
        path = folder / "legacy.pt"
        torch.save(healthy_model_state(), path, _use_new_zipfile_serialization=False)
        data = path.read_bytes()
        _, end = legacy_pickle_spans(data)[which]
        path.write_bytes(data[: end - 1] + LEGACY_PAYLOAD.format(marker=marker).encode() + data[end - 1 :])
        return path

    return build


def plain_pickle(marker: Path, folder: Path) -> Path:
    path = folder / "model.pt"
    path.write_bytes(b"\x80\x02" + LEGACY_PAYLOAD.format(marker=marker).encode()[:-1] + b".")
    return path


def sharded(folder: Path, marker: Path | None) -> Path:
    """A two-shard .bin checkpoint with its index; the second shard holds a payload when given a marker."""
    state = healthy_model_state()
    names = sorted(state)
    model = folder / "model"
    model.mkdir()
    first, second = "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"
    torch.save({k: state[k] for k in names[:3]}, model / first)
    extra = {"extra": Reduce(os.system, shell(marker))} if marker else {}
    torch.save({**{k: state[k] for k in names[3:]}, **extra}, model / second)
    weight_map = {k: first if k in names[:3] else second for k in names}
    (model / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return model


def archive(make: Callable[[Path], bytes]) -> Callable[[Path, Path], Path]:
    def build(marker: Path, folder: Path) -> Path:
        path = folder / "model.pt"
        path.write_bytes(make(marker))
        return path

    return build


def case_duplicate(marker: Path) -> bytes:
    entries = members()
    return zip_of([("archive/DATA.PKL", evil(marker)), *entries[1:], entries[0]])


def tar(where: str) -> Callable[[Path, Path], Path]:
    class Payload:
        def __init__(self, marker: Path) -> None:
            self.marker = marker

        def __reduce__(self) -> tuple[object, tuple[str]]:
            return os.system, (shell(self.marker),)

    def build(marker: Path, folder: Path) -> Path:
        path = folder / "model.pt"
        state = dict(healthy_model_state())
        if where == "pickle":
            save_tar({"state": state, "extra": Payload(marker)}, path)
        elif where == "sys_info":
            save_tar(state, path, sys_info=evil(marker))
        elif where == "duplicate":
            save_tar(state, path, extra=[("pickle", evil(marker))], extra_first=True)
        else:  # a tar whose first member's name is the legacy magic number's pickle
            magic = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)
            save_tar({"extra": Payload(marker)}, path, first_name=magic.decode("latin-1"))
        return path

    return build


def build_hostile(corpus: Corpus) -> None:
    for kind in sorted(PAYLOADS):
        for where in PLACES:
            corpus.hostile(
                f"{kind} in {where}",
                lambda m, f, kind=kind, where=where: place(where, PAYLOADS[kind](m), f)[0],
                # torch.load reads a TorchScript archive's data.pkl only; torch.jit.load reads constants.pkl
                torch_runs=where != "torchscript constants",
            )
    corpus.hostile("INST opcode os.system as data.pkl", zip_with_data_pkl(inst_pickle))
    corpus.hostile("OBJ opcode subprocess.call as data.pkl", zip_with_data_pkl(obj_pickle))
    for kind in sorted(LIVE):
        corpus.hostile(f"{kind} (missed by the old deny-list)", in_state_dict(LIVE[kind]))
    for module, name in [("gzip", "os.system"), ("logging", "os.system"), ("__main__", "__builtins__.exec")]:
        corpus.hostile(f"protocol 4 {module}:{name}", dotted(module, name))
    corpus.hostile("os.system through numpy's __randomstate_ctor", in_state_dict(chained))
    for which, label in enumerate(["magic", "protocol", "sys-info", "objects", "keys"]):
        corpus.hostile(f"legacy file, payload in its {label} pickle", legacy_pickle(which))
    corpus.hostile("plain pickle torch.load runs before refusing it", plain_pickle)
    corpus.hostile("one shard of a sharded .bin (the folder)", lambda m, f: sharded(f, m))
    corpus.hostile("DATA.PKL beside data.pkl (case duplicate)", archive(case_duplicate))
    corpus.hostile("archive/DATA.PKL alone", archive(lambda m: zip_of(with_evil_pickle(m, "archive/DATA.PKL"))))
    corpus.hostile("data.pkl with a bad CRC-32", archive(lambda m: crc_broken(zip_of(with_evil_pickle(m)))))
    corpus.hostile(
        "local header names another member", archive(lambda m: local_name_changed(zip_of(with_evil_pickle(m))))
    )
    corpus.hostile(
        "archive appended with relative offsets",
        archive(lambda m: zip_of(members()) + zip_of(with_evil_pickle(m))),
        torch_runs=False,  # torch cannot read it; Python's zipfile reads the hostile second archive
    )
    corpus.hostile(
        "second archive after a first (absolute offsets)",
        archive(lambda m: zip_of(with_evil_pickle(m), prefix=zip_of(members()))),
    )
    corpus.hostile(
        "hostile archive hidden before the one torch reads",
        archive(lambda m: zip_of(members(), prefix=zip_of(with_evil_pickle(m)))),
        torch_runs=False,
    )
    corpus.hostile(
        "member outside the archive folder",
        archive(lambda m: zip_of([*members(), ("other/data.pkl", evil(m))])),
        torch_runs=False,  # torch refuses the file
    )
    corpus.hostile("tar checkpoint, payload in its pickle", tar("pickle"))
    corpus.hostile("tar checkpoint, payload in sys_info", tar("sys_info"), torch_runs=False)
    corpus.hostile("tar checkpoint, an earlier copy of pickle", tar("duplicate"), torch_runs=False)
    corpus.hostile("tar starting with the legacy magic number", tar("polyglot"))
    shipped = ROOT / "fixtures" / "bad" / "BN101-os-system-payload.pt"
    corpus.hostile("fixtures/bad/BN101-os-system-payload.pt", lambda m, f: copy_into(shipped, f))
    corpus.cases[-1].marker = None  # its payload only echoes a line: no marker to look for


# --- the healthy set ----------------------------------------------------------------------------------------------


def lightning_attribute_dict() -> object:
    """Lightning's AttributeDict holding an omegaconf DictConfig, pickled under Lightning's own module name."""
    import omegaconf

    for package in ("lightning_fabric", "lightning_fabric.utilities", "lightning_fabric.utilities.data"):
        sys.modules.setdefault(package, types.ModuleType(package))
    AttributeDict.__module__ = "lightning_fabric.utilities.data"
    sys.modules["lightning_fabric.utilities.data"].AttributeDict = AttributeDict  # type: ignore[attr-defined]
    config = omegaconf.OmegaConf.create({"lr": 0.1, "layers": [1, 2], "optim": {"name": "adam", "eps": None}})
    return AttributeDict(config=config, lr=0.1)


def saved(obj: Callable[[], object], name: str = "model.pt", **options: object) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        torch.save(obj(), folder / name, **options)
        return folder / name

    return build


def lightning(hyper: Callable[[], object]) -> Callable[[], object]:
    def make() -> object:
        state = {f"model.{k}": v for k, v in healthy_model_state().items()}
        return {"state_dict": state, "epoch": 3, "global_step": 30, "hyper_parameters": hyper()}

    return make


def torchscript(folder: Path) -> Path:
    torch.jit.script(trained(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))).save(str(folder / "scripted.pt"))
    return folder / "scripted.pt"


def build_healthy(corpus: Corpus) -> None:
    corpus.healthy("state dict (zip)", saved(healthy_model_state))
    corpus.healthy("training checkpoint (zip)", saved(lambda: {"model": healthy_model_state(), "epoch": 1}))
    corpus.healthy("state dict (legacy)", saved(healthy_model_state, _use_new_zipfile_serialization=False))
    corpus.healthy("state dict (tar)", lambda f: (save_tar(dict(healthy_model_state()), f / "m.pt"), f / "m.pt")[1])
    corpus.healthy("TorchScript model", torchscript)
    corpus.healthy(
        "fully pickled nn.Sequential", saved(lambda: trained(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))))
    )
    corpus.healthy(
        "safetensors", lambda f: (save_file(healthy_model_state(), str(f / "m.safetensors")), f / "m.safetensors")[1]
    )
    corpus.healthy("sharded .bin (the folder)", lambda f: sharded(f, None))
    for kind in sorted(HARMLESS):
        corpus.healthy(f"Lightning hyper-parameters: {kind}", saved(lightning(HARMLESS[kind]), "last.ckpt"))
    corpus.healthy("Lightning AttributeDict + omegaconf", saved(lightning(lightning_attribute_dict), "last.ckpt"))
    corpus.healthy(
        "numpy RNG state beside a state dict",
        saved(lambda: {"model": healthy_model_state(), "rng": np.random.get_state()}),
    )
    good = ROOT / "fixtures" / "good"
    for path in sorted(good.iterdir()):
        corpus.healthy(f"fixtures/good/{path.name}", lambda f, path=path: copy_into(path, f))


def copy_into(path: Path, folder: Path) -> Path:
    target = folder / path.name
    if path.is_dir():
        shutil.copytree(path, target)
    else:
        shutil.copy(path, target)
    return target


# --- the scanners -------------------------------------------------------------------------------------------------

FICKLING_API = """
import sys
from fickling.loader import scan_file, scan_zip_archive
from fickling.polyglot import find_file_properties
path, report = sys.argv[1], sys.argv[2]
props = find_file_properties(path)
if props["is_torch_zip"] or props["is_standard_zip"]:
    results = list(scan_zip_archive(path, graceful=True, json_output_path=report).values())
elif props["is_valid_pickle"]:
    results = [scan_file(path, graceful=True, json_output_path=report)]
else:
    print("not a zip or a pickle: fickling skips it"); sys.exit(2)
if not results:
    print("no pickle member"); sys.exit(2)
print("; ".join(repr(r) for r in results))
unsafe = [r for r in results if not r.is_safe]
sys.exit(1 if unsafe else 2 if any(r.errors for r in results) else 0)
"""


def tail(text: str, limit: int = 160) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "")[:limit]


def bncheck(path: Path, scratch: Path, timeout: float) -> Run:
    proc = run([str(BIN / "bncheck"), "inspect", "--json", str(path)], scratch, timeout)
    if isinstance(proc, Run):
        return proc
    try:
        files = json.loads(proc.stdout)["files"]
    except (ValueError, KeyError):
        return Run("refused", f"exit {proc.returncode}, no JSON: {tail(proc.stderr)}")
    codes = [f["code"] for file in files for f in file["findings"] if f["code"] in ("BN101", "BN102")]
    messages = [f["message"] for file in files for f in file["findings"] if f["code"] in ("BN101", "BN102")]
    errors = [f"{file['error']['code']}: {file['error']['message']}" for file in files if file["error"]]
    if "BN101" in codes:
        return Run("flagged", "BN101 " + " | ".join(messages)[:200])
    if errors:
        return Run("refused", " | ".join(errors)[:200])
    if codes:
        return Run("warned", "BN102 " + " | ".join(messages)[:200])
    return Run("clean", f"exit {proc.returncode}")


def exit_code_tool(
    name: str, command: Callable[[Path, Path], list[str]], meaning: dict[int, str]
) -> Callable[[Path, Path, float], Run]:
    def scan(path: Path, scratch: Path, timeout: float) -> Run:
        proc = run(command(path, scratch), scratch, timeout)
        if isinstance(proc, Run):
            return proc
        verdict = meaning.get(proc.returncode, "refused")
        output = proc.stdout + proc.stderr
        lines = [line for line in output.splitlines() if any(k in line for k in ("FOUND", "Description", "unsafe"))]
        detail = "; ".join(line.strip() for line in lines[:3]) or tail(output)
        return Run(verdict, f"exit {proc.returncode}: {detail}"[:220])

    return scan


def fickling_cli(path: Path, scratch: Path, timeout: float) -> Run:
    if path.is_dir():  # the CLI takes one pickle: the user runs it on every file of the folder
        runs = [fickling_file(p, scratch, timeout) for p in sorted(path.iterdir()) if p.suffix != ".json"]
        for verdict in VERDICTS:
            hits = [r for r in runs if r.verdict == verdict]
            if hits:
                return Run(verdict, hits[0].detail)
    return fickling_file(path, scratch, timeout)


fickling_file = exit_code_tool(
    "fickling",
    lambda p, s: [str(BIN / "fickling"), "--check-safety", "--json-output", str(s / "fickling.json"), str(p)],
    {0: "clean", 1: "flagged"},
)
fickling_api_file = exit_code_tool(
    "fickling-api",
    lambda p, s: [sys.executable, "-c", FICKLING_API, str(p), str(s / "fickling.json")],
    {0: "clean", 1: "flagged"},
)


def fickling_api(path: Path, scratch: Path, timeout: float) -> Run:
    if path.is_dir():
        runs = [fickling_api_file(p, scratch, timeout) for p in sorted(path.iterdir()) if p.suffix != ".json"]
        for verdict in VERDICTS:
            hits = [r for r in runs if r.verdict == verdict]
            if hits:
                return Run(verdict, hits[0].detail)
    return fickling_api_file(path, scratch, timeout)


TOOLS: dict[str, Callable[[Path, Path, float], Run]] = {
    "bncheck": bncheck,
    "picklescan": exit_code_tool(
        "picklescan", lambda p, s: [str(BIN / "picklescan"), "--path", str(p)], {0: "clean", 1: "flagged"}
    ),
    "modelscan": exit_code_tool(
        "modelscan", lambda p, s: [str(BIN / "modelscan"), "-p", str(p)], {0: "clean", 1: "flagged"}
    ),
    "fickling": fickling_cli,
    "fickling-api": fickling_api,
}


def run(command: list[str], scratch: Path, timeout: float) -> subprocess.CompletedProcess[str] | Run:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        return subprocess.run(
            command, cwd=scratch, capture_output=True, text=True, timeout=timeout, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        return Run("refused", f"timed out after {timeout:.0f} s")


def scan_case(case: Case, tools: list[str], scratch_root: Path, timeout: float) -> dict[str, Run]:
    """Every tool on one case, one after the other, so that a marker names the tool that ran the payload."""
    results = {}
    for tool in tools:
        scratch = Path(tempfile.mkdtemp(dir=scratch_root))
        result = TOOLS[tool](case.path, scratch, timeout)
        if case.marker is not None and case.marker.exists():
            result.executed = True
            case.marker.unlink()
        results[tool] = result
    return results


# --- the report ---------------------------------------------------------------------------------------------------


def prove_live(cases: list[Case], timeout: float) -> list[str]:
    """torch.load(weights_only=False) on every hostile file, in a child process: which payloads torch runs."""
    lines = []
    script = "import sys, torch\ntry:\n    torch.load(sys.argv[1], weights_only=False)\nexcept Exception:\n    pass\n"
    for case in cases:
        if not case.hostile or case.marker is None or case.path.is_dir():
            continue
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run([sys.executable, "-c", script, str(case.path)], capture_output=True, timeout=timeout)
        ran = case.marker.exists()
        case.marker.unlink(missing_ok=True)
        if ran != case.torch_runs:
            lines.append(f"  {case.name}: torch {'ran' if ran else 'did not run'} it, expected the opposite")
    return lines


def report(cases: list[Case], results: dict[str, dict[str, Run]], tools: list[str]) -> str:
    hostile = [c for c in cases if c.hostile]
    healthy = [c for c in cases if not c.hostile]
    out = [
        f"{len(hostile)} hostile files ({sum(c.torch_runs for c in hostile)} whose payload torch.load runs), "
        f"{len(healthy)} healthy files",
        "",
        f"{'tool':<14}| {'hostile: flagged':>16} {'warned':>7} {'refused':>8} {'missed':>7} "
        f"| {'healthy: clean':>14} {'refused':>8} {'false +':>8} {'warned':>7} | ran a payload",
    ]
    for tool in tools:

        def count(group: list[Case], verdict: str, tool: str = tool) -> int:
            return sum(results[c.name][tool].verdict == verdict for c in group)

        executed = sum(results[c.name][tool].executed for c in cases)
        out.append(
            f"{tool:<14}| {count(hostile, 'flagged'):>16} {count(hostile, 'warned'):>7} "
            f"{count(hostile, 'refused'):>8} {count(hostile, 'clean'):>7} "
            f"| {count(healthy, 'clean'):>14} {count(healthy, 'refused'):>8} {count(healthy, 'flagged'):>8} "
            f"{count(healthy, 'warned'):>7} | {executed}"
        )
    for tool in tools:
        misses = [c for c in hostile if results[c.name][tool].verdict in ("clean", "warned")]
        false = [c for c in healthy if results[c.name][tool].verdict in ("flagged", "warned")]
        refused = [c for c in cases if results[c.name][tool].verdict == "refused"]
        out += ["", f"== {tool}: {len(misses)} missed (or only warned), {len(false)} false positives"]
        for c in misses:
            note = "" if c.torch_runs else " [torch.load never runs this pickle]"
            out.append(f"  MISS  {c.name}{note}: {results[c.name][tool].verdict}, {results[c.name][tool].detail}")
        for c in false:
            out.append(f"  FALSE+  {c.name}: {results[c.name][tool].verdict}, {results[c.name][tool].detail}")
        for c in refused:
            kind = "hostile" if c.hostile else "healthy"
            out.append(f"  refused ({kind})  {c.name}: {results[c.name][tool].detail}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per tool per file")
    parser.add_argument("--jobs", type=int, default=2, help="cases scanned at once (tools on one case run in turn)")
    parser.add_argument("--tools", default=",".join(TOOLS), help="comma-separated subset of " + ", ".join(TOOLS))
    parser.add_argument("--keep", type=Path, help="build the corpus here and keep it (default: a temporary folder)")
    parser.add_argument("--prove-live", action="store_true", help="then torch.load each hostile file (see above)")
    args = parser.parse_args()
    tools = args.tools.split(",")
    unknown = set(tools) - set(TOOLS)
    if unknown:
        parser.error(f"unknown tools: {', '.join(sorted(unknown))}")
    for tool in tools:
        executable = BIN / tool.removesuffix("-api")
        if not executable.exists():
            parser.error(
                f"{executable} not found: pip install {tool.removesuffix('-api')} here, or leave it out of --tools"
            )

    with tempfile.TemporaryDirectory(prefix="bncheck-hostile-") as temp:
        base = args.keep or Path(temp)
        corpus = Corpus(base / "corpus")
        scratch = base / "scratch"
        scratch.mkdir(parents=True)
        build_hostile(corpus)
        build_healthy(corpus)
        print(f"corpus: {len(corpus.cases)} cases in {corpus.root}", file=sys.stderr)
        with ThreadPoolExecutor(args.jobs) as pool:
            scanned = pool.map(lambda c: scan_case(c, tools, scratch, args.timeout), corpus.cases)
            results = {case.name: result for case, result in zip(corpus.cases, scanned, strict=True)}
        # after every run: no marker anywhere in the corpus (scan_case already named and removed any it saw)
        left = sorted(str(p.relative_to(corpus.root)) for p in corpus.root.rglob("marker"))
        print(report(corpus.cases, results, tools))
        ran = [(c.name, t) for c in corpus.cases for t, r in results[c.name].items() if r.executed]
        print()
        if ran or left:
            print("PAYLOADS RAN: " + "; ".join(f"{tool} on {name}" for name, tool in ran) + " ".join(left))
        else:
            print(f"marker check: no tool ran a payload (no marker in {len(corpus.cases)} case folders)")
        if args.prove_live:
            wrong = prove_live(corpus.cases, args.timeout)
            print("liveness, torch.load(weights_only=False) on each hostile file:")
            print("\n".join(wrong) or "  it ran every payload marked as run by torch, and none of the others")


if __name__ == "__main__":
    main()
