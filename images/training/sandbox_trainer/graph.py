"""The buyer's model as the platform runs it: an exported graph, read as hostile input and checked op by op.

The export child (`sandbox_trainer.export`, which runs the buyer's code before any data is in the container)
writes two files: `graph.json`, the nodes of `torch.export`'s graph in a small JSON form of our own, and
`tensors.safetensors`, the parameters, buffers and constants. The trainer reads them here without running
anything they hold:

- No pickle anywhere. `torch.export.load` (torch 2.13) is unsafe on hostile files: its docstring says it
  "uses pickle under the hood"; `pt2_archive/_package.py` reads constants with `pickle.loads` and
  `torch._C._pickle_load_obj`, and the older format's `_export/serde/serialize.deserialize_torch_artifact`
  retries a failed `torch.load(weights_only=True)` with `weights_only=False`. So we do not use it. JSON is
  parsed by `json`, tensors by safetensors (a length-prefixed JSON header and raw little-endian bytes).
- No code generation. `torch.fx.GraphModule` writes Python source from node names and `exec`s it; a hostile
  node name is a hostile string. We interpret the nodes ourselves: each one calls an operator taken from
  `ALLOWED_OPS`, a fixed table keyed by name, on values the graph computed or literals it holds (numbers,
  strings, lists). A name not in the table is refused, whatever it claims to be.
- Only pure tensor maths. The table holds no op that reads or writes files (aten.from_file, save), talks to
  the outside, mutates its inputs (every in-place op, so no buffer can change between steps and carry data
  into the released weights), draws random numbers other than dropout, has data-dependent output shapes
  (nonzero, unique, masked_select), or mixes the rows of a batch by design (batch_norm). Higher-order ops
  (cond, while_loop, map), custom ops and submodules are refused.

Each op also carries a *row rule* (`RowRule`): whether, applied to tensors whose dimension 0 is the batch of
rows, its row i of output depends only on row i of its inputs. The trainer's fast clipping path
(`dpsgd.BookkeepingClipper`) runs the whole batch through the graph at once, so it must know that no unit's
rows influence another unit's gradient; `Program.forward(..., rows=n)` checks every node's rule on the real
shapes of that very step and raises `NotRowwise` otherwise. The general path (`vmap` over units) needs no
rule: each unit's rows are a separate call.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import safetensors.torch
import torch

FORMAT = "sandbox-trainer-graph/1"
GRAPH_FILE = "graph.json"
TENSORS_FILE = "tensors.safetensors"

MAX_GRAPH_BYTES = 8 * 1024 * 1024
MAX_TENSORS_BYTES = 2 * 1024 * 1024 * 1024
MAX_NODES = 20_000
MAX_NAME_CHARS = 300
MAX_STRING_CHARS = 64
MAX_LIST_ITEMS = 64
MAX_NESTING = 4
MAX_PARAMETER_ELEMENTS = 50_000_000      # 200 MB of float32: far above any model this trains on a CPU
MAX_FIXED_ELEMENTS = 50_000_000          # buffers and constants together

FIXED_DTYPES = {torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                torch.bool}


class ExportRefused(Exception):
    """The exported model is malformed or does something the trainer refuses; the message says what."""


class NotRowwise(Exception):
    """Some node of this step's forward pass could mix rows of the batch: the fast path cannot be used."""


class Kind(Enum):
    """What a value in a row-checked forward pass depends on."""

    ROWS = "rows"          # a tensor whose dimension 0 is the batch; row i depends only on input row i
    FIXED = "fixed"        # a tensor that depends on no input row: parameters, buffers, constants
    COUNT = "count"        # an integer that depends on the number of rows (sym_size of dimension 0)
    LITERAL = "literal"    # anything else that depends on no row: numbers, shapes of other dimensions


# Row rules ---------------------------------------------------------------------------------------------
# A rule sees the node's arguments (normalised to positional form), their kinds, the op's result and the
# number of rows n, and returns the result's kind, or raises NotRowwise. It runs only when some argument
# is ROWS or COUNT; an op on fixed values alone is fixed.

RowRule = Callable[[list[Any], list[Any], Any, int], Any]


def _refuse(why: str) -> NotRowwise:
    return NotRowwise(why)


def _has(kind_tree: Any, wanted: Kind) -> bool:
    if isinstance(kind_tree, list):
        return any(_has(item, wanted) for item in kind_tree)
    return kind_tree is wanted


def _dim(value: Any, ndim: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _refuse("a dimension is not an integer")
    return value + ndim if value < 0 else value


def _rows_result(result: Any, n: int) -> Kind:
    if not (isinstance(result, torch.Tensor) and result.dim() >= 1 and result.shape[0] == n):
        raise _refuse("a result no longer has the rows as its dimension 0")
    return Kind.ROWS


def _only_first_rows(args: list[Any], kinds: list[Any], *, allow_count: Sequence[int] = ()) -> torch.Tensor:
    """Argument 0 is the rows tensor; no other argument may depend on the rows (or on their count, except
    at `allow_count` positions)."""
    if kinds[0] is not Kind.ROWS:
        raise _refuse("the rows reach this op in a position other than its input")
    for index, kind in enumerate(kinds[1:], start=1):
        if _has(kind, Kind.ROWS) or (index not in allow_count and _has(kind, Kind.COUNT)):
            raise _refuse("an argument besides the input depends on the rows")
    tensor = args[0]
    assert isinstance(tensor, torch.Tensor)
    return tensor


def pointwise(args: list[Any], kinds: list[Any], result: Any, n: int) -> Kind:
    """Elementwise with broadcasting: every rows tensor must keep its dimensions (so dimension 0 stays 0)."""
    if _has(kinds, Kind.COUNT):
        raise _refuse("an elementwise op uses the number of rows as a value")
    if not isinstance(result, torch.Tensor):
        raise _refuse("an elementwise op did not return a tensor")
    for value, kind in zip(args, kinds, strict=True):
        if kind is Kind.ROWS and value.dim() != result.dim():
            raise _refuse("broadcasting moved the rows away from dimension 0")
        if isinstance(kind, list):
            raise _refuse("an elementwise op got a list")
    return _rows_result(result, n)


def input_min_ndim(ndim: int) -> RowRule:
    """Ops that work within each slice along dimension 0 (linear maps the last dimension, and so on)."""

    def rule(args: list[Any], kinds: list[Any], result: Any, n: int) -> Kind:
        if _only_first_rows(args, kinds).dim() < ndim:
            raise _refuse(f"the input has fewer than {ndim} dimensions, so the op would act across rows")
        return _rows_result(result, n)

    return rule


def input_exact_ndim(ndim: int) -> RowRule:
    """Convolutions and pooling: batched only with exactly `ndim` dimensions (fewer means unbatched)."""

    def rule(args: list[Any], kinds: list[Any], result: Any, n: int) -> Kind:
        if _only_first_rows(args, kinds).dim() != ndim:
            raise _refuse(f"the input does not have exactly {ndim} dimensions (batch first)")
        return _rows_result(result, n)

    return rule


def dims_not_zero(position: int, *, extra_dim: int = 0, nonempty: bool = False) -> RowRule:
    """Ops with a dimension (or list of them) at `position` that must not be dimension 0."""

    def rule(args: list[Any], kinds: list[Any], result: Any, n: int) -> Kind:
        tensor = _only_first_rows(args, kinds)
        dims = args[position]
        dims = [dims] if isinstance(dims, int) else dims
        if not isinstance(dims, list) or (nonempty and not dims):
            raise _refuse("the op reduces over every dimension, rows included")
        if any(_dim(d, tensor.dim() + extra_dim) == 0 for d in dims):
            raise _refuse("the op works along dimension 0, across rows")
        return _rows_result(result, n)

    return rule


def normalized_shape_rule(args: list[Any], kinds: list[Any], result: Any, n: int) -> Kind:
    tensor = _only_first_rows(args, kinds)
    if not isinstance(args[1], list) or len(args[1]) >= tensor.dim():
        raise _refuse("the normalisation covers dimension 0, across rows")
    return _rows_result(result, n)


def reshape_rule(args: list[Any], kinds: list[Any], result: Any, n: int) -> Kind:
    """view/reshape: row-major order keeps each row's elements together iff dimension 0 stays n."""
    tensor = _only_first_rows(args, kinds, allow_count=(1,))
    shape, shape_kinds = args[1], kinds[1]
    if not isinstance(shape, list) or any(_has(kind, Kind.COUNT) for kind in shape_kinds[1:]):
        raise _refuse("the new shape uses the number of rows outside dimension 0")
    if tensor.shape[0] != n:
        raise _refuse("the input's dimension 0 is not the rows")
    return _rows_result(result, n)


def flatten_rule(args: list[Any], kinds: list[Any], result: Any, n: int) -> Kind:
    tensor = _only_first_rows(args, kinds)
    start, end = _dim(args[1], tensor.dim()), _dim(args[2], tensor.dim())
    if start == 0 and end != 0:
        raise _refuse("flatten merges the rows into other dimensions")
    return _rows_result(result, n)


def permute_rule(args: list[Any], kinds: list[Any], result: Any, n: int) -> Kind:
    tensor = _only_first_rows(args, kinds)
    if not args[1] or _dim(args[1][0], tensor.dim()) != 0:
        raise _refuse("permute moves the rows away from dimension 0")
    return _rows_result(result, n)


def transpose_rule(args: list[Any], kinds: list[Any], result: Any, n: int) -> Kind:
    tensor = _only_first_rows(args, kinds)
    first, second = _dim(args[1], tensor.dim()), _dim(args[2], tensor.dim())
    if 0 in (first, second) and first != second:
        raise _refuse("transpose moves the rows away from dimension 0")
    return _rows_result(result, n)


def t_rule(args: list[Any], kinds: list[Any], result: Any, n: int) -> Kind:
    if _only_first_rows(args, kinds).dim() >= 2:
        raise _refuse("t() moves the rows away from dimension 0")
    return _rows_result(result, n)


def expand_rule(args: list[Any], kinds: list[Any], result: Any, n: int) -> Kind:
    tensor = _only_first_rows(args, kinds, allow_count=(1,))
    sizes = args[1]
    if not isinstance(sizes, list) or len(sizes) != tensor.dim() or sizes[0] not in (-1, n) \
            or any(_has(kind, Kind.COUNT) for kind in kinds[1][1:]):
        raise _refuse("expand adds dimensions before the rows or repeats a row")
    return _rows_result(result, n)


def slice_rule(args: list[Any], kinds: list[Any], result: Any, n: int) -> Kind:
    """A slice along the rows is allowed only when it keeps all of them (`x[:, 1:]` exports one such)."""
    tensor = args[0]
    if kinds[0] is not Kind.ROWS or _has(kinds[1], Kind.ROWS) or _has(kinds[1], Kind.COUNT) \
            or _has(kinds[4], Kind.COUNT):
        raise _refuse("the rows reach a slice in a position other than its input")
    if _dim(args[1], tensor.dim()) == 0:
        if args[4] != 1 or not isinstance(result, torch.Tensor) or result.shape[0] != n:
            raise _refuse("a slice along dimension 0 drops or reorders rows")
    elif _has(kinds[2:4], Kind.COUNT) or _has(kinds[2:4], Kind.ROWS):
        raise _refuse("a slice's bounds depend on the number of rows")
    return _rows_result(result, n)


def tensors_along(position: int, *, extra_dim: int = 0) -> RowRule:
    """cat/stack: every tensor has the same number of dimensions and the op works along one other than 0."""

    def rule(args: list[Any], kinds: list[Any], result: Any, n: int) -> Kind:
        tensors = args[0]
        if _has(kinds[1:], Kind.ROWS) or _has(kinds, Kind.COUNT) or not isinstance(tensors, list) or not tensors:
            raise _refuse("cat/stack got its rows in an unexpected place")
        ndims = {tensor.dim() for tensor in tensors}
        if len(ndims) != 1 or _dim(args[position], ndims.pop() + extra_dim) == 0:
            raise _refuse("cat/stack works along dimension 0, across rows")
        return _rows_result(result, n)

    return rule


def split_rule(position: int) -> RowRule:
    """split/chunk/unbind along a dimension other than 0: each piece keeps the rows."""

    def rule(args: list[Any], kinds: list[Any], result: Any, n: int) -> list[Kind]:
        tensor = _only_first_rows(args, kinds)
        if _dim(args[position], tensor.dim()) == 0:
            raise _refuse("split/chunk/unbind works along dimension 0, across rows")
        if not isinstance(result, list | tuple):
            raise _refuse("split did not return a list")
        return [_rows_result(piece, n) for piece in result]

    return rule


def matmul_rule(args: list[Any], kinds: list[Any], result: Any, n: int) -> Kind:
    first, second = args[0], args[1]
    if _has(kinds, Kind.COUNT):
        raise _refuse("matmul got the number of rows")
    if kinds[0] is Kind.ROWS and kinds[1] is Kind.FIXED and first.dim() >= 2 and second.dim() <= 2:
        return _rows_result(result, n)
    if kinds[0] is Kind.ROWS and kinds[1] is Kind.ROWS and first.dim() == second.dim() >= 3:
        return _rows_result(result, n)
    raise _refuse("matmul contracts over the rows")


def bmm_rule(args: list[Any], kinds: list[Any], result: Any, n: int) -> Kind:
    if _has(kinds, Kind.COUNT) or any(value.dim() != 3 or value.shape[0] != n for value in args[:2]):
        raise _refuse("bmm with operands whose dimension 0 is not the rows")
    return _rows_result(result, n)


def mm_rule(args: list[Any], kinds: list[Any], result: Any, n: int) -> Kind:
    if kinds[0] is not Kind.ROWS or kinds[1] is not Kind.FIXED:
        raise _refuse("mm contracts over the rows")
    return _rows_result(result, n)


def addmm_rule(args: list[Any], kinds: list[Any], result: Any, n: int) -> Kind:
    if kinds[1] is not Kind.ROWS or kinds[0] is not Kind.FIXED or kinds[2] is not Kind.FIXED:
        raise _refuse("addmm contracts over the rows")
    return _rows_result(result, n)


def sym_size_rule(args: list[Any], kinds: list[Any], result: Any, n: int) -> Kind:
    if kinds[0] is not Kind.ROWS:
        raise _refuse("sym_size of an unexpected value")
    return Kind.COUNT if _dim(args[1], args[0].dim()) == 0 else Kind.LITERAL


def integer_rule(args: list[Any], kinds: list[Any], result: Any, n: int) -> Kind:
    if _has(kinds, Kind.ROWS):
        raise _refuse("integer arithmetic on a tensor")
    return Kind.COUNT


def getitem_rule(args: list[Any], kinds: list[Any], result: Any, n: int) -> Any:
    if not isinstance(kinds[0], list) or _has(kinds[1], Kind.COUNT) or _has(kinds[1], Kind.ROWS):
        raise _refuse("getitem on something other than an op's list of results")
    return kinds[0][args[1]]


# The allow-list ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OpSpec:
    name: str
    function: Callable[..., Any]
    row_rule: RowRule
    schema: Any = None          # the OpOverload's schema: argument names and defaults; None for operator.*


def _aten(name: str) -> Callable[..., Any]:
    packet, overload = name.split(".")
    op: Callable[..., Any] = getattr(getattr(torch.ops.aten, packet), overload)
    return op


def _integer_op(function: Callable[[int, int], int]) -> Callable[..., int]:
    def apply(first: Any, second: Any) -> int:
        if not all(isinstance(value, int) and not isinstance(value, bool) for value in (first, second)):
            raise TypeError("integer arithmetic on something that is not an integer")
        return function(first, second)

    return apply


def _getitem(container: Any, index: Any) -> Any:
    if not isinstance(container, list | tuple) or not isinstance(index, int) or isinstance(index, bool):
        raise TypeError("getitem is allowed only to pick one result of a multi-result op")
    return container[index]


_POINTWISE = [
    "relu.default", "hardtanh.default", "leaky_relu.default", "elu.default", "selu.default", "celu.default",
    "gelu.default", "silu.default", "mish.default", "sigmoid.default", "tanh.default", "softplus.default",
    "hardsigmoid.default", "hardswish.default", "log_sigmoid.default", "exp.default", "log.default",
    "log1p.default", "sqrt.default", "rsqrt.default", "abs.default", "neg.default", "square.default",
    "pow.Tensor_Scalar", "pow.Tensor_Tensor", "clamp.default", "clamp_min.default", "clamp_max.default",
    "add.Tensor", "add.Scalar", "sub.Tensor", "sub.Scalar", "rsub.Scalar", "rsub.Tensor", "mul.Tensor",
    "mul.Scalar", "div.Tensor", "div.Scalar", "maximum.default", "minimum.default",
    # Dropout draws from the generator; its mask is per element, or per (row, channel) for feature_dropout.
    "dropout.default", "feature_dropout.default",
    "clone.default", "contiguous.default", "detach.default",
]

_RULES: dict[str, RowRule] = {
    **{name: pointwise for name in _POINTWISE},
    "linear.default": input_min_ndim(2),
    "matmul.default": matmul_rule,
    "mm.default": mm_rule,
    "addmm.default": addmm_rule,
    "bmm.default": bmm_rule,
    "t.default": t_rule,
    "conv1d.default": input_exact_ndim(3),
    "conv1d.padding": input_exact_ndim(3),
    "conv2d.default": input_exact_ndim(4),
    "conv2d.padding": input_exact_ndim(4),
    "max_pool1d.default": input_exact_ndim(3),
    "max_pool2d.default": input_exact_ndim(4),
    "avg_pool1d.default": input_exact_ndim(3),
    "avg_pool2d.default": input_exact_ndim(4),
    "adaptive_avg_pool1d.default": input_exact_ndim(3),
    "adaptive_avg_pool2d.default": input_exact_ndim(4),
    "layer_norm.default": normalized_shape_rule,
    "rms_norm.default": normalized_shape_rule,
    "group_norm.default": input_min_ndim(2),
    "softmax.int": dims_not_zero(1),
    "log_softmax.int": dims_not_zero(1),
    "sum.dim_IntList": dims_not_zero(1, nonempty=True),
    "mean.dim": dims_not_zero(1, nonempty=True),
    "amax.default": dims_not_zero(1, nonempty=True),
    "amin.default": dims_not_zero(1, nonempty=True),
    "linalg_vector_norm.default": dims_not_zero(2, nonempty=True),
    "view.default": reshape_rule,
    "reshape.default": reshape_rule,
    "flatten.using_ints": flatten_rule,
    "unflatten.int": dims_not_zero(1),
    "permute.default": permute_rule,
    "transpose.int": transpose_rule,
    "unsqueeze.default": dims_not_zero(1, extra_dim=1),
    "squeeze.dim": dims_not_zero(1),
    "squeeze.dims": dims_not_zero(1, nonempty=True),
    "expand.default": expand_rule,
    "slice.Tensor": slice_rule,
    "select.int": dims_not_zero(1),
    "narrow.default": dims_not_zero(1),
    "cat.default": tensors_along(1),
    "stack.default": tensors_along(1, extra_dim=1),
    "split.Tensor": split_rule(2),
    "split_with_sizes.default": split_rule(2),
    "chunk.default": split_rule(2),
    "unbind.int": split_rule(1),
    "sym_size.int": sym_size_rule,
}


def _allowed_ops() -> dict[str, OpSpec]:
    table: dict[str, OpSpec] = {}
    for short, rule in _RULES.items():
        function = _aten(short)
        table[f"aten.{short}"] = OpSpec(f"aten.{short}", function, rule, function._schema)  # type: ignore[attr-defined]
    for name, integer in (("add", operator.add), ("sub", operator.sub), ("mul", operator.mul),
                          ("floordiv", operator.floordiv)):
        table[f"_operator.{name}"] = OpSpec(f"_operator.{name}", _integer_op(integer), integer_rule)
    table["_operator.getitem"] = OpSpec("_operator.getitem", _getitem, getitem_rule)
    return table


ALLOWED_OPS: dict[str, OpSpec] = _allowed_ops()

# torch.tensor(...) literals in forward export as lift_fresh_copy of a constant, then detach_ of that copy:
# the only in-place op accepted, and only on such a fresh copy, run as its out-of-place twin.
_LIFT = OpSpec("aten.lift_fresh_copy.default", _aten("clone.default"), pointwise,
               _aten("clone.default")._schema)  # type: ignore[attr-defined]
_DETACH_LIFTED = OpSpec("aten.detach_.default", _aten("detach.default"), pointwise,
                        _aten("detach.default")._schema)  # type: ignore[attr-defined]


# The program -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Ref:
    """A reference to the value of an earlier placeholder or node."""

    slot: int


@dataclass(frozen=True)
class Node:
    name: str
    op: OpSpec
    args: tuple[Any, ...]        # positional, with defaults filled in; Refs where the graph passes values
    kwargs: dict[str, Any]       # the keyword-only arguments given (alpha=...), if any
    slot: int


@dataclass(frozen=True)
class Placeholder:
    name: str
    kind: str                    # "parameter" | "buffer" | "constant" | "input"
    target: str                  # the state_dict name (parameters, buffers) or the constant's name
    slot: int


@dataclass
class Program:
    """A validated graph and its tensors, ready to run as pure tensor maths."""

    placeholders: list[Placeholder]
    nodes: list[Node]
    output: Ref
    parameters: dict[str, torch.Tensor]          # target -> float32 tensor: what training updates
    fixed: dict[str, torch.Tensor]               # buffers and constants: never written, by any op
    state_dict_keys: dict[str, str]              # the buyer module's state_dict key -> parameter/buffer target
    persistent_buffers: set[str] = field(default_factory=set)

    @property
    def device(self) -> torch.device:
        return next(iter(self.parameters.values())).device

    def to(self, device: torch.device | str) -> Program:
        """Move the parameters, buffers and constants to `device` (in place); returns self."""
        self.parameters = {name: tensor.to(device) for name, tensor in self.parameters.items()}
        self.fixed = {name: tensor.to(device) for name, tensor in self.fixed.items()}
        return self

    @property
    def slots(self) -> int:
        return len(self.placeholders) + len(self.nodes)

    def parameter_uses(self) -> dict[str, list[tuple[int, int]]]:
        """For each parameter, the (node index, argument position) pairs that use it."""
        by_slot = {placeholder.slot: placeholder.target for placeholder in self.placeholders
                   if placeholder.kind == "parameter"}
        uses: dict[str, list[tuple[int, int]]] = {target: [] for target in self.parameters}
        for index, node in enumerate(self.nodes):
            for position, arg in enumerate([*node.args, *node.kwargs.values()]):
                for ref in _refs(arg):
                    if ref.slot in by_slot:
                        uses[by_slot[ref.slot]].append((index, position))
        if self.output.slot in by_slot:
            uses[by_slot[self.output.slot]].append((-1, 0))
        return uses

    def forward(self, parameters: Mapping[str, torch.Tensor], x: torch.Tensor, *, rows: int | None = None,
                observe: Mapping[int, Callable[[list[Any], Any, Any], None]] | None = None) -> torch.Tensor:
        """The model's output for input `x`.

        With `rows`, every node's row rule is checked on this call's real shapes (NotRowwise if one fails).
        `observe` maps node indices to callbacks that see the node's arguments, result and (with `rows`) the
        result's Kind: the trainer's fast path records layer inputs and outputs there.
        """
        values: list[Any] = [None] * self.slots
        kinds: list[Any] = [None] * self.slots if rows is not None else []
        for placeholder in self.placeholders:
            if placeholder.kind == "input":
                values[placeholder.slot] = x
            elif placeholder.kind == "parameter":
                values[placeholder.slot] = parameters[placeholder.target]
            else:
                values[placeholder.slot] = self.fixed[placeholder.target]
            if rows is not None:
                kinds[placeholder.slot] = Kind.ROWS if placeholder.kind == "input" else Kind.FIXED
        if rows is not None and x.shape[0] != rows:
            raise NotRowwise("the input does not have the stated number of rows")
        for index, node in enumerate(self.nodes):
            args = [_resolve(arg, values) for arg in node.args]
            kwargs = {key: _resolve(value, values) for key, value in node.kwargs.items()} if node.kwargs else {}
            result = node.op.function(*args, **kwargs)
            values[node.slot] = result
            if rows is not None:
                arg_kinds = [_kind(arg, kinds) for arg in node.args]
                if node.kwargs and any(_kind(value, kinds) is not Kind.LITERAL for value in node.kwargs.values()):
                    raise NotRowwise(f"{node.op.name} got a computed keyword argument")
                if _has(arg_kinds, Kind.ROWS) or _has(arg_kinds, Kind.COUNT):
                    kinds[node.slot] = node.op.row_rule(args, arg_kinds, result, rows)
                else:
                    kinds[node.slot] = Kind.FIXED if isinstance(result, torch.Tensor) else _literal_kinds(result)
            if observe is not None and index in observe:
                observe[index](args, result, kinds[node.slot] if rows is not None else None)
        output = values[self.output.slot]
        if not isinstance(output, torch.Tensor):
            raise ExportRefused("the model's forward must return one tensor")
        if rows is not None and kinds[self.output.slot] is not Kind.ROWS:
            raise NotRowwise("the output is not one row per input row")
        return output


def _refs(value: Any) -> Iterator[Ref]:
    if isinstance(value, Ref):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _refs(item)


def _resolve(value: Any, values: list[Any]) -> Any:
    if isinstance(value, Ref):
        return values[value.slot]
    if isinstance(value, list):
        return [_resolve(item, values) for item in value]
    return value


def _kind(value: Any, kinds: list[Any]) -> Any:
    if isinstance(value, Ref):
        return kinds[value.slot]
    if isinstance(value, list):
        return [_kind(item, kinds) for item in value]
    return Kind.LITERAL


def _literal_kinds(result: Any) -> Any:
    if isinstance(result, list | tuple):
        return [Kind.FIXED if isinstance(item, torch.Tensor) else Kind.LITERAL for item in result]
    return Kind.LITERAL


# Loading -----------------------------------------------------------------------------------------------

def load_program(graph_bytes: bytes, tensor_bytes: bytes) -> Program:
    """Parse and check an export; ExportRefused says what is wrong. Nothing in the files is executed."""
    if len(graph_bytes) > MAX_GRAPH_BYTES:
        raise ExportRefused(f"the exported graph is over {MAX_GRAPH_BYTES // 2**20} MiB")
    if len(tensor_bytes) > MAX_TENSORS_BYTES:
        raise ExportRefused(f"the exported tensors are over {MAX_TENSORS_BYTES // 2**30} GiB")
    try:
        graph = json.loads(graph_bytes.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ExportRefused(f"the exported graph is not valid JSON: {exc}") from exc
    try:
        tensors = safetensors.torch.load(tensor_bytes)
    except Exception as exc:  # safetensors raises its own SafetensorError on any malformed file
        raise ExportRefused(f"the exported tensors are not a valid safetensors file: {exc}") from exc
    return _Loader(graph, tensors).program()


class _Loader:
    def __init__(self, graph: Any, tensors: dict[str, torch.Tensor]) -> None:
        if not isinstance(graph, dict) or graph.get("format") != FORMAT:
            raise ExportRefused(f"the exported graph is not in the {FORMAT} format")
        self.graph = graph
        self.tensors = tensors
        self.slots: dict[str, int] = {}
        self.produced_by: dict[int, str] = {}        # slot -> op name, for nodes
        self.placeholder_kind: dict[int, Placeholder] = {}

    def program(self) -> Program:
        mutated = self.graph.get("mutations", [])
        if mutated:
            names = ", ".join(str(name)[:MAX_NAME_CHARS] for name in mutated[:10]) \
                if isinstance(mutated, list) else "?"
            raise ExportRefused(f"the model mutates buffers or inputs during forward ({names}); buffers must not "
                                "change in training (batch norm's running statistics do: use layer or group "
                                "norm)")
        placeholders = self._placeholders()
        nodes = [self._node(raw, len(placeholders) + index) for index, raw in enumerate(self._list("nodes"))]
        output = self._output()
        parameters, fixed, persistent = self._tensors(placeholders)
        state_dict_keys = self._state_dict_keys(parameters, persistent)
        return Program(placeholders=placeholders, nodes=nodes, output=output, parameters=parameters, fixed=fixed,
                       state_dict_keys=state_dict_keys, persistent_buffers=persistent)

    def _list(self, key: str) -> list[Any]:
        value = self.graph.get(key)
        if not isinstance(value, list):
            raise ExportRefused(f"the exported graph has no list '{key}'")
        if len(value) > MAX_NODES:
            raise ExportRefused(f"the exported graph has more than {MAX_NODES} {key}")
        return value

    def _name(self, raw: Any, what: str) -> str:
        if not isinstance(raw, str) or not raw or len(raw) > MAX_NAME_CHARS:
            raise ExportRefused(f"a {what} name is missing or too long")
        return raw

    def _placeholders(self) -> list[Placeholder]:
        placeholders: list[Placeholder] = []
        seen_targets: set[str] = set()
        for raw in self._list("inputs"):
            if not isinstance(raw, dict):
                raise ExportRefused("an input of the exported graph is malformed")
            name = self._name(raw.get("name"), "placeholder")
            kind = raw.get("kind")
            if kind not in ("parameter", "buffer", "constant", "input"):
                raise ExportRefused(f"the model takes an input of a kind the trainer refuses: {str(kind)[:80]} "
                                    "(custom objects and effect tokens are not supported)")
            target = name if kind == "input" else self._name(raw.get("target"), "tensor")
            if name in self.slots:
                raise ExportRefused(f"the name {name} is defined twice")
            if kind != "input":
                if target in seen_targets:
                    raise ExportRefused(f"the tensor {target} is an input twice")
                if target not in self.tensors:
                    raise ExportRefused(f"the tensor {target} is missing from the exported tensors")
                seen_targets.add(target)
            if kind == "buffer" and raw.get("persistent", True) is False:
                kind = "constant"  # a non-persistent buffer is not in the state_dict: a constant to us
            placeholder = Placeholder(name=name, kind=kind, target=target, slot=len(placeholders))
            placeholders.append(placeholder)
            self.slots[name] = placeholder.slot
            self.placeholder_kind[placeholder.slot] = placeholder
        if sum(1 for placeholder in placeholders if placeholder.kind == "input") != 1:
            raise ExportRefused("the model's forward must take exactly one tensor (the rows' features)")
        extra = set(self.tensors) - seen_targets
        if extra:
            raise ExportRefused(f"the exported tensors hold {len(extra)} tensor(s) the graph never uses, "
                                f"e.g. {sorted(extra)[0][:MAX_NAME_CHARS]}")
        return placeholders

    def _node(self, raw: Any, slot: int) -> Node:
        if not isinstance(raw, dict):
            raise ExportRefused("a node of the exported graph is malformed")
        name = self._name(raw.get("name"), "node")
        if name in self.slots:
            raise ExportRefused(f"the name {name} is defined twice")
        op_kind, target = raw.get("op"), raw.get("target")
        if op_kind != "call_function":
            raise ExportRefused(f"node {name}: only calls to allowed operators are accepted, not "
                                f"'{str(op_kind)[:40]}' (submodules and higher-order ops are refused)")
        target = self._name(target, "operator")
        raw_args, raw_kwargs = raw.get("args", []), raw.get("kwargs", {})
        if not isinstance(raw_args, list) or not isinstance(raw_kwargs, dict):
            raise ExportRefused(f"node {name}: malformed arguments")
        args = [self._value(value, name, 0) for value in raw_args]
        kwargs = {str(key)[:MAX_NAME_CHARS]: self._value(value, name, 0) for key, value in raw_kwargs.items()}
        spec = ALLOWED_OPS.get(target)
        if target == _LIFT.name:
            spec = _LIFT
        elif target == _DETACH_LIFTED.name and len(args) == 1 and isinstance(args[0], Ref) \
                and self.produced_by.get(args[0].slot) == _LIFT.name:
            spec = _DETACH_LIFTED
        if spec is None:
            raise ExportRefused(self._refusal(name, target, args))
        positional, keywords = _normalised(spec, args, kwargs, name)
        node = Node(name=name, op=spec, args=tuple(positional), kwargs=keywords, slot=slot)
        self.slots[name] = slot
        self.produced_by[slot] = spec.name
        return node

    def _refusal(self, name: str, target: str, args: list[Any]) -> str:
        in_place = target.rsplit(".", 1)[0].endswith("_") or target.endswith(".out")
        if in_place and args and isinstance(args[0], Ref) and args[0].slot in self.placeholder_kind:
            placeholder = self.placeholder_kind[args[0].slot]
            if placeholder.kind in ("buffer", "constant", "parameter"):
                return (f"node {name}: {target} writes to the model's {placeholder.kind} {placeholder.target}; "
                        "buffers and parameters must not be changed by forward (batch norm's running "
                        "statistics are: use layer or group norm)")
        if in_place:
            return f"node {name}: {target} is an in-place op; the trainer accepts only out-of-place tensor maths"
        return (f"node {name}: the operator {target} is not allowed in a trained model (only pure tensor maths "
                "is: linear, conv, pooling, activations, layer/group norm, dropout, shape ops; batch_norm is "
                "refused because it mixes the rows of a batch)")

    def _value(self, value: Any, node: str, depth: int) -> Any:
        if depth > MAX_NESTING:
            raise ExportRefused(f"node {node}: arguments nested too deeply")
        if value is None or isinstance(value, bool | int):
            return value
        if isinstance(value, float):
            return value
        if isinstance(value, str):
            if len(value) > MAX_STRING_CHARS:
                raise ExportRefused(f"node {node}: a string argument is too long")
            return value
        if isinstance(value, list):
            if len(value) > MAX_LIST_ITEMS:
                raise ExportRefused(f"node {node}: a list argument is too long")
            return [self._value(item, node, depth + 1) for item in value]
        if isinstance(value, dict) and set(value) == {"node"}:
            slot = self.slots.get(value["node"]) if isinstance(value["node"], str) else None
            if slot is None:
                raise ExportRefused(f"node {node}: uses a value that is not defined before it")
            return Ref(slot)
        if isinstance(value, dict) and set(value) == {"float"} and value["float"] in ("inf", "-inf", "nan"):
            return float(value["float"])
        described = str(value.get("unsupported", "?"))[:80] if isinstance(value, dict) else type(value).__name__
        raise ExportRefused(f"node {node}: an argument of a type the trainer does not accept ({described})")

    def _output(self) -> Ref:
        raw = self.graph.get("output")
        if isinstance(raw, list) and len(raw) == 1:
            raw = raw[0]
        if not (isinstance(raw, dict) and set(raw) == {"node"} and raw["node"] in self.slots):
            raise ExportRefused("the model's forward must return exactly one tensor")
        return Ref(self.slots[raw["node"]])

    def _tensors(self, placeholders: list[Placeholder],
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], set[str]]:
        parameters: dict[str, torch.Tensor] = {}
        fixed: dict[str, torch.Tensor] = {}
        persistent: set[str] = set()
        for placeholder in placeholders:
            if placeholder.kind == "input":
                continue
            tensor = self.tensors[placeholder.target]
            if placeholder.kind == "parameter":
                if tensor.dtype != torch.float32:
                    raise ExportRefused(f"parameter {placeholder.target} is {tensor.dtype}; parameters must be "
                                        "float32")
                if not bool(torch.isfinite(tensor).all()):
                    raise ExportRefused(f"parameter {placeholder.target} holds NaN or infinite values")
                parameters[placeholder.target] = tensor.clone()
            else:
                if tensor.dtype not in FIXED_DTYPES:
                    raise ExportRefused(f"{placeholder.kind} {placeholder.target} has an unsupported dtype "
                                        f"{tensor.dtype}")
                fixed[placeholder.target] = tensor.clone()
                if placeholder.kind == "buffer":
                    persistent.add(placeholder.target)
        if sum(tensor.numel() for tensor in parameters.values()) > MAX_PARAMETER_ELEMENTS:
            raise ExportRefused(f"the model has more than {MAX_PARAMETER_ELEMENTS:,} parameters")
        if sum(tensor.numel() for tensor in fixed.values()) > MAX_FIXED_ELEMENTS:
            raise ExportRefused(f"the model's buffers and constants hold more than {MAX_FIXED_ELEMENTS:,} values")
        if not parameters:
            raise ExportRefused("the model has no parameters to train")
        return parameters, fixed, persistent

    def _state_dict_keys(self, parameters: dict[str, torch.Tensor], persistent: set[str]) -> dict[str, str]:
        raw = self.graph.get("state_dict")
        if not isinstance(raw, dict) or len(raw) > MAX_NODES:
            raise ExportRefused("the exported graph has no state_dict map")
        keys: dict[str, str] = {}
        for key, target in raw.items():
            key = self._name(key, "state_dict key")
            if target not in parameters and target not in persistent:
                raise ExportRefused(f"state_dict key {key} names no parameter or persistent buffer")
            keys[key] = target
        missing = set(parameters) - set(keys.values())
        if missing:
            raise ExportRefused(f"parameter {sorted(missing)[0]} is not in the module's state_dict")
        return keys


def _normalised(spec: OpSpec, args: list[Any], kwargs: dict[str, Any], node: str,
                ) -> tuple[list[Any], dict[str, Any]]:
    """The op's positional arguments in schema order with defaults filled in, and its keyword-only ones;
    unknown keywords are refused."""
    if spec.schema is None:
        if kwargs or len(args) != 2:
            raise ExportRefused(f"node {node}: {spec.name} takes exactly two positional arguments")
        return args, {}
    arguments = [argument for argument in spec.schema.arguments if not argument.kwarg_only]
    keyword_only = {argument.name for argument in spec.schema.arguments if argument.kwarg_only}
    if len(args) > len(arguments):
        raise ExportRefused(f"node {node}: {spec.name} got too many arguments")
    unknown = set(kwargs) - {argument.name for argument in arguments} - keyword_only
    if unknown:
        raise ExportRefused(f"node {node}: {spec.name} got unknown keyword {sorted(unknown)[0][:40]}")
    positional = list(args)
    for argument in arguments[len(args):]:
        if argument.name in kwargs:
            positional.append(kwargs[argument.name])
        elif argument.has_default_value():
            default = argument.default_value
            positional.append(list(default) if isinstance(default, tuple) else default)
        else:
            raise ExportRefused(f"node {node}: {spec.name} is missing its argument {argument.name}")
    return positional, {name: value for name, value in kwargs.items() if name in keyword_only}
