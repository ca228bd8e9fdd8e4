"""Make auto-lirpa 0.3 (2022, written for torch 1.x) run on torch 2.x and numpy 2.

Every patch here is applied only when the thing it provides is missing or known broken, and the
caller's process-wide settings that auto_LiRPA changes (TorchScript profiling executor, ONNX opset
global) are restored afterwards. `import_auto_lirpa()` is the only way the rest of diffprobe gets
the library; `traced()` wraps every call that traces a model.
"""
import contextlib
import functools
import sys
import threading
import types
import warnings

import torch

from .errors import DiffprobeError

TESTED_TORCH = ((2, 4), (2, 13))
_module = None


def torch_version():
    return tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


def check_torch():
    low, high = TESTED_TORCH
    if not (low <= torch_version() <= high):
        raise DiffprobeError(
            f"certification was tested with torch {low[0]}.{low[1]} to {high[0]}.{high[1]}, "
            f"found {torch.__version__}; install a tested one: pip install 'torch>=2.4,<2.14'")


@contextlib.contextmanager
def _jit_settings_kept():
    executor = torch._C._jit_set_profiling_executor(True)
    torch._C._jit_set_profiling_executor(executor)
    mode = torch._C._get_graph_executor_optimize()
    opset = _opset_globals().export_onnx_opset_version
    recursion = sys.getrecursionlimit()  # auto_LiRPA raises it to 1e6
    try:
        yield
    finally:
        sys.setrecursionlimit(recursion)
        torch._C._jit_set_profiling_executor(executor)
        torch._C._set_graph_executor_optimize(mode)
        _opset_globals().export_onnx_opset_version = opset


def _opset_globals():
    from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
    return GLOBALS


def _patch_numpy():
    import numpy as np
    try:
        import numpy.lib.arraysetops  # noqa: F401
    except ImportError:  # numpy 2 removed the module; auto_LiRPA imports `isin` from it, unused
        shim = types.ModuleType("numpy.lib.arraysetops")
        shim.isin = np.isin
        sys.modules["numpy.lib.arraysetops"] = shim


def _patch_torch():
    import torch.onnx.symbolic_helper as helper
    if not hasattr(helper, "_set_opset_version"):
        def _set_opset_version(opset):
            _opset_globals().export_onnx_opset_version = opset
        helper._set_opset_version = _set_opset_version
    if not hasattr(torch._C.Node, "__getitem__"):
        # torch 2 dropped attribute access by name; the typed accessor is named by the kind
        def _attribute(node, name):
            return getattr(node, node.kindOf(name))(name)
        torch._C.Node.__getitem__ = _attribute


def _patch_auto_lirpa(lirpa):
    from auto_LiRPA.bound_general import BoundedModule
    from auto_LiRPA.operators import BoundRelu

    original_members = BoundedModule._named_members
    if "remove_duplicate" not in original_members.__code__.co_varnames:
        @functools.wraps(original_members)
        def _named_members(self, get_members_fn, prefix="", recurse=True, remove_duplicate=True):
            return original_members(self, get_members_fn, prefix, recurse)
        BoundedModule._named_members = _named_members

    original_init = BoundRelu.init_opt_parameters

    @functools.wraps(original_init)
    def init_opt_parameters(self, start_nodes):
        original_init(self, start_nodes)
        # 0.3 resets alpha_indices for the full-alpha case only inside a verbosity check,
        # which crashes reconstruct_full_alpha when > 90% of a layer is unstable.
        if self.alpha_indices is not None:
            total = self.inputs[0].lower[0].numel()
            if self.alpha_indices[0].size(0) > self.options.get("minimum_sparsity", 0.9) * total:
                self.alpha_indices = None
    if not getattr(original_init, "_diffprobe_patched", False):
        init_opt_parameters._diffprobe_patched = True
        BoundRelu.init_opt_parameters = init_opt_parameters


def import_auto_lirpa():
    """auto_LiRPA, patched for this torch/numpy; raises a clear error when it cannot be had."""
    global _module
    if _module is not None:
        return _module
    check_torch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script, used at import
        _patch_numpy()
        _patch_torch()
        # auto_LiRPA calls warnings.simplefilter('once') at import, for the whole process
        simplefilter, warnings.simplefilter = warnings.simplefilter, lambda *a, **k: None
        try:
            with _jit_settings_kept():
                import auto_LiRPA
        except ImportError as exc:
            raise DiffprobeError(
                f"auto_LiRPA is not importable ({exc}); install it with: "
                "pip install --no-deps auto-lirpa==0.3 appdirs tqdm") from exc
        finally:
            warnings.simplefilter = simplefilter
    _patch_auto_lirpa(auto_LiRPA)
    from .lirpa_ops import register
    register(auto_LiRPA)
    _module = auto_LiRPA
    return _module


# the settings below are process-wide, so threads (a thread pool, Dask's in-process workers) take
# turns: without the lock one thread's restore would undo another's set and leak float64
_GLOBAL_SETTINGS = threading.RLock()


@contextlib.contextmanager
def traced(dtype=torch.float32):
    """Run auto_LiRPA code (tracing, bounding) without leaking its global settings.

    alpha-CROWN in 0.3 casts its best bounds to the default dtype, which would round a float64
    certificate to float32; the default dtype is therefore set to `dtype` inside and restored.
    """
    import_auto_lirpa()
    with _GLOBAL_SETTINGS:
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with _jit_settings_kept(), warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                yield
        finally:
            torch.set_default_dtype(default)
