"""No tensor made for a collective or for megatron's MoE tracker is created without a device.

Under NCCL every tensor handed to a collective (and to megatron's MoE metric tracker, which
allocates its buffer on the value's device and all-reduces it) must live on the GPU. A torch
factory call without ``device=`` makes a CPU tensor: harmless on CI's gloo, a crash at step 1
on a GPU ("No backend type associated with device type cpu"). CI has no GPU, so this is a
static check over the package's source: in every function that calls a collective or the
tracker, each tensor factory (``torch.zeros``, ``torch.tensor``, ...) names its device.
Tensors made from other tensors (``*_like``, ``new_*``, arithmetic, ``torch.stack``) keep
their device and are not flagged. Limit: a tensor made in one function and reduced in
another is not followed; the GPU check (tools/gpu_check.py) runs the real NCCL path.
"""

from __future__ import annotations

import ast
import os
import textwrap

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "megatron_stgc")

COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce",
               "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single",
               "gather", "scatter", "send", "recv", "isend", "irecv"}
TRACKERS = {"record_moe_metric", "save_to_aux_losses_tracker", "record"}
FACTORIES = {"zeros", "ones", "empty", "full", "tensor", "as_tensor", "arange", "rand", "randn",
             "randint", "eye", "linspace"}


def _called_name(call: ast.Call) -> tuple[str | None, str]:
    """(owner, attribute) of ``owner.attribute(...)``, or (None, name) of ``name(...)``."""
    func = call.func
    if isinstance(func, ast.Attribute):
        owner = func.value.id if isinstance(func.value, ast.Name) else None
        return owner, func.attr
    if isinstance(func, ast.Name):
        return None, func.id
    return None, ""


def _hands_to_collective(function: ast.AST) -> bool:
    for node in ast.walk(function):
        if isinstance(node, ast.Call):
            owner, name = _called_name(node)
            if name in COLLECTIVES and owner in ("dist", "distributed", None):
                return True
            if name in TRACKERS and (name != "record" or owner == "tracker"):
                return True
    return False


def deviceless_factories(source: str, filename: str = "<source>") -> list[str]:
    """'file:line torch.F(...)' for each factory without device= in a collective function."""
    found = []
    for function in ast.walk(ast.parse(source)):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if not _hands_to_collective(function):
            continue
        for node in ast.walk(function):
            if not isinstance(node, ast.Call):
                continue
            owner, name = _called_name(node)
            if owner == "torch" and name in FACTORIES:
                if not any(keyword.arg == "device" for keyword in node.keywords):
                    found.append(f"{filename}:{node.lineno} torch.{name}(...) in "
                                 f"{function.name}() has no device=")
    return sorted(set(found))


def test_package_makes_collective_tensors_on_a_named_device():
    found = []
    for root, _, files in os.walk(PACKAGE):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(root, name)
                with open(path) as f:
                    found += deviceless_factories(f.read(), os.path.relpath(path, PACKAGE))
    assert found == []


# The two crashes the first GPU run would have hit (commit 0680c6e): the check must see them.
OLD_METRICS = textwrap.dedent('''
    def collect_stgc_metrics(model, num_layers, group=None):
        table = torch.zeros(num_layers, len(_COLUMNS), dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(table, group=group)
''')
OLD_ROUTER_LOG = textwrap.dedent('''
    def _log(self, totals, normalizer):
        token_loss = float(totals[4] / normalizer)
        save_to_aux_losses_tracker(
            "stgc_token_loss", torch.tensor(token_loss), self.layer_number, num_layers
        )
''')


def test_the_check_catches_the_original_cpu_tensors():
    assert deviceless_factories(OLD_METRICS) == [
        "<source>:3 torch.zeros(...) in collect_stgc_metrics() has no device="]
    assert deviceless_factories(OLD_ROUTER_LOG) == [
        "<source>:5 torch.tensor(...) in _log() has no device="]
    fixed = OLD_METRICS.replace("dtype=torch.float64)", "dtype=torch.float64, device=device)")
    assert deviceless_factories(fixed) == []
