"""What a compiled program does per device, read from its optimized HLO text: the FLOPs of its
matrix products, the bytes its kernels read and write, and every collective with its bytes and
the device groups it runs over, each counted as often as it executes (a scanned layer's body
times its loop's trip count, which XLA's own cost analysis counts once).

A conditional's branches each count once per execution, except where its name scope says the
step decides at run time how often each runs (`shares`: the expert blocks of
models/expert_products.py, counted at the share balanced routing uses); a grouped product
(ragged-dot, in a GPU's program) likewise counts the share of its rows that fall in its
groups (`rows_share`). An in-place update counts its update, not its buffer, also where
XLA:CPU converts the buffer around it.

Replica groups come in three spellings (explicit `{{0,1},{2,3}}`, iota `[2,2]<=[4]T(1,0)` and
XLA's mesh form `mesh['axis_0'=2,...] {'axis_0'}`); all become explicit lists of partition ids,
which index the jax mesh's devices in row-major order.
"""

import math
import re
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s4": 1, "u4": 1, "s16": 2, "u16": 2, "f16": 2,
               "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
               "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY )?%(\S+) .*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = ")
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
# Ops that move no data of their own (or whose callees are counted instead).
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call",
         "conditional", "partition-id", "replica-id", "after-all", "iota"}


def shape_bytes(type_text: str) -> int:
    """Bytes of an HLO type: an array `f32[4,8]{1,0}` or a tuple of them."""
    total = 0
    for dtype, dims in _ARRAY.findall(type_text):
        if dtype in DTYPE_BYTES or dtype.startswith("f8"):
            size = DTYPE_BYTES.get(dtype, 1)
            total += size * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _dims(type_text: str) -> list[int]:
    m = _ARRAY.search(type_text)
    return [int(d) for d in m.group(2).split(",") if d] if m else []


def _closing(text: str, start: int) -> int:
    """Index of the bracket closing the one at `start`."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] in "({[":
            depth += 1
        elif text[i] in ")}]":
            depth -= 1
            if depth == 0:
                return i
    return len(text) - 1


@dataclass
class Instr:
    name: str
    type: str
    op: str
    operands: list[str]
    attrs: str
    args: str = ""  # the text between the parentheses (a parameter's number)


def _parse_instr(line: str) -> Instr | None:
    m = _INSTR.match(line)
    if not m:
        return None
    rest = line[m.end():]
    if rest.startswith("("):
        end = _closing(rest, 0) + 1
    else:
        end = rest.index(" ")
    type_text, rest = rest[:end], rest[end:].lstrip()
    paren = rest.find("(")
    if paren < 0:
        return None
    op = rest[:paren]
    close = _closing(rest, paren)
    operands = re.findall(r"%([^\s,)]+)", rest[paren:close + 1])
    return Instr(m.group(1), type_text, op, operands, rest[close + 1:], rest[paren + 1:close])


def parse_computations(text: str) -> tuple[dict[str, list[Instr]], str]:
    """{computation: its instructions} in text order, and the entry computation's name."""
    comps: dict[str, list[Instr]] = {}
    entry, current = "", None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header and not line.startswith(" "):
            current = header.group(2)
            comps[current] = []
            if header.group(1):
                entry = current
            continue
        if current is None or line.startswith("}"):
            continue
        instr = _parse_instr(line)
        if instr:
            comps[current].append(instr)
    return comps, entry


def _callees(instr: Instr) -> list[tuple[str, int, bool]]:
    """(computation, times per execution of `instr`, whether it is a fusion's body)."""
    a = instr.attrs
    if instr.op == "while":
        trip = re.search(r'known_trip_count"?\s*[:=]\s*\{"?n"?\s*:\s*"?(\d+)', a)
        n = int(trip.group(1)) if trip else 1
        body = re.search(r"body=%([^\s,]+)", a)
        cond = re.search(r"condition=%([^\s,]+)", a)
        return ([(body.group(1), n, False)] if body else []) + \
               ([(cond.group(1), n + 1, False)] if cond else [])
    out = []
    calls = re.search(r"calls=%([^\s,]+)", a)
    if calls:
        out.append((calls.group(1), 1, instr.op == "fusion"))
    branches = re.search(r"branch_computations=\{([^}]*)\}", a)
    if branches:
        out += [(b, 1, False) for b in re.findall(r"%([^\s,]+)", branches.group(1))]
    for key in ("true_computation", "false_computation"):
        m = re.search(key + r"=%([^\s,]+)", a)
        if m:
            out.append((m.group(1), 1, False))
    return out


def _expand_iota(spec: str) -> np.ndarray:
    """`[2,4]<=[8]` or `[4,2]<=[2,2,2]T(2,1,0)`: the group matrix."""
    m = re.match(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", spec)
    shape = [int(x) for x in m.group(1).split(",")]
    dims = [int(x) for x in m.group(2).split(",")]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if m.group(3):
        ids = ids.transpose([int(x) for x in m.group(3).split(",")])
    return ids.reshape(shape)


def replica_groups(attrs: str) -> list[list[int]] | None:
    """The device groups of a collective (None: every device in one group)."""
    pairs = re.search(r"source_target_pairs=\{(.*?)\}\}", attrs)
    if pairs:
        return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)", pairs.group(1) + "}")]
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(([^)]*\)?)\))? "
                     r"\{([^}]*)\}", attrs)
    if mesh:
        names = re.findall(r"'([^']+)'=(\d+)", mesh.group(1))
        shape = [int(n) for _, n in names]
        # device_ids=([2,4]T(1,0)): the mesh's ids as an iota reshaped and transposed
        ids = (_expand_iota(f"[{math.prod(shape)}]<={mesh.group(2)}") if mesh.group(2)
               else np.arange(math.prod(shape))).reshape(shape)
        grouped = [i for i, (n, _) in enumerate(names) if f"'{n}'" in mesh.group(3)]
        rest = [i for i in range(len(names)) if i not in grouped]
        width = math.prod(shape[i] for i in grouped)
        return ids.transpose(rest + grouped).reshape(-1, width).tolist()
    iota = re.search(r"replica_groups=(\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?)", attrs)
    if iota:
        return _expand_iota(iota.group(1)).tolist()
    explicit = re.search(r"replica_groups=\{(.*?)\}\}", attrs)
    if explicit:
        return [[int(x) for x in g.split(",") if x] for g in
                re.findall(r"\{([\d,]*)", explicit.group(1) + "}")]
    return None


@dataclass
class Collective:
    op: str  # all-gather, all-reduce, reduce-scatter, all-to-all, collective-permute
    bytes: int  # of the array it produces (reduce-scatter: of its input)
    link_bytes: float  # each device's bytes over its links per execution (ring algorithms)
    group_size: int
    groups: list[list[int]] | None
    count: float  # executions per step (a share of them in a scoped conditional)


def _link_bytes(op: str, size: int, n: int) -> float:
    if n <= 1 and op != "collective-permute":
        return 0.0
    share = (n - 1) / n
    return {"all-gather": size * share, "reduce-scatter": size * share,
            "all-reduce": 2 * size * share, "all-to-all": size * share,
            "collective-permute": float(size)}[op]


def _dot_flops(instr: Instr, shapes: dict[str, str]) -> float:
    out = math.prod(_dims(instr.type)) if _dims(instr.type) else 1
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instr.attrs)
    if instr.op == "ragged-dot":
        # A grouped product (gpu_program.py): each row meets one group's weights. Where the
        # ragged dimension is contracted (a weights' gradient), the output holds one matrix
        # per group, each a sum over that group's rows only.
        ragged = re.search(r"lhs_ragged_dims=\{(\d+)\}", instr.attrs)
        groups = _dims(shapes.get(instr.operands[2], "")) if len(instr.operands) > 2 else []
        if ragged and contracting and ragged.group(1) in contracting.group(1).split(",") \
                and groups:
            out //= groups[-1]
    elif instr.op == "custom-call" and re.search(r'custom_call_target="[^"]*(gemm|matmul)',
                                                instr.attrs, re.I):
        contracting = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', instr.attrs)
    elif instr.op != "dot":
        return 0.0
    lhs = _dims(shapes.get(instr.operands[0], "")) if instr.operands else []
    if not contracting or not lhs:
        return 0.0
    k = math.prod(lhs[int(d.strip('" '))] for d in contracting.group(1).split(",") if d.strip('" '))
    return 2.0 * out * k


_SLICING = ("dynamic-slice", "slice", "gather")
# Operations computed per element of their output (a reduce: per element of its input):
# what a kernel computes besides matrix products, which bounds it where memory does not
# (the optimizer's update of every parameter, norms, softmax) on a CPU.
_ELEMENTWISE = {"add", "subtract", "multiply", "divide", "maximum", "minimum", "negate", "abs",
                "exponential", "exponential-minus-one", "log", "log-plus-one", "sqrt", "rsqrt",
                "cbrt", "tanh", "logistic", "power", "select", "compare", "clamp", "and", "or",
                "xor", "not", "convert", "floor", "ceil", "round-nearest-even", "sign", "erf",
                "sine", "cosine", "remainder", "is-finite", "reduce"}
_RETYPE = ("convert", "bitcast", "bitcast-convert", "copy")


def _grouped_traffic(instr: Instr, shapes: dict[str, str], rows_share: float) -> float:
    """Bytes a grouped product (ragged-dot) reads and writes when only `rows_share` of its
    ragged dimension's rows fall in its groups: the arrays of rows at that share, the groups'
    weights whole."""
    ragged = re.search(r"lhs_ragged_dims=\{(\d+)\}", instr.attrs)
    lhs = _dims(shapes.get(instr.operands[0], "")) if instr.operands else []
    rows = lhs[int(ragged.group(1))] if ragged and lhs else None
    arrays = [shapes.get(o, "") for o in instr.operands] + [instr.type]
    return sum(shape_bytes(a) * (rows_share if rows in _dims(a) else 1.0) for a in arrays)


def _traffic(instr: Instr, shapes: dict[str, str], comps: dict[str, list[Instr]]) -> float:
    """Bytes a kernel reads and writes. A slice reads only what it takes, an in-place update
    writes only its update: a scanned layer reading its weights from the stacked array reads
    one layer's, not the whole stack's, each iteration. Fusions are looked into for both."""
    operands = [shape_bytes(shapes.get(o, "")) for o in instr.operands]
    out = shape_bytes(instr.type)
    if instr.op in _SLICING:
        return 2.0 * out
    if instr.op == "dynamic-update-slice":
        update = operands[1] if len(operands) > 1 else out
        return 2.0 * update
    body = re.search(r"calls=%([^\s,]+)", instr.attrs)
    if instr.op != "fusion" or not body or body.group(1) not in comps:
        return out + sum(operands)
    inner = comps[body.group(1)]
    by_name = {i.name: i for i in inner}
    users: dict[str, list[Instr]] = defaultdict(list)
    for i in inner:
        for o in i.operands:
            users[o].append(i)

    def uses(name: str) -> list[tuple[Instr, str]]:
        """(user, the operand it reads) past element-type changes: XLA:CPU computes in float32
        around a bfloat16 in-place update (convert, update, convert back), which a GPU does in
        place; counted as the update it is."""
        out = []
        for u in users.get(name, []):
            if u.op in _RETYPE:
                out += uses(u.name)
            else:
                out.append((u, name))
        return out

    total = 0.0
    for i in inner:
        if i.op != "parameter":
            continue
        index = int(i.args) if i.args.isdigit() else len(operands)
        size = operands[index] if index < len(operands) else 0
        found = uses(i.name)
        in_place = [u.op == "dynamic-update-slice" and u.operands[0] == via for u, via in found]
        if found and all(u.op in _SLICING or p for (u, _), p in zip(found, in_place)):
            # read where sliced, updated in place (a gradient added into one expert's slice
            # of a stack reads and writes that slice, not the stack)
            size = sum(shape_bytes(u.type) for (u, _), p in zip(found, in_place) if not p)
        total += size
    root = inner[-1] if inner else None
    while root is not None and root.op in _RETYPE and root.operands[0] in by_name:
        root = by_name[root.operands[0]]
    if root is not None and root.op == "dynamic-update-slice" and len(root.operands) > 1:
        out = shape_bytes(by_name[root.operands[1]].type) if root.operands[1] in by_name else out
    return total + out


def _element_ops(instr: Instr, shapes: dict[str, str], comps: dict[str, list[Instr]]) -> float:
    """Elementwise operations a kernel computes: its own, or those of the fusion it runs."""
    body = re.search(r"calls=%([^\s,]+)", instr.attrs) if instr.op == "fusion" else None
    inner = comps.get(body.group(1), []) if body else [instr]
    inner_shapes = {i.name: i.type for i in inner} if body else shapes
    total = 0.0
    for i in inner:
        if i.op == "reduce" and i.operands:
            total += math.prod(_dims(inner_shapes.get(i.operands[0], "")) or [1])
        elif i.op in _ELEMENTWISE:
            total += math.prod(_dims(i.type) or [1])
    return total


@dataclass
class ProgramCost:
    flops: float  # of the matrix products, per device per step
    bytes: float  # read and written by the kernels, per device per step
    collectives: list[Collective]
    score_bytes: float = 0.0  # of those, arrays ending in (seq, seq): attention's scores
    kernels: float = 0.0  # kernels launched per step (fusions, library calls, copies, ...)
    dot_bytes: float = 0.0  # of `bytes`, those of kernels that compute a matrix product
    element_ops: float = 0.0  # elementwise operations (and reductions' inputs) per step


def is_scores(dims: list[int], seq_len: int, heads: int) -> bool:
    """Whether an array is attention's (seq, seq) scores or probabilities: (..., L, L) of
    rank 4 or more (batch, heads or their groups lead), or a rank-3 view with a head group
    folded into one of the two (L, g.L) (rank-3 (B, L, L) is excluded: it is also a width
    the size of the sequence)."""
    if not seq_len or len(dims) < 3:
        return False
    a, b = dims[-2:]
    if len(dims) >= 4 and a == b == seq_len:
        return True
    short, long = sorted((a, b))
    return short == seq_len and long % seq_len == 0 and 2 <= long // seq_len <= heads


def _scope(instr: Instr) -> str:
    """The name scope XLA kept for an instruction (its op_name), or ''."""
    found = re.search(r'op_name="([^"]*)"', instr.attrs)
    return found.group(1) if found else ""


def _taken(instr: Instr, trips: int, shares: dict) -> list[float] | None:
    """How often each branch of a conditional runs per execution, where its name scope is one
    of `shares` ({scope: share(trip count of the loop around it)}, the share of executions
    taking its last branch, `true`); None (each branch once) elsewhere."""
    if instr.op != "conditional":
        return None
    scope = _scope(instr)
    for name, share in shares.items():
        if f"/{name}/" in scope:
            s = min(1.0, max(0.0, share(trips)))
            return [1.0 - s, s]
    return None


def program_cost(text: str, num_devices: int, seq_len: int = 0, heads: int = 0,
                 shares: dict | None = None, rows_share: float = 1.0) -> ProgramCost:
    """`shares`: conditionals whose branch taken is known only at run time, by name scope
    (`_taken`); every other conditional counts each of its branches once. `rows_share`: the
    share of a grouped product's rows that fall in its groups, the only ones it multiplies
    (this device's experts' rows among those gathered from its expert group)."""
    comps, entry = parse_computations(text)
    times: dict[str, float] = defaultdict(float)
    trips: dict[str, int] = {}  # a loop body's trip count
    fused: set[str] = set()
    times[entry] = 1
    for name in reversed(list(comps)):  # callers come after their callees in the text
        if not times.get(name):
            continue
        for instr in comps[name]:
            callees = _callees(instr)
            taken = _taken(instr, trips.get(name, 1), shares or {})
            for i, (callee, n, is_fusion) in enumerate(callees):
                if taken and len(taken) == len(callees):
                    n *= taken[i]
                if instr.op == "while" and i == 0:
                    trips[callee] = n
                elif instr.op != "while" and name in trips:  # a call inside the loop's body
                    trips.setdefault(callee, trips[name])
                times[callee] += times[name] * n
                if is_fusion:
                    fused.add(callee)
    flops = traffic = scores = kernels = dot_traffic = element_ops = 0.0
    has_dot = {name for name, instrs in comps.items()
               if any(i.op in ("dot", "ragged-dot") for i in instrs)}
    found: dict[tuple, Collective] = {}
    for name, instrs in comps.items():
        t = times.get(name, 0)
        if not t:
            continue
        shapes = {i.name: i.type for i in instrs}
        for instr in instrs:
            grouped = instr.op == "ragged-dot"
            products = _dot_flops(instr, shapes)
            flops += t * products * (rows_share if grouped else 1.0)
            base = instr.op.removesuffix("-start")
            if name not in fused and instr.op not in _FREE and not instr.op.endswith("-done"):
                moved = t * (_grouped_traffic(instr, shapes, rows_share) if grouped
                             else _traffic(instr, shapes, comps))
                traffic += moved
                kernels += t
                element_ops += t * _element_ops(instr, shapes, comps)
                body = re.search(r"calls=%([^\s,]+)", instr.attrs)
                if instr.op in ("dot", "ragged-dot") or products or \
                        (body and body.group(1) in has_dot):
                    dot_traffic += moved
                if is_scores(_dims(instr.type), seq_len, heads):
                    scores += moved
            if base in COLLECTIVES and not instr.op.endswith("-done"):
                size = shape_bytes(instr.type)
                if instr.op.endswith("-start") and instr.type.startswith("("):
                    size = shape_bytes(instr.type) // 2  # (operand, result) pair
                if base == "reduce-scatter":
                    size = sum(shape_bytes(shapes.get(o, "")) for o in instr.operands) or size
                groups = replica_groups(instr.attrs)
                n = len(groups[0]) if groups else num_devices
                key = (base, size, str(groups))
                if key in found:
                    found[key].count += t
                else:
                    found[key] = Collective(base, size, 0.0, n, groups, t)
    for c in found.values():
        c.link_bytes = _link_bytes(c.op, c.bytes, c.group_size)
    return ProgramCost(flops, traffic, list(found.values()), scores, kernels, dot_traffic,
                       element_ops)
