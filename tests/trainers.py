"""The quiet CPU Trainer that the callback and defense tests build their fits on."""

from __future__ import annotations

from pathlib import Path

import lightning as L


def quiet_trainer(root: Path | None, callbacks: list, epochs: int = 0, **kw) -> L.Trainer:
    """A CPU Trainer that writes and prints nothing of its own: no logger, progress bar, summary or checkpoints
    (``enable_checkpointing=True``, a ``logger`` and any other Trainer argument may be passed)."""
    kw.setdefault("enable_checkpointing", False)
    kw.setdefault("logger", False)
    return L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        **kw,
    )
