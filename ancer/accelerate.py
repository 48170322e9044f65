"""The base classifier's forward pass on a reused batch buffer, as fast as the device allows.

:class:`BatchRunner` owns the device buffer that noisy inputs are written into and returns the
base classifier's top class for each row. What it may do to go fast, and why each is sound:

- ``torch.compile`` (inductor): the same operations, fused into fewer kernels; the results
  differ from eager evaluation by float rounding only. When compiling is unavailable or
  fails (no compiler, an unsupported model), the runner falls back to eager evaluation with
  a warning. Compiled code is cached in the process per batch shape, and by inductor's
  on-disk cache across processes.
- Fixed batch shape: a partial batch is padded to the buffer's full size, so that compiled
  code and CUDA graphs never meet a new shape (a new shape means a recompile). The padding
  rows hold stale inputs; their predictions are returned but the caller counts only the
  real rows, so they change no vote.
- CUDA graphs: the forward pass of the full buffer is recorded once and replayed, which
  removes the per-kernel launch cost. The replay computes exactly what the recorded calls
  compute. The graph reads the buffer in place and writes its predictions to one static
  tensor that the next replay overwrites; the caller consumes them (on the same stream)
  before the next call.
- Automatic batch size (CUDA): the largest batch that fits a fraction of the free memory,
  measured from two probe forwards (see :func:`auto_batch_size`).

Numerics (what is certified is exactly what runs):

- The buffer, and therefore every noisy input x + ε, is float32 whatever the weights are
  stored in (:data:`INPUT_DTYPE`). Lower precision lives only inside the model, under
  autocast: "bf16" or "fp16" evaluates the model with ``torch.autocast`` of that dtype, and
  a model whose weights are stored in bf16 or fp16 must be run in that precision
  (:func:`check_weights`), so that a certificate's ``precision`` names what ran.
- "fp32" means IEEE fp32 on every device: :func:`strict_fp32` turns TF32 off (CUDA matmul
  and cuDNN convolutions, and ``torch.set_float32_matmul_precision("highest")``, which also
  governs oneDNN's reduced-precision fp32 matmuls on CPUs) around the forward passes and
  restores the caller's settings afterwards.

Nothing here synchronizes the host with the device after set-up: ``predictions`` only
enqueues work.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator, Optional, Tuple, Union

import torch
from torch import nn

from ancer.devices import model_dtypes
from ancer.errors import ArgumentError
from ancer.vocabulary import PRECISIONS as PRECISION_NAMES

#: autocast dtypes of the supported precisions (``ancer.vocabulary.PRECISIONS``); "fp32"
#: runs the model as it is
PRECISIONS = dict(zip(PRECISION_NAMES, (None, torch.bfloat16, torch.float16)))

#: the dtype of every input the model is given: noisy inputs are drawn and formed in fp32
INPUT_DTYPE = torch.float32
#: the precision a model with weights stored in each low-precision dtype must be run in
_WEIGHT_PRECISIONS = {dtype: name for name, dtype in PRECISIONS.items() if dtype is not None}

#: the batch size used when none is given and the device is not a GPU
DEFAULT_BATCH_SIZE = 1000
#: the largest automatic batch: beyond it a GPU gains little throughput, and a fixed-shape
#: runner pads more rows (at most one batch per phase)
AUTO_BATCH_CAP = 2048

Compile = Union[bool, str]


class AccelerationWarning(UserWarning):
    """An acceleration was asked for but is unavailable; evaluation goes on without it."""


def check_precision(precision: str) -> str:
    """``precision`` must be one of ``PRECISIONS``: "fp32", "bf16" or "fp16"."""
    if precision not in PRECISIONS:
        raise ArgumentError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    return precision


def check_compile(compile: Compile) -> Compile:
    """``compile`` must be True, False or "auto"."""
    if compile not in (True, False, "auto"):
        raise ArgumentError(f"compile must be True, False or 'auto', got {compile!r}")
    return compile


def check_weights(model: nn.Module, precision: str) -> None:
    """Raise unless ``model``'s weights can be evaluated as ``precision`` names: fp32 weights
    in any precision (autocast casts them for "bf16" and "fp16"), bf16 or fp16 weights only
    in their own precision, so that the certificate's precision is what actually ran."""
    dtypes = model_dtypes(model) - {torch.float32}
    if not dtypes:
        return
    names = ", ".join(sorted(str(dtype).replace("torch.", "") for dtype in dtypes))
    low = [dtype for dtype in dtypes if dtype in _WEIGHT_PRECISIONS]
    if len(dtypes) > 1 or len(low) != 1:
        raise ArgumentError(f"the weights are {names}; ancer runs fp32 weights (any precision) or "
                            "bf16/fp16 weights in their own precision: pass model.float()")
    wanted = _WEIGHT_PRECISIONS[low[0]]
    if precision != wanted:
        raise ArgumentError(f"the weights are {names} but precision={precision!r}: pass "
                            f"precision={wanted!r}, or model.float() to run in {precision}")


@contextmanager
def strict_fp32(enabled: bool = True) -> Iterator[None]:
    """IEEE fp32 arithmetic for the block when ``enabled``: TF32 off for CUDA matmuls and
    cuDNN convolutions and the fp32 matmul precision "highest"; the caller's three settings
    are restored on exit, even after an exception. TF32 rounds the operands of a matmul to
    a 10-bit mantissa, which makes an "fp32" certificate describe a different classifier."""
    if not enabled:
        yield
        return
    matmul = torch.backends.cuda.matmul.allow_tf32
    cudnn = torch.backends.cudnn.allow_tf32
    precision = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        yield
    finally:
        # the precision first: setting it also sets allow_tf32, which is restored after it
        torch.set_float32_matmul_precision(precision)
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


def autocast(device: torch.device, precision: str):
    """The autocast context of ``precision`` on ``device`` (none for fp32). Its cache of
    cast weights is off: the context is entered once per batch, so the cache would save
    nothing, and CUDA graphs must not capture casts into memory that the cache frees."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=False)


def auto_batch_size(
    forward: Callable[[torch.Tensor], torch.Tensor],
    input_shape: Tuple[int, ...],
    device: torch.device,
    memory_fraction: float = 0.5,
    cap: int = AUTO_BATCH_CAP,
) -> int:
    """A batch size for ``forward`` on ``device``: on CUDA, the largest multiple of 64 (at
    most ``cap``) whose inputs and activations fit ``memory_fraction`` of the free memory,
    each row charged 1/64 of the peak memory of a probe forward of 64 rows (workspaces
    included, so the estimate errs on the small side) and free memory read from the driver
    after emptying the cache; elsewhere :data:`DEFAULT_BATCH_SIZE`."""
    if device.type != "cuda":
        return DEFAULT_BATCH_SIZE
    probe = torch.zeros((64, *input_shape), device=device, dtype=INPUT_DTYPE)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    forward(probe)
    torch.cuda.synchronize(device)
    per_row = max(torch.cuda.max_memory_allocated(device) - start, 1) / 64 + probe[0].nbytes
    del probe
    # cached blocks go back to the driver first; memory reserved but unallocated is not
    # counted as free, since private pools of recorded CUDA graphs hold some of it
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    rows = int(memory_fraction * free / per_row) // 64 * 64
    return max(64, min(cap, rows))


class BatchRunner:
    """The top class of the base classifier ``model`` on each row of a reused input buffer.

    ``model`` must already be on ``device`` in eval mode (in channels_last format if wanted:
    the buffer stays contiguous, because noise is drawn several times faster into contiguous
    memory, and the first convolution reorders its input). The buffer is always float32
    (:data:`INPUT_DTYPE`). ``precision`` is "fp32", "bf16" or "fp16" (autocast) and must
    suit the weights (:func:`check_weights`). ``compile``:
    True compiles with ``torch.compile``, "auto" compiles on CUDA only (compiling costs
    seconds to minutes: on a CPU it is opt-in, so that tests and CI stay fast), False never. ``cuda_graphs`` replays the
    full-batch forward from a CUDA graph (CUDA only; ignored elsewhere with a warning).
    ``pad_batches``: None pads partial batches to the full shape exactly when compiled or
    graphed; True or False forces it.
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        device: torch.device,
        *,
        precision: str = "fp32",
        compile: Compile = "auto",
        cuda_graphs: bool = False,
        pad_batches: Optional[bool] = None,
    ) -> None:
        check_precision(precision)
        check_weights(model, precision)
        compile = check_compile(compile)
        self.model = model
        self.num_classes = num_classes
        self.device = device
        self.precision = precision
        self.compile = compile is True or (compile == "auto" and device.type == "cuda")
        if cuda_graphs and device.type != "cuda":
            warnings.warn(f"cuda_graphs needs a CUDA device, the model is on {device}; running "
                          "without them", AccelerationWarning, stacklevel=3)
        self.cuda_graphs = bool(cuda_graphs) and device.type == "cuda"
        if precision == "bf16" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
            warnings.warn(f"bf16 on {torch.cuda.get_device_name(device)} (compute capability below 8.0) "
                          "is emulated and slow; use --precision fp16 there", AccelerationWarning,
                          stacklevel=3)
        self.pad_batches = (self.compile or self.cuda_graphs) if pad_batches is None else bool(pad_batches)
        self._network: Callable[[torch.Tensor], torch.Tensor] = model
        self._compiled = False
        self.buffer: Optional[torch.Tensor] = None
        self._graph: Optional["torch.cuda.CUDAGraph"] = None
        self._graph_output: Optional[torch.Tensor] = None

    # -- public --------------------------------------------------------------------------
    @property
    def is_compiled(self) -> bool:
        """Whether the forward pass now runs compiled code (False before the first batch and
        after a fallback to eager)."""
        return self._network is not self.model

    @property
    def is_graphed(self) -> bool:
        """Whether full batches now replay a recorded CUDA graph."""
        return self._graph is not None

    def default_batch_size(self, input_shape: Tuple[int, ...]) -> int:
        """The batch size to use when the caller gives none (see :func:`auto_batch_size`)."""
        with torch.inference_mode(), autocast(self.device, self.precision):
            return auto_batch_size(self.model, tuple(input_shape), self.device)

    def prepare(self, batch_size: int, input_shape: Tuple[int, ...]) -> torch.Tensor:
        """The buffer of ``batch_size`` rows of ``input_shape``, reused while both stay the
        same; a new shape frees the old buffer (and graph) first. float32, and zero-filled
        when new, so that padding rows never hold NaNs."""
        wanted = (batch_size, *input_shape)
        if self.buffer is None or tuple(self.buffer.shape) != wanted:
            self.buffer = self._graph = self._graph_output = None
            self.buffer = torch.zeros(wanted, device=self.device, dtype=INPUT_DTYPE)
        return self.buffer

    def predictions(self, rows: int) -> torch.Tensor:
        """The top classes of the first ``rows`` rows of the buffer (a device tensor; with
        padding, of all rows: count only the first ``rows``). Call under
        ``torch.inference_mode``."""
        full = self.pad_batches or rows == len(self.buffer)
        if self.compile and not self._compiled:
            self._compile()
        if full and self.cuda_graphs:
            if self._graph is None:
                self._capture()
            if self._graph is not None:
                self._graph.replay()
                return self._graph_output
        return self._classify(self.buffer if full else self.buffer[:rows])

    # -- evaluation ----------------------------------------------------------------------
    def _classify(self, batch: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.precision):
            scores = self._network(batch)
        if scores.dim() != 2 or scores.shape[1] != self.num_classes:
            raise ArgumentError(
                f"the model returned scores of shape {tuple(scores.shape)} for a batch of "
                f"{len(batch)}, but num_classes={self.num_classes}; pass the number of classes "
                "the model actually outputs"
            )
        return scores.argmax(dim=1)

    def _compile(self) -> None:
        """Compile the network and run it once on the buffer; on any failure, warn and stay
        eager. Called once."""
        self._compiled = True
        try:
            self._network = torch.compile(self.model, dynamic=False)
            self._classify(self.buffer)
        except ArgumentError:
            self._network = self.model
            raise
        except Exception as error:  # no compiler, unsupported operator, ...
            self._network = self.model
            warnings.warn(f"torch.compile failed ({type(error).__name__}: {str(error)[:300]}); "
                          "the model runs uncompiled", AccelerationWarning, stacklevel=4)

    def _capture(self) -> None:
        """Record the full-buffer forward pass in a CUDA graph after warm-up runs on a side
        stream (as the CUDA-graph documentation prescribes); on failure, warn and go on
        without graphs."""
        try:
            # The model's own device is made current and the capture uses a stream made on
            # it: torch.cuda.graph's default stream belongs to the current device (cuda:0
            # unless set), and a capture there would record nothing of a model on cuda:k.
            with torch.cuda.device(self.device):
                stream = torch.cuda.Stream(self.device)
                stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(stream):
                    for _ in range(3):
                        self._classify(self.buffer)
                torch.cuda.current_stream(self.device).wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=stream):
                    output = self._classify(self.buffer)
            self._graph, self._graph_output = graph, output
        except ArgumentError:
            raise
        except Exception as error:
            self.cuda_graphs = False
            warnings.warn(f"CUDA graph capture failed ({type(error).__name__}: {str(error)[:300]}); "
                          "running without CUDA graphs", AccelerationWarning, stacklevel=4)
