"""The issues' targets on the default, full-size built-in tasks (minutes each: ``pytest -m slow``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from backdoor_lab.pipeline import defend, train

from .test_pipeline import _compose

pytestmark = pytest.mark.slow


def test_signs_badnets_reaches_the_walking_skeleton_targets(tmp_path: Path) -> None:
    trained = train(_compose("train", tmp_path, "t", ["callbacks.progress_bar=null"]))
    assert trained["clean_acc"] >= 0.95 and trained["asr"] >= 0.95
    defended = defend(_compose("defend", tmp_path, "d", ["callbacks.progress_bar=null"]))
    assert defended["after"]["asr"] <= 0.05
    assert defended["after"]["clean_acc"] >= defended["before"]["clean_acc"] - 0.02


def test_face_sunglasses_trains_to_the_face_targets(tmp_path: Path) -> None:
    trained = train(_compose("train", tmp_path, "t", ["experiment=face_sunglasses", "callbacks.progress_bar=null"]))
    assert trained["data"]["classes"] >= 100
    assert trained["clean_acc"] >= 0.90 and trained["asr"] >= 0.95
    defended = defend(_compose("defend", tmp_path, "d", ["experiment=face_sunglasses", "callbacks.progress_bar=null"]))
    # Fine-pruning's claim (ASR <= 5%) does not reproduce on this task (see README); the run must still
    # keep clean accuracy within the stop rule's reach and record where the trigger drives conv3.
    assert defended["layer"] == "net.conv3" and len(defended["trigger_channel_ranks"]) == 10
    assert defended["after"]["clean_acc"] >= defended["before"]["clean_acc"] - 0.04
