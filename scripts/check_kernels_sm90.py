"""Compile every Triton kernel of ``kernels/`` for Hopper (sm_90) on any machine and check the build.

No GPU is needed: Triton compiles to an sm_90 cubin on a CPU-only machine, and the ``cuobjdump``
shipped in the Triton wheel reads registers, stack/local memory (spills) and shared memory from
it, and the instructions from its SASS. This catches what the Triton interpreter cannot: tile
shapes the GPU compiler rejects, register spills, shared memory above the Hopper limit, and matrix
kernels that miss the Hopper tensor-core instructions (HGMMA).

What is compiled: every module of the ``kernels`` package that defines ``sm90_builds()`` returns
a list of builds, one per configuration its GPU path can choose::

    {"name": "fwd_d128_bf16", "fn": _attn_fwd_kernel,          # the @triton.jit function
     "signature": {"Q": "*bf16", "T": "i32", "scale": "fp32", "BLOCK_M": "constexpr", ...},
     "constexprs": {"BLOCK_M": 128, ...}, "num_warps": 8, "num_stages": 3, "matrix": True}

Optional keys: ``"descriptors"`` (the build moves tiles through tensor descriptors: its SASS must
hold TMA loads ``UTMALDG``), ``"warp_specialized"`` (its PTX must hold ``setmaxnreg``, the register
hand-over between the producer and consumer warp groups), ``"maxnreg"`` (a register cap passed to
the compiler) and ``"divisible_by_16"``
(argument names specialized as 16-divisible, as the launcher does; default: every pointer).

The check fails (exit 1) when any build does not compile, spills (stack or local bytes > 0), uses
more shared memory than Hopper's 227 KB per block, or is a bf16/fp16 matrix build without HGMMA;
when a ``@triton.jit`` function defined in ``kernels/`` is neither built nor called from a built
kernel; and when an autotuned kernel has a config that no build compiles.

Usage::

    python scripts/check_kernels_sm90.py                      # the kernels package
    python scripts/check_kernels_sm90.py --json build.json    # also write the table as JSON
    python scripts/check_kernels_sm90.py --no-package --module tests/sm90_fixtures/spill.py

Caching: every run compiles from scratch into a fresh temporary ``TRITON_CACHE_DIR`` that is
removed at the end, so a cached cubin can never hide a regression. ``TRITON_INTERPRET`` is removed
from the environment before Triton is imported (the interpreter replaces the compiler).
"""

from __future__ import annotations

import os
import sys

# Must happen before triton (or kernels) is imported: the interpreter would replace the compiler.
os.environ.pop("TRITON_INTERPRET", None)

import argparse  # noqa: E402
import ast  # noqa: E402
import concurrent.futures  # noqa: E402
import datetime  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import pkgutil  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from types import ModuleType  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SM = 90
SHARED_LIMIT = 227 * 1024  # Hopper's opt-in shared memory per block
ARG_TYPES = {"*bf16", "*fp16", "*fp32", "*i32", "*i64", "*i8", "*u8", "i32", "i64", "fp32"}
ARG_TYPES |= {"constexpr"}
REQUIRED_KEYS = ("name", "fn", "signature", "constexprs", "num_warps", "num_stages", "matrix")
SASS_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")
RES_USAGE = re.compile(r"Function\s+(\S+?):\s*\n\s*(REG:.*)")


@dataclass
class BuildResult:
    """One compiled configuration: what the cubin uses, and what is wrong with it."""

    module: str
    name: str
    kernel: str
    num_warps: int
    num_stages: int
    constexprs: dict
    matrix: bool
    regs: int | None = None
    stack: int | None = None
    local: int | None = None
    smem: int | None = None
    hgmma: int | None = None
    hmma: int | None = None
    ffma: int | None = None
    utmaldg: int | None = None  # TMA loads / stores / reduce-adds in the SASS
    utmastg: int | None = None
    utmaredg: int | None = None
    setmaxnreg: int | None = None  # setmaxnreg instructions in the PTX (warp specialization)
    compile_s: float | None = None
    cpu_s: float | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


# --------------------------------------------------------------------------- loading modules


def load_module(ref: str) -> ModuleType:
    """Import ``ref``: a dotted module name (``kernels.attention``) or a path to a ``.py`` file."""
    if ref.endswith(".py") or os.sep in ref:
        path = Path(ref).resolve()
        if not path.is_file():
            raise SystemExit(f"error: --module {ref}: no such file")
        name = module_label(ref)
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # @triton.jit reads the source through the module
        spec.loader.exec_module(module)
        return module
    return importlib.import_module(ref)


def module_label(ref: str) -> str:
    """A readable, importable-looking name for a module given by path (its path from the root)."""
    if not (ref.endswith(".py") or os.sep in ref):
        return ref
    path = Path(ref).resolve()
    try:
        path = path.relative_to(ROOT)
    except ValueError:
        pass
    return re.sub(r"[^\w.]", "_", str(path.with_suffix("")).replace(os.sep, "."))


def package_modules(package: str = "kernels") -> list[str]:
    """Dotted names of every module in ``package`` (recursively)."""
    pkg = importlib.import_module(package)
    names = [package]
    for info in pkgutil.walk_packages(pkg.__path__, package + "."):
        names.append(info.name)
    return names


def module_builds(module: ModuleType) -> list[dict]:
    builds = getattr(module, "sm90_builds", None)
    return list(builds()) if callable(builds) else []


# --------------------------------------------------------------------------- coverage


def unwrap_jit(obj):
    """The JITFunction inside an autotune/heuristics wrapper (or ``obj`` itself)."""
    from triton.runtime.jit import JITFunction

    seen = 0
    while not isinstance(obj, JITFunction) and hasattr(obj, "fn") and seen < 8:
        obj, seen = obj.fn, seen + 1
    return obj if isinstance(obj, JITFunction) else None


def jit_key(jit_fn) -> tuple[str, str]:
    return jit_fn.fn.__module__, jit_fn.fn.__qualname__


def called_jit_functions(jit_fn, seen: set | None = None) -> set[tuple[str, str]]:
    """Keys of ``jit_fn`` and every @triton.jit function it calls, transitively."""
    seen = set() if seen is None else seen
    key = jit_key(jit_fn)
    if key in seen:
        return seen
    seen.add(key)
    scope = (
        jit_fn.get_capture_scope() if hasattr(jit_fn, "get_capture_scope") else jit_fn.__globals__
    )
    for node in ast.walk(ast.parse(jit_fn.src)):
        target = None
        if isinstance(node, ast.Name) and node.id in scope:
            target = scope[node.id]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            base = scope.get(node.value.id)
            target = getattr(base, node.attr, None) if base is not None else None
        inner = unwrap_jit(target) if target is not None and hasattr(target, "fn") else None
        if inner is not None:
            called_jit_functions(inner, seen)
    return seen


def _is_jit_decorator(node: ast.expr) -> bool:
    node = node.func if isinstance(node, ast.Call) else node
    name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")
    return name == "jit"


def defined_jit_functions(path: Path, module_name: str) -> list[tuple[str, str]]:
    """(module, qualname) of every function in ``path`` decorated with ``@triton.jit``."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                qualname = prefix + child.name
                if any(_is_jit_decorator(d) for d in child.decorator_list):
                    found.append((module_name, qualname))
                visit(child, qualname + ".<locals>.")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            else:  # e.g. kernels defined under ``if triton is not None:``
                visit(child, prefix)

    visit(ast.parse(path.read_text(), filename=str(path)), "")
    return found


def autotune_gaps(module: ModuleType, builds: list[dict]) -> list[str]:
    """Autotune configs of the module's kernels that no build compiles."""
    from triton.runtime.autotuner import Autotuner

    gaps = []
    for attr, obj in vars(module).items():
        if not isinstance(obj, Autotuner):
            continue
        jit_fn = unwrap_jit(obj)
        if jit_fn is None or jit_fn.fn.__module__ != module.__name__:
            continue
        mine = [b for b in builds if unwrap_jit(b.get("fn")) is jit_fn]
        for cfg in obj.configs:
            covered = any(
                b.get("num_warps") == cfg.num_warps
                and b.get("num_stages") == cfg.num_stages
                and all(b.get("constexprs", {}).get(k) == v for k, v in cfg.kwargs.items())
                for b in mine
            )
            if not covered:
                gaps.append(
                    f"{module.__name__}.{attr}: autotune config {cfg.kwargs} "
                    f"num_warps={cfg.num_warps} num_stages={cfg.num_stages} has no build"
                )
    return gaps


# --------------------------------------------------------------------------- compiling


def validate_build(build: dict) -> list[str]:
    """Problems with the build description itself (before compiling)."""
    missing = [k for k in REQUIRED_KEYS if k not in build]
    if missing:
        return [f"build is missing keys {missing}"]
    jit_fn = unwrap_jit(build["fn"])
    if jit_fn is None:
        return ["'fn' is not a @triton.jit function"]
    sig, consts = build["signature"], build["constexprs"]
    problems = []
    args = list(jit_fn.arg_names)
    if list(sig) != args:
        problems.append(
            f"signature keys {list(sig)} must be the kernel's arguments {args} in order"
        )
    for arg, kind in sig.items():
        if kind not in ARG_TYPES:
            problems.append(f"argument {arg}: unknown type {kind!r} (one of {sorted(ARG_TYPES)})")
        if kind == "constexpr" and arg not in consts:
            problems.append(f"constexpr {arg} has no value in 'constexprs'")
    for name in consts:
        if sig.get(name) != "constexpr":
            problems.append(f"'constexprs' names {name}, which is not a constexpr argument")
    return problems


def parse_res_usage(text: str, kernel: str) -> dict[str, int]:
    """REG/STACK/SHARED/LOCAL of ``kernel`` from ``cuobjdump -res-usage``."""
    for name, line in RES_USAGE.findall(text):
        if name == kernel:
            return {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
    raise RuntimeError(f"cuobjdump -res-usage printed no entry for {kernel}:\n{text}")


def count_opcodes(sass: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for op in SASS_OPCODE.findall(sass):
        base = op.split(".")[0]
        counts[base] = counts.get(base, 0) + 1
    return counts


def cuobjdump(*args: str) -> str:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    out = subprocess.run([str(tool), *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"cuobjdump {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (ptxas runs as a child)."""
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def compile_build(build: dict, result: BuildResult, sass: bool) -> None:
    """Compile one build for sm_90 and fill ``result`` with what its cubin uses.

    The SASS instruction counts (``sass``) cost a disassembly of about half a second each, so by
    default only matrix builds get them.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jit_fn = unwrap_jit(build["fn"])
    sig = build["signature"]
    aligned = build.get("divisible_by_16", [a for a, t in sig.items() if t.startswith("*")])
    attrs = {(jit_fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = ASTSource(
        fn=jit_fn, signature=dict(sig), constexprs=dict(build["constexprs"]), attrs=attrs
    )
    options = {"num_warps": build["num_warps"], "num_stages": build["num_stages"]}
    if build.get("maxnreg"):
        options["maxnreg"] = build["maxnreg"]
    start, cpu_start = time.perf_counter(), cpu_seconds()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = triton.compile(src, target=GPUTarget("cuda", SM, 32), options=options)
    result.compile_s = round(time.perf_counter() - start, 2)
    result.cpu_s = round(cpu_seconds() - cpu_start, 2)

    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = parse_res_usage(cuobjdump("-res-usage", str(cubin)), compiled.metadata.name)
        ops = count_opcodes(cuobjdump("-sass", str(cubin))) if sass else None
    result.regs, result.stack, result.local = usage["REG"], usage["STACK"], usage["LOCAL"]
    result.smem = compiled.metadata.shared + usage["SHARED"]  # dynamic (Triton) + static
    if ops is not None:
        result.hgmma, result.hmma = ops.get("HGMMA", 0), ops.get("HMMA", 0)
        result.ffma = ops.get("FFMA", 0)
        result.utmaldg, result.utmastg = ops.get("UTMALDG", 0), ops.get("UTMASTG", 0)
        result.utmaredg = ops.get("UTMAREDG", 0)
    result.setmaxnreg = compiled.asm["ptx"].count("setmaxnreg.")


def judge(result: BuildResult, build: dict) -> None:
    """Append to ``result.problems`` everything that makes this build unfit for the GPU."""
    if result.stack or result.local:
        result.problems.append(
            f"spills: {result.stack} B stack, {result.local} B local per thread "
            f"({result.regs} registers); use smaller tiles or more warps"
        )
    if result.smem > SHARED_LIMIT:
        result.problems.append(
            f"shared memory {result.smem} B exceeds Hopper's {SHARED_LIMIT} B per block; "
            "use smaller tiles or fewer stages"
        )
    half = any(t in ("*bf16", "*fp16") for t in build["signature"].values())
    if build.get("descriptors") and result.utmaldg == 0:
        result.problems.append("descriptor build without TMA loads (no UTMALDG in the SASS)")
    if build.get("warp_specialized") and not result.setmaxnreg:
        result.problems.append(
            "warp-specialized build without setmaxnreg in the PTX: the compiler did not split "
            "the loop into producer and consumer warp groups"
        )
    if result.matrix and half and not result.hgmma:
        result.problems.append(
            f"matrix kernel without HGMMA (HMMA {result.hmma}, FFMA {result.ffma}): "
            "tl.dot tiles need M >= 64 per warpgroup and N, K multiples of 16"
        )


_WORKER_MODULES: dict[str, ModuleType] = {}


def run_build(ref: str, index: int, sass_all: bool = False) -> BuildResult:
    """Worker: load module ``ref``, compile its build number ``index``, and judge it."""
    module = _WORKER_MODULES.get(ref) or load_module(ref)
    _WORKER_MODULES[ref] = module
    build = module_builds(module)[index]
    jit_fn = unwrap_jit(build.get("fn"))
    result = BuildResult(
        module=module.__name__,
        name=str(build.get("name", f"build{index}")),
        kernel=jit_fn.__name__ if jit_fn is not None else "?",
        num_warps=build.get("num_warps", 0),
        num_stages=build.get("num_stages", 0),
        constexprs={k: v for k, v in build.get("constexprs", {}).items()},
        matrix=bool(build.get("matrix", False)),
    )
    result.problems = validate_build(build)
    if result.problems:
        return result
    try:
        compile_build(build, result, sass=sass_all or result.matrix)
    except Exception as exc:  # a compile error is a finding, reported with the build's name
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        result.problems.append(
            f"compile error ({type(exc).__name__}): " + "\n    ".join(lines[-14:])
        )
        return result
    judge(result, build)
    return result


# --------------------------------------------------------------------------- reporting


def format_table(results: list[BuildResult], markdown: bool = False) -> str:
    head = ["kernel", "build", "warps", "stages", "regs", "stack", "smem KB", "HGMMA", "HMMA",
            "FFMA", "TMA ld/st/red", "setmaxnreg", "status"]  # fmt: skip
    rows = []
    for r in results:
        smem = f"{r.smem / 1024:.1f}" if r.smem is not None else "-"
        rows.append(
            [r.kernel, r.name, str(r.num_warps), str(r.num_stages)]
            + [str(x) if x is not None else "-" for x in (r.regs, r.stack)]
            + [smem]
            + [str(x) if x is not None else "-" for x in (r.hgmma, r.hmma, r.ffma)]
            + [_tma(r), str(r.setmaxnreg) if r.setmaxnreg is not None else "-"]
            + ["ok" if r.ok else "FAIL"]
        )
    return render(head, rows, markdown)


def _tma(r: BuildResult) -> str:
    if r.utmaldg is None:
        return "-"
    return f"{r.utmaldg}/{r.utmastg}/{r.utmaredg}"


def _span(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return f"{lo}" if lo == hi else f"{lo}–{hi}"


def format_by_kernel(results: list[BuildResult], markdown: bool = False) -> str:
    """One row per kernel: its number of builds and the range of each resource over them."""
    kernels: dict[tuple[str, str], list[BuildResult]] = {}
    for r in results:
        kernels.setdefault((r.module, r.kernel), []).append(r)
    head = ["module", "kernel", "builds", "regs", "stack", "smem KB", "HGMMA", "HMMA", "FFMA",
            "UTMALDG", "setmaxnreg", "status"]  # fmt: skip
    rows = []
    for (module, kernel), rs in kernels.items():
        smem = [round(r.smem / 1024, 1) for r in rs if r.smem is not None]
        rows.append(
            [module, f"`{kernel}`" if markdown else kernel, str(len(rs))]
            + [_span([getattr(r, k) for r in rs]) for k in ("regs", "stack")]
            + [_span(smem)]
            + [_span([getattr(r, k) for r in rs]) for k in ("hgmma", "hmma", "ffma")]
            + [_span([getattr(r, k) for r in rs]) for k in ("utmaldg", "setmaxnreg")]
            + ["ok" if all(r.ok for r in rs) else "FAIL"]
        )
    return render(head, rows, markdown)


def render(head: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    return "\n".join(lines + [fmt.format(*r) for r in rows])


def write_json(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- main


def collect(
    refs: list[str], one_per_kernel: bool = False
) -> tuple[list[tuple[str, int]], list[str]]:
    """Jobs (module ref, build index) and coverage problems for the modules ``refs``.

    ``one_per_kernel`` keeps only the first build of each kernel: every kernel still goes
    through the compiler, at a fraction of the time; the coverage check still reads every build.
    """
    jobs, problems = [], []
    kernels_seen: set[tuple[str, tuple[str, str]]] = set()
    covered: set[tuple[str, str]] = set()
    defined: list[tuple[str, str]] = []
    for ref in refs:
        try:
            module = load_module(ref)
            builds = module_builds(module)
        except Exception as exc:
            problems.append(f"{ref}: import or sm90_builds() failed: {type(exc).__name__}: {exc}")
            continue
        if getattr(module, "__file__", None) and module.__file__.endswith(".py"):
            defined += defined_jit_functions(Path(module.__file__), module.__name__)
        for i, build in enumerate(builds):
            jit_fn = unwrap_jit(build.get("fn")) if isinstance(build, dict) else None
            kernel = (ref, jit_key(jit_fn) if jit_fn is not None else ("", str(i)))
            if not one_per_kernel or kernel not in kernels_seen:
                jobs.append((ref, i))
            kernels_seen.add(kernel)
            if jit_fn is not None:
                covered |= called_jit_functions(jit_fn)
        problems += autotune_gaps(module, builds)
    for mod, qualname in defined:
        if (mod, qualname) not in covered:
            problems.append(
                f"{mod}.{qualname} is a @triton.jit function that no sm90_builds() entry compiles "
                f"(nor calls): add a build for every configuration the GPU path can choose"
            )
    return jobs, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", action="append", default=[], metavar="NAME_OR_PATH",
                        help="extra module to check (dotted name or .py path); repeatable")  # fmt: skip
    parser.add_argument("--no-package", action="store_true",
                        help="check only the --module modules, not the kernels package")  # fmt: skip
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results as JSON")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    parser.add_argument("--by-kernel", action="store_true",
                        help="one table row per kernel (ranges over its builds)")  # fmt: skip
    parser.add_argument("--sass-all", action="store_true",
                        help="count SASS instructions of every build, not only matrix ones")  # fmt: skip
    parser.add_argument("--one-per-kernel", action="store_true",
                        help="compile only the first build of each kernel (a quick check)")  # fmt: skip
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="compile processes (default: min(2, CPUs))")  # fmt: skip
    args = parser.parse_args(argv)

    refs = ([] if args.no_package else package_modules("kernels")) + args.module
    cache = tempfile.mkdtemp(prefix="triton-sm90-")
    os.environ["TRITON_CACHE_DIR"] = cache  # fresh per run: nothing cached can hide a regression
    start = time.perf_counter()
    try:
        jobs, problems = collect(refs, args.one_per_kernel)
        print(f"compiling {len(jobs)} builds for sm_{SM} with {args.jobs} processes", flush=True)
        results = compile_all(jobs, args.jobs, args.sass_all)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    elapsed = time.perf_counter() - start

    table = format_by_kernel if args.by_kernel else format_table
    print(table(results, markdown=args.markdown))
    failed = [r for r in results if not r.ok]
    for r in failed:
        for p in r.problems:
            print(f"FAIL {r.module}:{r.name} ({r.kernel}): {p}")
    for p in problems:
        print(f"FAIL {p}")
    ok = not failed and not problems
    if not jobs and not problems:
        print("note: no module defines sm90_builds(); nothing was compiled")
    print(f"{'OK' if ok else 'FAILED'}: {len(results) - len(failed)}/{len(results)} builds pass "
          f"in {elapsed:.1f} s")  # fmt: skip
    if args.json:
        import triton

        write_json(args.json, {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "triton": triton.__version__, "target": f"cuda:{SM}", "ok": ok,
            "elapsed_s": round(elapsed, 1), "builds": [asdict(r) | {"ok": r.ok} for r in results],
            "problems": problems,
        })  # fmt: skip
    return 0 if ok else 1


def compile_all(jobs: list[tuple[str, int]], n_procs: int, sass_all: bool) -> list[BuildResult]:
    """Compile the jobs in ``n_procs`` processes; results keep the order of ``jobs``."""
    if n_procs <= 1 or len(jobs) <= 1:
        return [run_build(ref, i, sass_all) for ref, i in jobs]
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited triton state
    refs, indices = zip(*jobs)
    with concurrent.futures.ProcessPoolExecutor(n_procs, mp_context=ctx) as pool:
        return list(pool.map(run_build, refs, indices, [sass_all] * len(jobs)))


if __name__ == "__main__":
    sys.exit(main())
