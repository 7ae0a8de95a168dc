"""Where a compiled program's bytes go: XLA's optimized HLO (``compiled.as_text()``), read op by op.

XLA's ``compiled.cost_analysis()`` gives one total of bytes accessed per program; the roofline of
``rre_jax.aot`` divides it by the chip's HBM bandwidth. This module splits that total over the program's
top-level ops (fusions, copies, collectives, ...), counting each op as XLA's cost analysis does
(``HloCostAnalysis``: an op reads its operands and writes its output; a fusion reads each parameter once,
only the slice of a parameter it slices, and writes only the update of an in-place dynamic-update-slice;
a parameter, bitcast or get-tuple-element moves nothing; a ``while`` body is counted once), so that the rows
sum to XLA's figure -- and says, per op, which of those bytes live in HBM and which in on-chip memory: the TPU
compiler assigns buffers to memory spaces (``S(1)`` in a layout is the TensorCore's VMEM, ``S(2)``/``S(6)``
semaphores and scalar memory), and bytes an op reads from or writes to VMEM are counted by XLA but never cross
the HBM bus. ``hbm`` is the part of an op's count whose buffers lie in HBM (memory space 0).

Nothing here compiles: the functions take HLO text and return rows; ``benchmarks/tpu_account.py`` compiles
the programs and prints the tables of docs/tpu_compile.md.
"""
from __future__ import annotations

import dataclasses
import math
import re

import jax
from jax._src.lib import _jax
from jaxlib import _hlo

ITEMSIZE = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
            "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}
POINTER = 8  # XLA's size of a tuple: its table of pointers
_ARRAY = re.compile(r"(%s)\[([0-9,]*)\](\{[^}]*\})?" % "|".join(sorted(ITEMSIZE, key=len, reverse=True)))
_INSTR = re.compile(r"^\s*(ROOT\s+)?%(\S+)\s+=\s+(.*?)\s+([a-z][a-z0-9\-_]*)\((.*)$")
_HEADER = re.compile(r"^(ENTRY\s+)?%(\S+)\s+\(.*\)\s+->\s+.*\{\s*$")
_REF = re.compile(r"%([\w.\-]+)")
_FREE = {"parameter", "get-tuple-element", "bitcast", "after-all", "partition-id", "replica-id", "opt-barrier",
         "constant", "iota"}


@dataclasses.dataclass(frozen=True)
class Array:
    """One array of an HLO shape: element type, dimensions and the memory space of its layout (0: HBM)."""

    dtype: str
    dims: tuple[int, ...]
    space: int = 0

    @property
    def nbytes(self) -> int:
        return int(math.prod(self.dims) * ITEMSIZE[self.dtype])

    def __str__(self):
        return f"{self.dtype}[{','.join(map(str, self.dims))}]" + (f"@S{self.space}" if self.space else "")


def parse_shape(text: str) -> tuple[list[Array], bool]:
    """``(arrays, is_tuple)`` of an HLO shape such as ``bf16[8,128]{1,0:T(8,128)(2,1)S(1)}`` or a tuple of them."""
    arrays = []
    for m in _ARRAY.finditer(text):
        space = re.search(r"S\((\d+)\)", m.group(3) or "")
        dims = tuple(int(d) for d in m.group(2).split(",") if d)
        arrays.append(Array(m.group(1), dims, int(space.group(1)) if space else 0))
    return arrays, text.lstrip().startswith("(")


@dataclasses.dataclass
class Instr:
    name: str
    shape: str
    opcode: str
    operands: list[str]
    rest: str
    root: bool = False
    args: str = ""

    @property
    def arrays(self) -> list[Array]:
        return parse_shape(self.shape)[0]

    @property
    def is_tuple(self) -> bool:
        return parse_shape(self.shape)[1]

    def attr(self, key: str) -> str | None:
        m = re.search(rf"\b{key}=%?([^,\s]+)", self.rest)
        return m.group(1) if m else None

    @property
    def op_name(self) -> str:
        m = re.search(r'op_name="([^"]*)"', self.rest)
        return m.group(1) if m else ""


def _split_operands(text: str) -> tuple[str, str]:
    """The text inside the call's parentheses and the attribute text after them."""
    depth, i = 1, 0
    while i < len(text) and depth:
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        i += 1
    return text[:i - 1], text[i:]


def parse_module(text: str) -> tuple[dict[str, dict[str, Instr]], str]:
    """``({computation: {instruction name: Instr}} in program order, entry computation name)``."""
    comps, entry, cur = {}, "", None
    for line in text.splitlines():
        h = _HEADER.match(line)
        if h:
            cur = comps.setdefault(h.group(2), {})
            entry = h.group(2) if h.group(1) else entry
            continue
        if line.startswith("}"):
            cur = None
            continue
        m = _INSTR.match(line) if cur is not None else None
        if m:
            args, rest = _split_operands(m.group(5))
            operands = re.findall(r"%([\w.\-]+)", args)
            cur[m.group(2)] = Instr(m.group(2), m.group(3), m.group(4), operands, rest, bool(m.group(1)), args)
    return comps, entry


# =================================================================================== bytes per op, as XLA counts

@dataclasses.dataclass
class Row:
    """One op of the program (an op of a ``while`` body is counted once, as XLA counts it) and what XLA's cost
    analysis gives it: ``bytes`` accessed, ``hbm`` (the part whose buffers lie in HBM) and ``flops``."""

    where: str
    name: str
    opcode: str
    what: str
    shapes: str
    bytes: float
    hbm: float
    flops: float
    trips: int = 1  # how many times the op runs per call: the product of its loops' trip counts
    hbm_out: float = 0.0  # the part of ``hbm`` the op writes (its outputs that lie in HBM)


def _computation_texts(text: str) -> tuple[dict[str, str], str]:
    """``({name: text}, module header)`` of every computation (the entry included) of an HLO module."""
    out, cur, lines, header = {}, None, [], ""
    for line in text.splitlines():
        if line.startswith("HloModule"):
            header = line.split(",")[0]
        h = _HEADER.match(line)
        if h:
            cur, lines = h.group(2), [line]
        elif cur is not None:
            lines.append(line)
            if line.startswith("}"):
                out[cur], cur = "\n".join(lines), None
    return out, header


def _op_module(header: str, callees: str, ops: list[Instr], values: dict[str, Instr]) -> str:
    """An HLO module whose entry computes ``ops`` alone (the last is the root), every other operand a parameter, and
    ``callees`` the computations they call: XLA's cost analysis of it is its analysis of those ops in the program."""
    own = {i.name for i in ops}
    names = list(dict.fromkeys(o for i in ops for o in i.operands if o not in own))
    rename = lambda m: f"%p{names.index(m.group(1))}" if m.group(1) in names else m.group(0)  # noqa: E731
    lines = [f"  %p{i} = {values[n].shape} parameter({i})" for i, n in enumerate(names)]
    for k, i in enumerate(ops):
        rest = re.sub(r",\s*control-predecessors=\{[^}]*\}", "", i.rest)
        root = "ROOT " if k == len(ops) - 1 else ""
        args = _REF.sub(rename, i.args)
        lines.append(f"  {root}%{i.name} = {i.shape} {i.opcode}({args}){rest}")
    sig = ", ".join(f"p{i}: {values[n].shape}" for i, n in enumerate(names))
    text = f"{header}\n\n{callees}\n\nENTRY %one_op ({sig}) -> {ops[-1].shape} {{\n" + "\n".join(lines) + "\n}\n"
    return re.sub(r",\s*metadata=\{[^}]*\}", "", text)


def _callees(comp_texts: dict[str, str], ins: Instr) -> list[str]:
    """The computations ``ins`` calls, transitively (fused computations, reducers, bodies)."""
    todo = [n for n in re.findall(r"%([\w.\-]+)", ins.rest) if n in comp_texts]
    seen: list[str] = []
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.append(n)
            todo += [m for m in re.findall(r"%([\w.\-]+)", comp_texts[n]) if m in comp_texts and m != n]
    return seen


def _element(ins: Instr, index: str) -> Array | None:
    """The array at shape index ``'{}'`` / ``'{k}'`` of a value (None for a tuple's pointer table)."""
    arrays, is_tuple = parse_shape(ins.shape)
    if index == "{}":
        return None if is_tuple or not arrays else arrays[0]
    k = int(index.strip("{}").split(",")[0])
    return arrays[k] if k < len(arrays) else None


def _hbm_part(cost: dict, ins: Instr, values: dict[str, Instr]) -> tuple[float, float]:
    """``(read + written, written)``: the bytes of an op's cost whose buffers lie in HBM (memory space 0), operand by
    operand and the output."""
    hbm = out = 0.0
    for key, n in cost.items():
        m = re.fullmatch(r"bytes accessed(\d+|out)(\{[0-9,]*\})", key)
        if not m:
            continue
        value = ins if m.group(1) == "out" else values.get(ins.operands[int(m.group(1))]) \
            if int(m.group(1)) < len(ins.operands) else None
        arr = _element(value, m.group(2)) if value is not None else None
        if arr is not None and arr.space == 0:
            hbm += n
            out += n if m.group(1) == "out" else 0.0
    return hbm, out


def account(text: str, client=None) -> list[Row]:
    """One row per op of the program in ``text`` (``compiled.as_text()``): the entry computation's ops, ``while``
    bodies and conditions opened in place (once, as XLA counts a loop), ``call`` / ``conditional`` likewise.
    Each op's bytes and FLOPs are XLA's own cost analysis (``HloCostAnalysis``, through ``client``, default the
    CPU client: shapes without the TPU's tile padding) of a module holding that op alone, so the rows sum to
    XLA's figure for the program up to the tile padding the TPU's own analysis adds."""
    client = client or jax.devices("cpu")[0].client
    texts, header = _computation_texts(text)
    comps, entry = parse_module(text)
    rows: list[Row] = []

    def walk(comp: str, where: str, trips: int):
        values = comps[comp]
        for ins in values.values():
            if ins.opcode == "while":
                n = trip_count(comps, ins)
                walk(ins.attr("condition"), f"{where}/{ins.name}.cond", trips * (n + 1))
                walk(ins.attr("body"), f"{where}/{ins.name}", trips * n)
                continue
            if ins.opcode in ("call", "conditional"):
                for c in _callees(texts, ins)[:1] if ins.opcode == "call" else re.findall(
                        r"%([\w.\-]+)", (re.search(r"branch_computations=\{([^}]*)\}", ins.rest) or [""])[0]):
                    walk(c, f"{where}/{ins.name}", trips)
                continue
            if ins.opcode in ("parameter", "get-tuple-element", "bitcast", "constant") and not ins.root:
                continue
            cost = _op_cost(client, header, texts, ins, values)
            hbm, hbm_out = _hbm_part(cost, ins, values)
            rows.append(Row(where, ins.name, ins.opcode, _what(comps, ins), _shapes(ins, values),
                            cost.get("bytes accessed", 0.0), hbm, cost.get("flops", 0.0), trips, hbm_out))

    walk(entry, "entry", 1)
    return rows


def trip_count(comps: dict[str, dict[str, Instr]], loop: Instr) -> int:
    """How many times a ``while`` loop runs at most: XLA's ``known_trip_count`` when it states one, else the bound of
    the ``i < n`` compare of the counter with a constant in its condition (the TPU compiler's scans and the
    decode loop's ``i < N``; the counter starts at 0), the compare possibly wrapped in a fusion. 1 when neither."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.rest)
    if known:
        return int(known.group(1))
    cond = comps[loop.attr("condition")]
    for ins in cond.values():
        compare = ins
        if ins.opcode == "fusion" and ins.attr("calls") in comps:
            compare = next((i for i in comps[ins.attr("calls")].values() if i.root), ins)
        if compare.opcode == "compare" and "direction=LT" in compare.rest and len(ins.operands) == 2:
            bound = cond.get(ins.operands[1])
            if bound is not None and bound.opcode == "constant" and re.fullmatch(r"-?\d+", bound.args.strip()):
                return int(bound.args)
    return 1


def totals(rows: list[Row]) -> dict:
    """Per call of the program: XLA's ``bytes`` (each op counted once per run of it), the ``hbm`` part (and of it
    the bytes ``hbm_written``) and the ``flops``; ``bytes_once`` is XLA's own figure (``cost_analysis()``: a loop
    body counted once)."""
    return {"bytes": sum(r.bytes * r.trips for r in rows), "hbm": sum(r.hbm * r.trips for r in rows),
            "hbm_written": sum(r.hbm_out * r.trips for r in rows), "flops": sum(r.flops * r.trips for r in rows),
            "bytes_once": sum(r.bytes for r in rows)}


def _op_cost(client, header: str, texts: dict[str, str], ins: Instr, values: dict[str, Instr]) -> dict:
    """XLA's cost analysis of one op. The second half of an asynchronous pair (``copy-done``, ``slice-done``,
    ``all-gather-done``, ...) takes its start op as operand: it is costed with its start, less the start alone."""
    def analyse(ops):
        callees = "\n\n".join(texts[c] for i in ops for c in reversed(_callees(texts, i)))
        return _jax.hlo_module_cost_analysis(client, _hlo.hlo_module_from_text(_op_module(header, callees, ops,
                                                                                            values)))
    if not (ins.opcode.endswith("-done") or ins.opcode.endswith("-update")):
        return analyse([ins])
    start = values[ins.operands[0]]
    pair, alone = analyse([start, ins]), analyse([start])
    out = {k: v - alone.get(k, 0.0) for k, v in pair.items() if k.startswith(("bytes accessed", "flops"))}
    return {k: v for k, v in out.items() if not re.fullmatch(r"bytes accessed\d+\{[0-9,]*\}", k)} | {
        "bytes accessed0{}": out.get("bytes accessed", 0.0) - out.get("bytes accessedout{}", 0.0)}


def _what(comps, ins: Instr) -> str:
    """What the op computes, by the JAX source op it came from (its ``op_name``, or its fusion root's)."""
    name = ins.op_name
    if not name and ins.opcode == "fusion" and ins.attr("calls") in comps:
        root = next((i for i in comps[ins.attr("calls")].values() if i.root), None)
        name = root.op_name if root else ""
    return re.sub(r"jit\([^)]*\)/", "", name)


def _shapes(ins: Instr, values: dict[str, Instr]) -> str:
    """``largest operands -> output``, e.g. ``bf16[4,16,1024,128] bf16[4,16,128] -> f32[4,16,1024]@S1``."""
    ops = sorted((values[o] for o in dict.fromkeys(ins.operands) if o in values),
                 key=lambda v: -sum(a.nbytes for a in v.arrays))[:3]
    out = ins.arrays[:3]
    return (" ".join(str(v.arrays[0]) for v in ops if v.arrays) + " -> "
            + ",".join(map(str, out)) + ("..." if len(ins.arrays) > 3 else ""))


def loops(rows: list[Row]) -> dict[str, int]:
    """``{loop: runs of its body per call}`` of every ``while`` loop the rows were found in."""
    out: dict[str, int] = {}
    for r in rows:
        if r.where != "entry" and not r.where.endswith(".cond"):
            out.setdefault(r.where, r.trips)
    return out


def iteration(rows: list[Row], loop: str) -> list[Row]:
    """The rows of one run of ``loop``'s body (loops nested in it included, at their trip counts per run)."""
    n = loops(rows)[loop]
    return [dataclasses.replace(r, trips=r.trips // n) for r in rows
            if r.where == loop or r.where.startswith(loop + "/")]


def grouped(rows: list[Row]) -> list[Row]:
    """Rows of the same kind merged -- same opcode, same source op (layer indices dropped) and same shapes --
    with ``trips`` the number of runs; sorted by XLA's bytes, largest first."""
    groups: dict[tuple, Row] = {}
    for r in rows:
        what = re.sub(r"layers_\d+", "layers_i", r.what)
        what = re.sub(r"^.*/(?=[^/]+/[^/]+$)", "", what)  # the last two names of the op's path
        key = (r.opcode, what, r.shapes)
        g = groups.get(key)
        if g is None:
            groups[key] = dataclasses.replace(r, what=what, name=r.name, bytes=r.bytes * r.trips,
                                              hbm=r.hbm * r.trips, hbm_out=r.hbm_out * r.trips,
                                              flops=r.flops * r.trips)
        else:
            g.bytes += r.bytes * r.trips
            g.hbm += r.hbm * r.trips
            g.hbm_out += r.hbm_out * r.trips
            g.flops += r.flops * r.trips
            g.trips += r.trips
    return sorted(groups.values(), key=lambda g: -g.bytes)


def loop_of(rows: list[Row], trips: int, nested: bool = False) -> str:
    """The outermost loop whose body runs ``trips`` times per call (with ``nested``: one holding loops of its own),
    e.g. the sampler's decode loop (``max_new_tokens``) or the update's micro-batch loop (epochs x micro-batches);
    an error naming the loops found when there is none."""
    found = loops(rows)
    hits = [w for w, n in found.items() if n == trips and (not nested or any(v.startswith(w + "/") for v in found))]
    if not hits:
        raise ValueError(f"no loop runs {trips} times per call; loops and their runs: {found}")
    return min(hits, key=lambda w: w.count("/"))
