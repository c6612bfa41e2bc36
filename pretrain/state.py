"""The training state: how far a run has come. Saved in every checkpoint's metadata."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps done (skipped ones included)."""
    consumed_samples: int = 0
    """Sequences drawn from the training data: where the data order continues."""
    skipped_steps: int = 0
    """Steps without an update (non-finite loss or gradient norm), over the whole run."""

    def advance(self, global_batch_size: int, applied: bool) -> None:
        self.step += 1
        self.consumed_samples += global_batch_size
        if not applied:
            self.skipped_steps += 1

    def tokens(self, seq_length: int) -> int:
        """Training tokens consumed (each sample is one sequence of `seq_length` tokens)."""
        return self.consumed_samples * seq_length

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        unknown = set(state) - set(asdict(self))
        if unknown:
            raise ValueError(f"unknown training-state fields {sorted(unknown)}")
        for key, value in state.items():
            setattr(self, key, int(value))
