"""Backend selection: auto keeps CPU users on torch, forcing works, and impossible forcing fails loudly."""

from __future__ import annotations

import inspect

import pytest
import torch

from services.gpu_worker import kernels
from services.gpu_worker.kernels import reference, selection
from services.gpu_worker.kernels.errors import KernelSelectionError
from services.gpu_worker.kernels.selection import KernelBackend, requested_backend, use_triton

EXPORTED = ("norm_modulate", "pack_kv", "rope_", "varlen_attention")


@pytest.fixture
def no_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def test_the_package_exports_the_five_ops_with_the_reference_signatures() -> None:
    assert sorted(kernels.__all__) == sorted(EXPORTED)
    for name in EXPORTED:
        assert inspect.signature(getattr(kernels, name)) == inspect.signature(getattr(reference, name)), name


@pytest.mark.parametrize(("raw", "expected"), [("", KernelBackend.AUTO), (" Torch ", KernelBackend.TORCH),
                                               ("triton", KernelBackend.TRITON), ("auto", KernelBackend.AUTO)])
def test_the_environment_variable_names_the_backend(
    monkeypatch: pytest.MonkeyPatch, raw: str, expected: KernelBackend
) -> None:
    monkeypatch.setenv("TURBOSERVE_KERNELS", raw)
    assert requested_backend() is expected


def test_an_unknown_backend_name_is_rejected_with_the_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TURBOSERVE_KERNELS", "cuda")
    with pytest.raises(KernelSelectionError, match="'cuda'"):
        requested_backend()


@pytest.mark.usefixtures("no_interpreter")
def test_auto_keeps_cpu_tensors_on_the_torch_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TURBOSERVE_KERNELS", raising=False)
    assert not use_triton(torch.zeros(2))


def test_auto_never_interprets_cpu_tensors_even_when_the_interpreter_is_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TURBOSERVE_KERNELS", "auto")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not use_triton(torch.zeros(2))


def test_forcing_torch_always_uses_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TURBOSERVE_KERNELS", "torch")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not use_triton(torch.zeros(2))


@pytest.mark.usefixtures("no_interpreter")
def test_forcing_triton_on_cpu_tensors_without_the_interpreter_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TURBOSERVE_KERNELS", "triton")
    with pytest.raises(KernelSelectionError, match="TRITON_INTERPRET=1"):
        use_triton(torch.zeros(2))


def test_forcing_triton_on_cpu_tensors_under_the_interpreter_is_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TURBOSERVE_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_triton(torch.zeros(2))


def test_forcing_triton_without_the_package_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TURBOSERVE_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(selection, "triton_importable", lambda: False)
    with pytest.raises(KernelSelectionError, match="not installed"):
        use_triton(torch.zeros(2))


def test_forced_triton_routes_each_op_to_its_kernel_module(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.gpu_worker.kernels import triton_attention, triton_norm, triton_pack, triton_rope

    monkeypatch.setenv("TURBOSERVE_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls: list[str] = []
    for module, name in ((triton_attention, "varlen_attention"), (triton_norm, "norm_modulate"),
                         (triton_rope, "rope_"), (triton_pack, "pack_kv")):
        monkeypatch.setattr(module, name, lambda *args, _name=name: calls.append(_name))
    x = torch.zeros(1, 1, 1, 2)
    kernels.varlen_attention(x, x, x, x, x, torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))
    kernels.norm_modulate(x[0], x[0, 0], x[0, 0])
    kernels.rope_(x[0], x[0, :, 0, :1], x[0, :, 0, :1])
    kernels.pack_kv([x], [x], 0, 1, torch.zeros(4))
    assert calls == ["varlen_attention", "norm_modulate", "rope_", "pack_kv"]
