"""Live tensor bytes under a dispatch mode: the peak a training step needs, without the device it needs it on.

    tracker = LiveBytes(granularity=512)
    tracker.track(model.parameters(), "parameters")      # what exists before the step
    with tracker:                                         # inside a FakeTensorMode: no memory is allocated at all
        ... forward, backward, optimizer step ...
    tracker.peak, tracker.peak_breakdown                  # bytes, {category: bytes} at the peak moment

Every tensor an operator returns is counted once per storage (views share their base's), from the moment an
operator creates it until its storage dies: autograd's saved tensors, the gradients and the optimizer's
moments live exactly as long as they do in a real run, because they are the same (fake) tensors. What no
operator returns is not seen: kernel workspaces (cuBLAS, cuDNN, flash attention scratch), the CUDA context,
and the caching allocator's fragmentation. `granularity` rounds each storage up as CUDA's caching allocator
does (512 bytes).

Categories at allocation: a parameter's fp16/bf16 copy made by autocast ("autocast weight copies"), anything
made in backward ("backward": gradients in flight and temporaries), else the current phase: "activations"
(inputs, forward outputs, what autograd saves) unless a `labelled` block says otherwise (the optimizer step).
`recategorize` and `label_gradients` move tensors that turn out to be more (gradients, optimizer state).
"""
import weakref
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class LiveBytes(TorchDispatchMode):
    """Current and peak bytes of live tensor storages created by operators (or registered with `track`)."""

    def __init__(self, granularity: int = 1):
        super().__init__()
        self.granularity = granularity
        self.live = {}  # id(storage) -> [bytes, category, weakref]
        self.by_category = {}
        self.current = self.peak = 0
        self.peak_breakdown = {}
        self.phase = "activations"
        self._params = set()  # ids of parameter storages: their autocast copies get their own category

    def _bytes(self, storage) -> int:
        n = storage.nbytes()
        return -(-n // self.granularity) * self.granularity

    def _add(self, t: torch.Tensor, category: str) -> None:
        storage = t.untyped_storage()
        key = id(storage)  # the same Python object for as long as the storage lives
        if key in self.live:
            return
        n = self._bytes(storage)
        self.live[key] = [n, category, weakref.ref(storage, lambda _, key=key: self._release(key))]
        self._count(category, n)
        if self.current > self.peak:
            self.peak, self.peak_breakdown = self.current, dict(self.by_category)

    def _release(self, key) -> None:
        n, category, _ = self.live.pop(key)
        self._count(category, -n)

    def _count(self, category: str, n: int) -> None:
        self.current += n
        self.by_category[category] = self.by_category.get(category, 0) + n

    def track(self, tensors, category: str) -> None:
        """Count tensors that exist already (parameters, buffers, optimizer state of an earlier step)."""
        for t in tensors:
            self._add(t, category)
            if category == "parameters":
                self._params.add(id(t.untyped_storage()))

    def recategorize(self, tensors, category: str) -> None:
        for t in tensors:
            entry = self.live.get(id(t.untyped_storage()))
            if entry is None:
                self._add(t, category)
            elif entry[1] != category:
                self._count(entry[1], -entry[0])
                self._count(category, entry[0])
                entry[1] = category

    def label_gradients(self, params) -> list:
        """Count each parameter's .grad as "gradients" as soon as backward accumulates it; returns the hook handles."""
        return [p.register_post_accumulate_grad_hook(lambda p: self.recategorize([p.grad], "gradients"))
                for p in params if p.requires_grad]

    @contextmanager
    def labelled(self, phase: str):
        """Tensors made outside forward and backward inside this block (e.g. the optimizer step) get `phase`."""
        previous, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = previous

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if torch._C._current_graph_task_id() != -1:
            category = "backward"
        elif func is torch.ops.aten._to_copy.default and id(args[0].untyped_storage()) in self._params \
                and out.dtype in _LOW_PRECISION:
            category = "autocast weight copies"
        else:
            category = self.phase
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t, category)
        return out


class ScalarReads(TorchDispatchMode):
    """Answers `.item()` / `int(t)` on fake tensors with 0 (no value exists; no memory depends on it).

    0 means: a token count of 0 (the step divides by max(1, n)), a loss of 0.0, no inf found by the GradScaler."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            return False if args[0].dtype == torch.bool else 0 if not args[0].is_floating_point() else 0.0
        return func(*args, **(kwargs or {}))


@contextmanager
def autocast_without_gpu(device_type: str, dtype: torch.dtype):
    """torch.autocast(device_type, dtype), also for "cuda" on a machine without one (for fake CUDA tensors).

    torch switches CUDA autocast off with a warning when no GPU is present; the dispatch itself (which ops cast,
    the cache of weight copies) needs none."""
    common = torch.cuda.amp.common
    original = common.amp_definitely_not_available
    common.amp_definitely_not_available = lambda: False
    try:
        ctx = torch.autocast(device_type, dtype=dtype)
    finally:
        common.amp_definitely_not_available = original
    with ctx:
        yield
