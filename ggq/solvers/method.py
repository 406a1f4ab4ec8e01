"""The quantization methods ggq knows, and what each one needs.

Code asks a ``Method`` what it does (``uses_gptq``, ``scales_activations``, ``needs_calibration``)
instead of testing its name; a new method is one more entry in ``METHODS``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ggq.errors import GGQError


class MethodError(GGQError, ValueError):
    """A method name ggq does not know; lists the known ones."""


@dataclass(frozen=True)
class Method:
    name: str  # as --method spells it and the GGUF's ggq.method records it
    uses_gptq: bool  # GPTQ decides the codes (on the Hessian of each linear's input)
    scales_activations: bool  # AWQ: per-channel scales searched and folded into the tensor before
    needs_calibration: bool  # reads calibration text (forward passes, input statistics)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("rtn", uses_gptq=False, scales_activations=False, needs_calibration=False),
        Method("gptq", uses_gptq=True, scales_activations=False, needs_calibration=True),
        Method("awq", uses_gptq=False, scales_activations=True, needs_calibration=True),
        Method("awq+gptq", uses_gptq=True, scales_activations=True, needs_calibration=True),
    )
}
CALIBRATED = tuple(name for name, m in METHODS.items() if m.needs_calibration)  # the layer-wise solver's


def method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise MethodError(f"unknown method {name!r}; known: {', '.join(METHODS)}") from None


def calibrated_list() -> str:
    """The calibrated methods as prose: 'gptq, awq or awq+gptq'."""
    return f"{', '.join(CALIBRATED[:-1])} or {CALIBRATED[-1]}"
