"""``attributor.report()``: what was compiled, which rule ran at which op, coverage and timings."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

if TYPE_CHECKING:
    from .attributor import Program


@dataclass
class Report:
    """A summary of one compiled program. ``str(report)`` is the readable form."""

    model: str
    inputs: list[str]
    preset: str
    backend: str
    nodes: int
    op_counts: Counter
    rules: dict[str, Counter]  # op -> rule name -> count
    steps: int
    coverage: float
    fallbacks: list[str]
    kept: int
    relevance_total: float | None
    seed_total: float | None
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def build(cls, model: nn.Module, program: Program, conservation: tuple[Tensor, Tensor] | None) -> Report:
        plan = program.plan
        rel, seed = (float(conservation[0]), float(conservation[1])) if conservation else (None, None)
        return cls(
            model=type(model).__name__,
            inputs=[f"{s.name}: {str(s.dtype).removeprefix('torch.')}{list(s.shape)}" for s in program.traced.inputs],
            preset=plan.preset.name,
            backend=program.backend,
            nodes=plan.node_count,
            op_counts=plan.op_counts,
            rules=plan.rules_by_op(),
            steps=len(plan.steps),
            coverage=plan.coverage,
            fallbacks=[f"{s.op} at {s.node} ({s.module or 'top level'})" for s in plan.fallbacks],
            kept=len(plan.kept),
            relevance_total=rel,
            seed_total=seed,
            timings={k: v for k, v in program.timings.items() if isinstance(v, float)},
        )

    @property
    def conservation(self) -> float | None:
        """Sum of input relevance over the relevance put in at the output (1.0: fully conserved)."""
        if self.relevance_total is None or not self.seed_total:
            return None
        return self.relevance_total / self.seed_total

    def __str__(self) -> str:
        lines = [
            f"lrpc report: {self.model}  (rules: {self.preset}, backend: {self.backend})",
            f"  inputs      {', '.join(self.inputs)}",
            (
                f"  graph       {self.nodes} nodes, {len(self.op_counts)} unique ops; "
                f"{self.steps} carry relevance; {self.kept} forward values kept for the relevance pass"
            ),
            f"  coverage    {self.coverage:.2%} of relevance-carrying nodes have a real rule"
            + (f"; {len(self.fallbacks)} gradient fallbacks" if self.fallbacks else ""),
        ]
        for fb in self.fallbacks:
            lines.append(f"    fallback: {fb}")
        if self.conservation is not None:
            lines.append(
                f"  conservation  input relevance {self.relevance_total:.6g} / seed {self.seed_total:.6g}"
                f" = {self.conservation:.6f}   (last call; biases and stabilizers absorb the rest)"
            )
        if self.timings:
            lines.append("  time        " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in self.timings.items()))
        lines.append("  op                                         count  rule")
        for op, count in sorted(self.op_counts.items(), key=lambda kv: -kv[1]):
            rules = self.rules.get(op)
            rule_text = ", ".join(f"{r} x{n}" for r, n in rules.items()) if rules else "- (no relevance flows)"
            lines.append(f"  {op:<42} {count:>5}  {rule_text}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return str(self)

    def as_dict(self) -> dict[str, Any]:
        """The report as plain data (for tables and JSON)."""
        return {
            "model": self.model,
            "nodes": self.nodes,
            "unique_ops": len(self.op_counts),
            "steps": self.steps,
            "coverage": self.coverage,
            "fallbacks": list(self.fallbacks),
            "conservation": self.conservation,
            "timings": dict(self.timings),
        }
