"""DP-SGD with the patient as the privacy unit: Poisson sampling of units, per-unit clipping, Gaussian noise.

One step, for sample rate q over n_units units and clipping norm C:
1. every unit joins the batch independently with probability q (all of its rows come with it);
2. each unit's gradient is the gradient of the summed losses of its rows, over all parameters together;
3. it is scaled to L2 norm at most C (a unit whose gradient is not finite contributes nothing);
4. the scaled gradients are summed, N(0, (sigma C)^2) noise is added to every coordinate, the result is
   divided by the expected batch size q * n_units, and plain SGD takes the step (no momentum: each step's
   update is then a post-processing of that step's noisy sum alone).

The accountant (Opacus' RDPAccountant) counts every step, empty batches included. The noise generator and
the sampler are seeded from the OS's random source (`secrets`) for every run.

Two ways to get the clipped sum, with identical results:
- `BookkeepingClipper` (fast; Bu et al. 2023, "book-keeping"): one forward of the whole batch, one backward
  to the outputs of the nodes that hold parameters only (parameters do not require grad): linear, x @ W
  (matmul, mm, addmm), conv2d, layer_norm, and x + b or x * s along the last dimension. A unit's
  gradient norm comes from those layers' inputs and output gradients (for linear layers the ghost norm, or
  the per-unit gradient itself when that is smaller; for conv2d the per-unit gradients, all at once by one
  grouped convolution), and the clipped sum from one weighted product per layer: no second backward, no
  per-unit gradient of the whole model. It needs every parameter used once, as the weight or
  bias of one such layer, and a graph whose rows never meet: `graph.Program.forward(rows=n)` checks that on
  every step's real shapes, so a unit's gradient cannot depend on another unit's rows.
- `VmapClipper` (any allowed graph): `torch.func.vmap` over units of `grad` of a unit's loss, each unit's
  rows padded to the public `max_rows_per_unit`, so each unit's computation sees nothing of the others, not
  even their number of rows. Used when the graph does not fit the fast path, and for a step where the fast
  path's row check fails.
"""

from __future__ import annotations

import contextlib
import math
import secrets
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import get_noise_multiplier

from sandbox_trainer.graph import ExportRefused, Kind, NotRowwise, Program, Ref

NORM_EPSILON = 1e-6           # clip factor min(1, C / (norm + 1e-6)), as Opacus computes it
VMAP_CHUNK_ELEMENTS = 2**25   # per-unit gradients held at once by the vmap path (128 MiB of float32)
PROGRESS_EVERY = 0.02         # report progress every 2% of the steps


@dataclass(frozen=True)
class DpSgdConfig:
    task: str                   # "classification" (cross-entropy on logits) | "regression" (squared error)
    n_outputs: int
    learning_rate: float
    max_grad_norm: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    n_units: int
    max_rows_per_unit: int
    delta: float

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.n_units


def calibrate_noise(*, epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest noise multiplier (to Opacus' tolerance) whose RDP account stays within (epsilon, delta)."""
    with _quiet_accountant():
        return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                          steps=steps, accountant="rdp", epsilon_tolerance=0.01))


def spent_epsilon(accountant: RDPAccountant, delta: float) -> float:
    with _quiet_accountant():
        return float(accountant.get_epsilon(delta))


@contextlib.contextmanager
def _quiet_accountant() -> Iterator[None]:
    # Opacus warns when the best RDP order is the largest it tries; the bound it returns is still valid.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        yield


def summed_loss(output: torch.Tensor, target: torch.Tensor, task: str) -> torch.Tensor:
    """The sum of `row_losses`, in one op where torch has one."""
    if task == "classification":
        return F.cross_entropy(output, target, reduction="sum")
    return row_losses(output, target, task).sum()


def row_losses(output: torch.Tensor, target: torch.Tensor, task: str) -> torch.Tensor:
    """Each row's loss: cross-entropy of the logits for classification, mean squared error for regression."""
    if task == "classification":
        return F.cross_entropy(output, target, reduction="none")
    return (output - target.reshape(output.shape)).square().mean(dim=-1)


# The rows, by unit --------------------------------------------------------------------------------------

@dataclass
class UnitBatch:
    """The rows of one step's sampled units, sorted by unit.

    `row_unit[i]` is the batch position (0..units-1) of row i's unit and `row_position[i]` its place among
    that unit's rows; both are None when every unit of the data set has exactly one row.
    """

    x: torch.Tensor
    y: torch.Tensor
    units: int
    row_unit: torch.Tensor | None = None
    row_position: torch.Tensor | None = None
    max_rows: int = 1

    def unit_of_rows(self) -> torch.Tensor:
        return self.row_unit if self.row_unit is not None else torch.arange(self.units, device=self.x.device)

    def padded(self, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(units, rows, ...) blocks of x and y, zero-padded, and the mask of real rows."""
        unit, position = self.unit_of_rows(), self.row_position
        if position is None:
            position = torch.zeros(self.x.shape[0], dtype=torch.long, device=self.x.device)
        x = self.x.new_zeros((self.units, rows, *self.x.shape[1:]))
        y = self.y.new_zeros((self.units, rows, *self.y.shape[1:]))
        mask = torch.zeros((self.units, rows), dtype=torch.bool, device=self.x.device)
        x[unit, position] = self.x
        y[unit, position] = self.y
        mask[unit, position] = True
        return x, y, mask

    def blocks(self, values: torch.Tensor) -> torch.Tensor:
        """Per-row values (rows, T, k) as per-unit blocks (units, max_rows * T, k), zero-padded."""
        if self.row_unit is None or self.row_position is None:
            return values
        block = values.new_zeros((self.units, self.max_rows, *values.shape[1:]))
        block[self.row_unit, self.row_position] = values
        return block.reshape(self.units, self.max_rows * values.shape[1], values.shape[2])

    def per_unit(self, values: torch.Tensor) -> torch.Tensor:
        """Per-row values (rows, ...) summed per unit (units, ...)."""
        if self.row_unit is None:
            return values
        return values.new_zeros((self.units, *values.shape[1:])).index_add_(0, self.row_unit, values)


class UnitRows:
    """The training rows grouped by privacy unit (ids 0..n_units-1), at most `max_rows_per_unit` each."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, unit: torch.Tensor, *, n_units: int,
                 max_rows_per_unit: int) -> None:
        order = torch.argsort(unit, stable=True)
        self.x, self.y = x[order].contiguous(), y[order].contiguous()
        self.counts = torch.bincount(unit, minlength=n_units)
        if self.counts.numel() > n_units:
            raise ValueError("a row's unit id is not below n_units")
        if self.counts.numel() and int(self.counts.max()) > max_rows_per_unit:
            raise ValueError("a unit has more rows than max_rows_per_unit")
        self.starts = torch.cumsum(self.counts, 0) - self.counts
        self.n_units = n_units
        self.single = bool((self.counts <= 1).all())
        self.dense = bool((self.counts == 1).all())    # row i is unit i's only row

    def batch(self, units: np.ndarray) -> UnitBatch:
        """The rows of `units` (sorted ids); units without rows drop out, as they contribute nothing."""
        chosen = torch.from_numpy(units).long().to(self.x.device)
        if self.dense:
            return UnitBatch(self.x.index_select(0, chosen), self.y.index_select(0, chosen),
                             units=int(chosen.numel()))
        counts = self.counts[chosen]
        chosen, counts = chosen[counts > 0], counts[counts > 0]
        if self.single:
            rows = self.starts[chosen]
            return UnitBatch(self.x[rows], self.y[rows], units=int(chosen.numel()))
        row_unit = torch.repeat_interleave(torch.arange(chosen.numel(), device=counts.device), counts)
        first = torch.cumsum(counts, 0) - counts
        position = torch.arange(row_unit.numel(), device=counts.device) - first[row_unit]
        rows = self.starts[chosen][row_unit] + position
        return UnitBatch(self.x[rows], self.y[rows], units=int(chosen.numel()), row_unit=row_unit,
                         row_position=position, max_rows=int(counts.max()) if counts.numel() else 1)


def poisson_units(n_units: int, sample_rate: float, rng: np.random.Generator) -> np.ndarray:
    """Each of n_units ids independently with probability `sample_rate`, sorted: the gaps between chosen ids
    are geometric, which draws O(batch) numbers instead of n_units."""
    if sample_rate >= 1:
        return np.arange(n_units)
    chosen: list[np.ndarray] = []
    last = -1
    draw = int(n_units * sample_rate + 6 * math.sqrt(n_units * sample_rate) + 16)
    while True:
        ids = last + np.cumsum(rng.geometric(sample_rate, size=draw))
        beyond = ids >= n_units
        if beyond.any():
            chosen.append(ids[: int(np.argmax(beyond))])
            return np.concatenate(chosen)
        chosen.append(ids)
        last = int(ids[-1])


# Clipping ---------------------------------------------------------------------------------------------

@dataclass
class ClipResult:
    sums: dict[str, torch.Tensor]     # parameter -> sum over units of the clipped gradients
    norms: torch.Tensor               # each unit's gradient norm before clipping (NaN/inf where not finite)


class Clipper(Protocol):
    name: str

    def clipped_sum(self, parameters: dict[str, torch.Tensor], batch: UnitBatch) -> ClipResult: ...


def _clip_factors(squared_norms: torch.Tensor, max_grad_norm: float) -> tuple[torch.Tensor, torch.Tensor, bool]:
    norms = squared_norms.sqrt()
    finite = torch.isfinite(norms)
    factors = (max_grad_norm / (norms + NORM_EPSILON)).clamp(max=1.0)
    all_finite = bool(finite.all())
    if not all_finite:
        factors = torch.where(finite, factors, torch.zeros_like(factors))
    return norms, factors, all_finite


class VmapClipper:
    """Per-unit gradients by vmap(grad) over units padded to `max_rows_per_unit` rows: works on any graph."""

    name = "vmap"

    def __init__(self, program: Program, config: DpSgdConfig) -> None:
        self.program, self.config = program, config
        self.rows = config.max_rows_per_unit
        total = sum(tensor.numel() for tensor in program.parameters.values())
        self.chunk = max(1, VMAP_CHUNK_ELEMENTS // max(1, total))
        task = config.task

        def unit_loss(parameters: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                      mask: torch.Tensor) -> torch.Tensor:
            losses = row_losses(program.forward(parameters, x), y, task)
            return torch.where(mask, losses, torch.zeros_like(losses)).sum()

        self._per_unit = torch.func.vmap(torch.func.grad(unit_loss), in_dims=(None, 0, 0, 0),
                                         randomness="different")

    def clipped_sum(self, parameters: dict[str, torch.Tensor], batch: UnitBatch) -> ClipResult:
        x, y, mask = batch.padded(self.rows)
        sums = {name: torch.zeros_like(tensor) for name, tensor in parameters.items()}
        all_norms = []
        for start in range(0, batch.units, self.chunk):
            stop = start + self.chunk
            grads = self._per_unit(parameters, x[start:stop], y[start:stop], mask[start:stop])
            flat = {name: grad.reshape(grad.shape[0], -1) for name, grad in grads.items()}
            squared = sum(grad.square().sum(dim=1) for grad in flat.values())
            assert isinstance(squared, torch.Tensor)
            norms, factors, all_finite = _clip_factors(squared, self.config.max_grad_norm)
            all_norms.append(norms)
            for name, grad in flat.items():
                if not all_finite:
                    grad = torch.where(torch.isfinite(norms)[:, None], grad, torch.zeros_like(grad))
                sums[name] += (factors @ grad).reshape(sums[name].shape)
        norms = torch.cat(all_norms) if all_norms else torch.zeros(0, device=x.device)
        return ClipResult(sums, norms)


@dataclass
class _Layer:
    """A node whose weight and/or bias are parameters (each used only here): linear, matmul (x @ W, with
    addmm's bias), conv2d, layer_norm, or an elementwise bias (x + b) or scale (x * s) on the last dimension."""

    kind: str                   # "linear" | "matmul" | "conv2d" | "layer_norm" | "bias" | "scale"
    input_at: int               # where the node takes the rows
    weight: str | None          # the parameter targets, where they are parameters
    bias: str | None
    node: Any = None
    inputs: Any = field(default=None, repr=False)   # this step's arguments of the node
    output: Any = field(default=None, repr=False)   # this step's output of the node


# op -> (kind, position of the rows, of the weight, of the bias)
_LAYER_SLOTS: dict[str, tuple[str, int, int | None, int | None]] = {
    "aten.linear.default": ("linear", 0, 1, 2), "aten.conv2d.default": ("conv2d", 0, 1, 2),
    "aten.layer_norm.default": ("layer_norm", 0, 2, 3), "aten.matmul.default": ("matmul", 0, 1, None),
    "aten.mm.default": ("matmul", 0, 1, None), "aten.addmm.default": ("matmul", 1, 2, 0),
}
# x + b and x * s: the parameter may stand on either side
_ELEMENTWISE_SLOTS = {"aten.add.Tensor": "bias", "aten.mul.Tensor": "scale"}


class NotApplicable(Exception):
    """The graph does not fit the fast path (the message says why); the vmap path is used."""


class BookkeepingClipper:
    """Per-unit norms from layer activations and output gradients; clipped sums by one product per layer."""

    name = "bookkeeping"

    def __init__(self, program: Program, config: DpSgdConfig) -> None:
        self.program, self.config = program, config
        self.layers = self._plan(program)
        placed = {name for layer in self.layers.values() for name in (layer.weight, layer.bias) if name}
        self.unused = [name for name in program.parameters if name not in placed]   # gradient 0, noise only

    @staticmethod
    def _plan(program: Program) -> dict[int, _Layer]:
        parameter_slots = {placeholder.slot: placeholder.target for placeholder in program.placeholders
                           if placeholder.kind == "parameter"}
        layers: dict[int, _Layer] = {}
        for target, uses in program.parameter_uses().items():
            if not uses:
                continue
            if len(uses) != 1:
                raise NotApplicable(f"parameter {target} is used {len(uses)} times")
            index, position = uses[0]
            node = program.nodes[index] if index >= 0 else None
            if node is not None and node.op.name in _ELEMENTWISE_SLOTS and position in (0, 1) and not node.kwargs:
                kind = _ELEMENTWISE_SLOTS[node.op.name]
                input_at = 1 - position
                weight_at, bias_at = (position, None) if kind == "scale" else (None, position)
            elif node is not None and node.op.name in _LAYER_SLOTS and not node.kwargs:
                kind, input_at, weight_at, bias_at = _LAYER_SLOTS[node.op.name]
            else:
                raise NotApplicable(f"parameter {target} is used outside the layers the fast path knows")
            if position not in (weight_at, bias_at):
                raise NotApplicable(f"parameter {target} is the input of a {kind}")
            if isinstance(node.args[input_at], Ref) and node.args[input_at].slot in parameter_slots:
                raise NotApplicable(f"a {kind}'s input is a parameter")
            if kind == "conv2d" and not (node.args[6] == 1 and all(
                    isinstance(value, list) and all(isinstance(item, int) for item in value)
                    for value in node.args[3:6])):
                raise NotApplicable("a conv2d with groups or computed strides")
            layer = layers.setdefault(index, _Layer(kind=kind, input_at=input_at, weight=None, bias=None,
                                                    node=node))
            if position == weight_at:
                layer.weight = target
            else:
                layer.bias = target
        if not layers:
            raise NotApplicable("no parameters")
        return layers

    def clipped_sum(self, parameters: dict[str, torch.Tensor], batch: UnitBatch) -> ClipResult:
        rows = batch.x.shape[0]
        if rows == 0:
            return ClipResult({name: torch.zeros_like(tensor) for name, tensor in parameters.items()},
                              torch.zeros(0, device=batch.x.device))

        def observe(layer: _Layer) -> Callable[[list[Any], Any, Any], None]:
            def record(args: list[Any], result: Any, kind: Any) -> None:
                if kind is not Kind.ROWS:
                    raise NotRowwise(f"a {layer.kind} does not act on the rows")
                if not result.requires_grad:
                    result.requires_grad_()
                layer.inputs, layer.output = args, result

            return record

        layers = list(self.layers.values())
        try:
            output = self.program.forward(parameters, batch.x, rows=rows,
                                          observe={index: observe(layer) for index, layer in self.layers.items()})
            if output.shape != (rows, self.config.n_outputs):
                raise NotRowwise("the output's shape changed with the number of rows")
            loss = summed_loss(output, batch.y, self.config.task)
            outputs = [layer.output for layer in layers]
            grads: list[torch.Tensor | None] = [None] * len(outputs)
            if loss.requires_grad:
                grads = list(torch.autograd.grad(loss, outputs, allow_unused=True))
            with torch.no_grad():
                return self._clip(parameters, batch, layers, grads)
        finally:
            for layer in layers:
                layer.inputs = layer.output = None

    def _clip(self, parameters: dict[str, torch.Tensor], batch: UnitBatch, layers: list[_Layer],
              grads: list[torch.Tensor | None]) -> ClipResult:
        pieces: list[_Pieces] = []
        squared = torch.zeros(batch.units, device=batch.x.device)
        for layer, grad in zip(layers, grads, strict=True):
            output = layer.output
            assert isinstance(output, torch.Tensor)
            piece = _pieces(layer, grad if grad is not None else torch.zeros_like(output), batch)
            squared += piece.squared_norms
            pieces.append(piece)
        norms, factors, all_finite = _clip_factors(squared, self.config.max_grad_norm)
        if not all_finite:
            bad_units = ~torch.isfinite(norms)
            for piece in pieces:
                piece.drop(bad_units, batch)
        row_factors = factors[batch.row_unit] if batch.row_unit is not None else factors
        sums = {name: torch.zeros_like(parameters[name]) for name in self.unused}
        for piece in pieces:
            for name, value in piece.weighted_sums(factors, row_factors).items():
                sums[name] = value.reshape(parameters[name].shape)
        return ClipResult(sums, norms)


def _check_output(output: torch.Tensor, rows: int, n_outputs: int) -> None:
    if output.shape != (rows, n_outputs) or not output.is_floating_point():
        raise ExportRefused(f"the model returned {tuple(output.shape)} ({output.dtype}) for {rows} rows; "
                            f"expected ({rows}, {n_outputs}) floating point")


@dataclass
class _Pieces:
    """One layer's per-row pieces of this step: enough for its share of each unit's squared norm, and for the
    clipped sum of its parameters' gradients."""

    weight: str | None
    bias: str | None
    squared_norms: torch.Tensor                # (units,)
    activations: torch.Tensor | None = None    # (rows, T, d): what multiplies the weight, per position
    gradients: torch.Tensor | None = None      # (rows, T, p): the output gradient, per position
    unit_weight: torch.Tensor | None = None    # (units, p, d): per-unit weight gradients, where computed
    row_weight: torch.Tensor | None = None     # (rows, k): per-row weight gradients (layer_norm, scale)
    row_bias: torch.Tensor | None = None       # (rows, p): per-row bias gradients
    transposed: bool = False                   # the weight is stored (d, p), as x @ W takes it

    def drop(self, bad_units: torch.Tensor, batch: UnitBatch) -> None:
        """Zero what belongs to units whose gradient is not finite (their factor is 0; 0 * NaN is NaN)."""
        bad_rows = bad_units[batch.row_unit] if batch.row_unit is not None else bad_units
        for name in ("activations", "gradients", "row_weight", "row_bias"):
            value = getattr(self, name)
            if value is not None:
                mask = bad_rows.reshape(-1, *([1] * (value.dim() - 1)))
                setattr(self, name, torch.where(mask, torch.zeros_like(value), value))
        if self.unit_weight is not None:
            self.unit_weight = torch.where(bad_units[:, None, None], torch.zeros_like(self.unit_weight),
                                           self.unit_weight)

    def weighted_sums(self, factors: torch.Tensor, row_factors: torch.Tensor) -> dict[str, torch.Tensor]:
        sums: dict[str, torch.Tensor] = {}
        if self.weight is not None:
            if self.unit_weight is not None:
                sums[self.weight] = torch.einsum("u,upd->pd", factors, self.unit_weight)
            elif self.row_weight is not None:
                sums[self.weight] = row_factors @ self.row_weight
            else:
                assert self.activations is not None and self.gradients is not None
                activations = self.activations.reshape(-1, self.activations.shape[-1])
                gradients = self.gradients.reshape(-1, self.gradients.shape[-1])
                positions = self.activations.shape[1]
                scale = row_factors.repeat_interleave(positions) if positions > 1 else row_factors
                # Scale the narrower side, and let it lead the product (BLAS is faster with the small side
                # first); the sum is the same.
                if activations.shape[1] <= gradients.shape[1]:
                    sums[self.weight] = ((activations * scale[:, None]).T @ gradients).T
                else:
                    sums[self.weight] = (gradients * scale[:, None]).T @ activations
            if self.transposed:
                sums[self.weight] = sums[self.weight].T
        if self.bias is not None:
            assert self.row_bias is not None
            sums[self.bias] = row_factors @ self.row_bias
        return sums


def _pieces(layer: _Layer, grad: torch.Tensor, batch: UnitBatch) -> _Pieces:
    """This step's pieces of one layer (linear here; conv2d and layer_norm in their own functions)."""
    rows = batch.x.shape[0]
    args = layer.inputs
    if layer.kind == "layer_norm":
        return _layer_norm_pieces(layer, grad, batch)
    if layer.kind == "conv2d":
        return _conv_pieces(layer, grad, batch)
    if layer.kind in ("bias", "scale"):
        return _elementwise_pieces(layer, grad, batch)
    value = args[layer.input_at]
    if layer.kind == "matmul" and (args[layer.input_at + 1].dim() != 2
                                   or (layer.bias is not None and args[0].dim() != 1)):
        raise NotRowwise("x @ W with a W or bias the fast path does not handle")
    activations = value.reshape(rows, -1, value.shape[-1])
    gradients = grad.reshape(rows, -1, grad.shape[-1])
    positions, width, height = activations.shape[1], activations.shape[2], gradients.shape[2]
    if batch.row_unit is None and positions == 1 and layer.weight is not None:
        # One row per unit, one position: |g a^T|^2 = |g|^2 |a|^2, and the bias adds |g|^2.
        gradient_norms = torch.linalg.vector_norm(gradients, dim=(1, 2)).square_()
        activation_norms = torch.linalg.vector_norm(activations, dim=(1, 2)).square_()
        if layer.bias is not None:
            activation_norms += 1.0
            piece_bias = gradients.reshape(rows, height)
        else:
            piece_bias = None
        return _Pieces(weight=layer.weight, bias=layer.bias, squared_norms=gradient_norms * activation_norms,
                       activations=activations, gradients=gradients, row_bias=piece_bias,
                       transposed=layer.kind == "matmul")
    piece = _Pieces(weight=layer.weight, bias=layer.bias, squared_norms=torch.zeros(batch.units, device=grad.device),
                    transposed=layer.kind == "matmul")
    if layer.bias is not None:
        piece.row_bias = gradients.sum(dim=1)
        piece.squared_norms = piece.squared_norms + batch.per_unit(piece.row_bias).square().sum(dim=1)
    if layer.weight is None:
        return piece
    unit_activations, unit_gradients = batch.blocks(activations), batch.blocks(gradients)
    span = unit_activations.shape[1]
    if span * span * (width + height) < span * width * height:
        # Ghost norm: sum over position pairs of (a_s . a_t)(g_s . g_t), cheaper than the gradient itself.
        gram_a = torch.bmm(unit_activations, unit_activations.transpose(1, 2))
        gram_g = torch.bmm(unit_gradients, unit_gradients.transpose(1, 2))
        piece.squared_norms = piece.squared_norms + (gram_a * gram_g).sum(dim=(1, 2))
        piece.activations, piece.gradients = activations, gradients
    else:
        unit_weight = torch.bmm(unit_gradients.transpose(1, 2), unit_activations)   # (units, p, d)
        piece.squared_norms = piece.squared_norms + unit_weight.square().sum(dim=(1, 2))
        piece.unit_weight = unit_weight
    return piece


def _conv_pieces(layer: _Layer, grad: torch.Tensor, batch: UnitBatch) -> _Pieces:
    """conv2d (groups 1): every row's weight gradient at once, as one grouped convolution of the input with
    the output gradients (rows as groups; the forward's stride and dilation trade places), then per unit."""
    value, weight = layer.inputs[0], layer.inputs[1]
    rows, channels = value.shape[0], value.shape[1]
    out_channels, kernel = weight.shape[0], tuple(weight.shape[2:])
    stride, padding, dilation = _pair(layer.inputs[3]), _pair(layer.inputs[4]), _pair(layer.inputs[5])
    piece = _Pieces(weight=layer.weight, bias=layer.bias, squared_norms=torch.zeros(batch.units, device=grad.device))
    if layer.bias is not None:
        piece.row_bias = grad.sum(dim=(2, 3))
        piece.squared_norms = piece.squared_norms + batch.per_unit(piece.row_bias).square().sum(dim=1)
    if layer.weight is None:
        return piece
    correlated = F.conv2d(value.transpose(0, 1), grad.reshape(rows * out_channels, 1, *grad.shape[2:]),
                          padding=padding, stride=dilation, dilation=stride, groups=rows)
    per_row = correlated[..., : kernel[0], : kernel[1]].reshape(channels, rows, out_channels, -1)
    unit_weight = batch.per_unit(per_row.permute(1, 2, 0, 3).reshape(rows, out_channels, -1))
    piece.squared_norms = piece.squared_norms + unit_weight.square().sum(dim=(1, 2))
    piece.unit_weight = unit_weight                               # (units, C_out, C * kh * kw)
    return piece


def _elementwise_pieces(layer: _Layer, grad: torch.Tensor, batch: UnitBatch) -> _Pieces:
    """x + b or x * s, with b or s a vector along x's last dimension: per-row gradients summed over the
    row's positions."""
    value = layer.inputs[layer.input_at]
    parameter = layer.inputs[1 - layer.input_at]
    width = grad.shape[-1]
    if parameter.dim() != 1 or parameter.shape[0] != width or value.shape != grad.shape:
        raise NotRowwise(f"an elementwise {layer.kind} that does not run along the last dimension")
    rows = batch.x.shape[0]
    per_row = (grad if layer.kind == "bias" else grad * value).reshape(rows, -1, width).sum(dim=1)
    squared = batch.per_unit(per_row).square().sum(dim=1)
    if layer.kind == "bias":
        return _Pieces(weight=None, bias=layer.bias, squared_norms=squared, row_bias=per_row)
    return _Pieces(weight=layer.weight, bias=None, squared_norms=squared, row_weight=per_row)


def _layer_norm_pieces(layer: _Layer, grad: torch.Tensor, batch: UnitBatch) -> _Pieces:
    args = layer.inputs
    rows, normalized = batch.x.shape[0], len(args[1])
    dims = tuple(range(-normalized, 0))
    value = args[0]
    mean = value.mean(dim=dims, keepdim=True)
    variance = value.var(dim=dims, keepdim=True, unbiased=False)
    eps = args[4] if isinstance(args[4], float) else 1e-5
    standardised = (value - mean) * torch.rsqrt(variance + eps)
    width = math.prod(value.shape[-normalized:])
    piece = _Pieces(weight=layer.weight, bias=layer.bias, squared_norms=torch.zeros(batch.units, device=grad.device))
    if layer.weight is not None:
        piece.row_weight = (grad * standardised).reshape(rows, -1, width).sum(dim=1)
        piece.squared_norms = piece.squared_norms + batch.per_unit(piece.row_weight).square().sum(dim=1)
    if layer.bias is not None:
        piece.row_bias = grad.reshape(rows, -1, width).sum(dim=1)
        piece.squared_norms = piece.squared_norms + batch.per_unit(piece.row_bias).square().sum(dim=1)
    return piece


def _pair(value: Any) -> tuple[int, int]:
    values = list(value) if isinstance(value, list | tuple) else [value]
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


# Choosing a clipper and training -------------------------------------------------------------------------

def row_shape(input_shape: int | tuple[int, ...]) -> tuple[int, ...]:
    """One row's shape: (n_features,) for a table, (channels, height, width) for images."""
    return (input_shape,) if isinstance(input_shape, int) else tuple(input_shape)


def synthetic_batch(input_shape: int | tuple[int, ...], config: DpSgdConfig, *, units: int = 3,
                    device: torch.device | None = None) -> tuple[UnitRows, np.ndarray]:
    """Random rows shaped like the real data (no data involved): for dry runs before the data arrives.

    `input_shape` is one row's shape, or its number of features for a table."""
    per_unit = [1 + (index % config.max_rows_per_unit) for index in range(units)]
    unit = torch.repeat_interleave(torch.arange(units), torch.tensor(per_unit))
    x = torch.randn(unit.numel(), *row_shape(input_shape))
    if config.task == "classification":
        y = torch.randint(0, config.n_outputs, (unit.numel(),))
    else:
        y = torch.randn(unit.numel(), config.n_outputs)
    rows = UnitRows(x.to(device), y.to(device), unit.to(device), n_units=units,
                    max_rows_per_unit=config.max_rows_per_unit)
    return rows, np.arange(units)


def choose_clipper(program: Program, input_shape: int | tuple[int, ...],
                   config: DpSgdConfig) -> tuple[Clipper, VmapClipper, str]:
    """The clipper to train with, the vmap fallback, and why the fast path was not taken ("" if it was).

    Runs both on random rows (never the data) of one row's `input_shape` (or number of features): a model
    that cannot be trained per unit is refused here, with the error it raised, before any data is fetched.
    """
    device = program.device
    shape = row_shape(input_shape)
    for count in (1, 2, 3, 5):
        output = program.forward(program.parameters, torch.randn(count, *shape, device=device))
        _check_output(output, count, config.n_outputs)
    rows, units = synthetic_batch(shape, config, device=device)
    vmap = VmapClipper(program, config)
    vmap.clipped_sum(program.parameters, rows.batch(units))
    try:
        fast = BookkeepingClipper(program, config)
        for size in (1, 2, 5):
            sample_rows, sample_units = synthetic_batch(shape, config, units=size, device=device)
            fast.clipped_sum(program.parameters, sample_rows.batch(sample_units))
    except (NotApplicable, NotRowwise) as exc:
        return vmap, vmap, str(exc)
    except Exception as exc:  # the vmap path trains this graph; the fast one cannot
        return vmap, vmap, f"{type(exc).__name__}: {exc}"
    return fast, vmap, ""


@dataclass
class TrainResult:
    parameters: dict[str, torch.Tensor]
    epsilon: float
    steps: int
    clipper: str
    fallback_steps: int


class DpSgd:
    """DP-SGD from the program's parameters (copied: the program is not changed), one `step()` at a time."""

    def __init__(self, program: Program, rows: UnitRows, config: DpSgdConfig, *, clipper: Clipper,
                 fallback: Clipper, seed: int | None = None) -> None:
        seed = secrets.randbits(63) if seed is None else seed
        self.rows, self.config, self.clipper, self.fallback = rows, config, clipper, fallback
        self.sampler = np.random.default_rng(seed)
        self.device = program.device
        self.noise = torch.Generator(device=self.device).manual_seed(seed ^ 0x5DEECE66D)
        torch.manual_seed(seed ^ 0x2545F491)   # dropout draws from the default generator (of every device)
        self.parameters = {name: tensor.detach().clone() for name, tensor in program.parameters.items()}
        self._names = list(self.parameters)
        self._sizes = [self.parameters[name].numel() for name in self._names]
        self._shapes = [self.parameters[name].shape for name in self._names]
        self._ordered = [self.parameters[name] for name in self._names]
        self.accountant = RDPAccountant()
        self.steps_taken = 0
        self.fallback_steps = 0
        # Every step is the same mechanism, so the RDP after t steps is t times one step's: progress reports
        # convert that curve (Opacus' own analysis) instead of recomputing every order each time.
        with _quiet_accountant():
            self._step_rdp = np.asarray(rdp_analysis.compute_rdp(
                q=config.sample_rate, noise_multiplier=config.noise_multiplier, steps=1,
                orders=RDPAccountant.DEFAULT_ALPHAS))

    def step(self) -> None:
        config = self.config
        batch = self.rows.batch(poisson_units(config.n_units, config.sample_rate, self.sampler))
        try:
            sums = self.clipper.clipped_sum(self.parameters, batch).sums
        except Exception:
            # The fast path's row check failed on this step's shapes, or the graph raised at this batch size:
            # the vmap path, whose shapes never depend on the batch, takes this step (and fails loudly if the
            # model cannot train at all, as choose_clipper's dry run would have shown).
            sums = self.fallback.clipped_sum(self.parameters, batch).sums
            self.fallback_steps += 1
        draws = torch.split(torch.randn(sum(self._sizes), generator=self.noise, device=self.device), self._sizes)
        with torch.no_grad():
            noisy = torch._foreach_add([sums[name] for name in self._names],
                                       [draw.view(shape) for draw, shape in zip(draws, self._shapes, strict=True)],
                                       alpha=config.noise_multiplier * config.max_grad_norm)
            torch._foreach_add_(self._ordered, noisy, alpha=-config.learning_rate / config.expected_batch_size)
        self.accountant.step(noise_multiplier=config.noise_multiplier, sample_rate=config.sample_rate)
        self.steps_taken += 1

    def progress_epsilon(self) -> float:
        """The epsilon spent so far, from the one-step RDP curve (equal to the accountant's, faster)."""
        if not self.steps_taken:
            return 0.0
        with _quiet_accountant():
            epsilon, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS,
                                                        rdp=self._step_rdp * self.steps_taken,
                                                        delta=self.config.delta)
        return float(epsilon)

    def epsilon(self) -> float:
        """The epsilon spent so far, by the step-by-step RDP accountant."""
        return spent_epsilon(self.accountant, self.config.delta) if self.steps_taken else 0.0


def train(program: Program, rows: UnitRows, config: DpSgdConfig, *, clipper: Clipper, fallback: Clipper,
          progress: Callable[[int, int, float], None] | None = None, seed: int | None = None) -> TrainResult:
    """Run config.steps DP-SGD steps from the program's parameters; the program itself is not changed."""
    trainer = DpSgd(program, rows, config, clipper=clipper, fallback=fallback, seed=seed)
    every = max(1, int(config.steps * PROGRESS_EVERY))
    for step in range(1, config.steps + 1):
        trainer.step()
        if progress is not None and (step % every == 0 or step == config.steps):
            progress(step, config.steps, trainer.epsilon() if step == config.steps else trainer.progress_epsilon())
    return TrainResult(parameters=trainer.parameters, epsilon=trainer.epsilon(), steps=config.steps,
                       clipper=clipper.name, fallback_steps=trainer.fallback_steps)
