"""Reading XLA's optimised HLO text: where the convolutions of a compiled function went.

XLA:CPU calls its convolution library only for a convolution in the canonical channels-last
form (`dim_labels=b01f_01io->b01f`) outside any `while` loop; any other convolution is emitted
as a generic loop nest, 10-100x slower. A convolution that XLA:CPU hands to a YNNPACK / XNNPACK
library fusion instead of its Eigen kernels is slower too, 1.2-4.5x on the SD UNet's shapes
(codi_eqx/_xla_flags.py turns those off). `slow_convolutions` lists all of them, so that tests
can check the compiled training step and samplers have none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLED = re.compile(r"\b(?:calls|to_apply|body|condition|branch_computations)=\{?([^}]*?)\}?(?:,\s|$)")
_NAME = re.compile(r"%([\w.\-]+)")
_CANONICAL = "b01f_01io->b01f"


@dataclass(frozen=True)
class Convolution:
    """One convolution instruction of an optimised HLO module."""

    name: str
    dim_labels: str
    computation: str
    in_loop: bool
    """Inside (a computation called from) a `while` body or condition."""
    in_library_fusion: bool = False
    """Inside a YNNPACK / XNNPACK library fusion (`ynn_fusion`, `xnn_fusion`)."""

    @property
    def slow_on_cpu(self) -> bool:
        """XLA:CPU emits it as a loop nest, or a library fusion, instead of its Eigen call."""
        return self.in_loop or self.in_library_fusion or self.dim_labels != _CANONICAL


def _computations(hlo: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    current = None
    for line in hlo.splitlines():
        m = _COMPUTATION.match(line) if line[:1] not in (" ", "\t") else None
        if m:
            current = m.group(1)
            out[current] = []
        elif line.startswith("}"):
            current = None
        elif current is not None:
            out[current].append(line)
    return out


def convolutions(hlo: str) -> list[Convolution]:
    """Every convolution of an optimised HLO module (`compiled.as_text()`)."""
    comps = _computations(hlo)
    calls = {
        name: {c for line in lines for m in _CALLED.finditer(line) for c in _NAME.findall(m.group(1))}
        for name, lines in comps.items()
    }
    loop_roots = {
        c for lines in comps.values() for line in lines if " while(" in line
        for m in re.finditer(r"\b(?:body|condition)=%([\w.\-]+)", line) for c in [m.group(1)]
    }
    library_roots = {
        c for lines in comps.values() for line in lines
        if re.match(r"\s*(?:ROOT\s+)?%[xy]nn_fusion[\w.\-]*\s*=", line) and " fusion(" in line
        for m in re.finditer(r"\bcalls=%([\w.\-]+)", line) for c in [m.group(1)]
    }
    in_loop = _reachable(loop_roots, calls)
    in_library = _reachable(library_roots, calls)
    out = []
    for comp, lines in comps.items():
        for line in lines:
            if " convolution(" not in line:
                continue
            name = _NAME.search(line)
            labels = re.search(r"dim_labels=([^,}\s]+)", line)
            out.append(Convolution(
                name=name.group(1) if name else "?",
                dim_labels=labels.group(1) if labels else "?",
                computation=comp, in_loop=comp in in_loop,
                in_library_fusion=comp in in_library,
            ))
    return out


def _reachable(roots: set[str], calls: dict[str, set[str]]) -> set[str]:
    """`roots` and every computation they call, transitively."""
    seen: set[str] = set()
    stack = list(roots)
    while stack:
        c = stack.pop()
        if c in seen:
            continue
        seen.add(c)
        stack.extend(calls.get(c, ()))
    return seen


def slow_convolutions(hlo: str) -> list[Convolution]:
    """The convolutions XLA:CPU does not hand to its convolution library."""
    return [c for c in convolutions(hlo) if c.slow_on_cpu]
