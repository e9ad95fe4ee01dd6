"""Counting unusable samples by reason, logging the first few, and stopping when they are too many."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

logger = logging.getLogger("data")


class TooManyBadSamples(RuntimeError):
    """More of the data was unusable than `max_bad_fraction` allows: a dataset problem to fix."""


@dataclass
class BadSampleTally:
    """Per-process counts. Each bad sample is logged once (key, shard, reason) up to `log_limit` per
    reason, then counted silently; no sleeping, no stack traces."""

    source: str
    max_fraction: float
    min_seen: int
    rank: int = 0
    log_limit: int = 10
    seen: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)

    def good(self) -> None:
        self.seen += 1

    def bad(self, reason: str, message: str, key: str, origin: str) -> None:
        self.seen += 1
        self.counts[reason] = self.counts.get(reason, 0) + 1
        where = f"key {key!r} in {origin}"
        self.examples.setdefault(reason, where)
        n = self.counts[reason]
        if n <= self.log_limit:
            more = " (further ones are counted, not logged)" if n == self.log_limit else ""
            logger.warning("Skipped bad sample (%s) %s: %s%s", reason, where, message, more)
        self.check()

    @property
    def total_bad(self) -> int:
        return sum(self.counts.values())

    def check(self) -> None:
        """Raise TooManyBadSamples once enough samples were seen and too large a share was bad."""
        if self.seen < self.min_seen or self.total_bad <= self.max_fraction * self.seen:
            return
        reasons = ", ".join(
            f"{reason}: {n} (e.g. {self.examples[reason]})"
            for reason, n in sorted(self.counts.items(), key=lambda kv: -kv[1])
        )
        raise TooManyBadSamples(
            f"Dataset problem in {self.source}: {self.total_bad} of {self.seen} samples read by process "
            f"{self.rank} were unusable ({100 * self.total_bad / self.seen:.1f}%, over "
            f"max_bad_fraction={self.max_fraction}). By reason: {reasons}. Fix or drop these samples "
            "(`python -m launch.prepare_data --data SPEC --validate` lists them all), or raise "
            "--data.max-bad-fraction if this much loss is expected."
        )

    def state_dict(self) -> dict[str, object]:
        return {"seen": self.seen, "counts": dict(self.counts), "examples": dict(self.examples)}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.seen = int(state["seen"])  # type: ignore[arg-type]
        self.counts = {str(k): int(v) for k, v in dict(state["counts"]).items()}  # type: ignore[arg-type]
        self.examples = {str(k): str(v) for k, v in dict(state.get("examples", {})).items()}  # type: ignore[arg-type]
