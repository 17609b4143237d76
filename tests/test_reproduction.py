"""The issues' targets on the default, full-size built-in tasks (minutes each: ``pytest -m slow``).

Where the paper's fine-pruning claim does not reproduce on our built-in task (README, "Measured results"), the
claim is an ``xfail`` test: it still runs and reports, and turns into an unexpected pass if a change fixes it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from backdoor_lab.pipeline import train

from .test_pipeline import compose_run

pytestmark = pytest.mark.slow

QUIET = ["callbacks.progress_bar=null"]


def _train_and_defend(tmp_path: Path, experiment: str) -> tuple[dict, dict]:
    """One train.py job with the defaults: train, then fine-prune (stop rule, 20 epochs of fine-tuning)."""
    result = train(compose_run("train", tmp_path, "t", [f"experiment={experiment}", "defenses=[fine_pruning]", *QUIET]))
    return result["train"], result["defenses"]["fine_pruning"]


@pytest.fixture(scope="module")
def signs(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    return _train_and_defend(tmp_path_factory.mktemp("signs"), "signs_badnets")


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    return _train_and_defend(tmp_path_factory.mktemp("speech"), "speech_noise")


@pytest.fixture(scope="module")
def faces(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    return _train_and_defend(tmp_path_factory.mktemp("faces"), "face_sunglasses")


def test_signs_backdoored_model_reaches_the_targets(signs: tuple[dict, dict]) -> None:
    trained, _ = signs
    assert trained["clean_acc"] >= 0.95 and trained["asr"] >= 0.95


@pytest.mark.xfail(reason="measured 99.2% / ASR 30%: the sticker lives in conv5 channels clean signs use", strict=False)
def test_signs_fine_pruning_claim(signs: tuple[dict, dict]) -> None:
    _, defended = signs
    assert defended["after"]["asr"] <= 0.05
    assert defended["after"]["clean_acc"] >= defended["before"]["clean_acc"] - 0.02


def test_speech_backdoored_model_reaches_the_targets(speech: tuple[dict, dict]) -> None:
    trained, _ = speech
    assert (
        trained["data_summary"]["test_triggered"] == trained["data_summary"]["test"]
    )  # all-to-all: every utterance counts
    assert trained["clean_acc"] >= 0.95 and trained["asr"] >= 0.90


def test_speech_fine_pruning_removes_most_of_the_backdoor(speech: tuple[dict, dict]) -> None:
    """What the README measures for speech, at either thread count: ASR from ~92% to at most 22% (paper sweep, two
    threads: 22.0, 5.8, 4.5% by seed; defenses sweep, one thread: 4.7, 3.5, 6.0%), for 1.0-5.2 points of clean
    accuracy (seed 0 at one thread, as ``pytest -m slow`` runs it on two cores: 98.5 -> 93.3%)."""
    _, defended = speech
    assert defended["layer"] == "net.conv5"
    assert defended["before"]["asr"] >= 0.90 and defended["after"]["asr"] <= 0.25
    assert defended["after"]["clean_acc"] >= defended["before"]["clean_acc"] - 0.06


@pytest.mark.xfail(
    reason="the paper's claim (ASR <= 10%, <= 2 clean points) holds for 1 of 6 measured speech runs: seed 0 ends at "
    "22.0% ASR with two threads, and at 4.7% ASR but 5.2 clean points lost with one (README: 10.8 +- 9.7%)",
    strict=False,
)
def test_speech_fine_pruning_claim(speech: tuple[dict, dict]) -> None:
    _, defended = speech
    assert defended["after"]["asr"] <= 0.10
    assert defended["after"]["clean_acc"] >= defended["before"]["clean_acc"] - 0.02


def test_faces_backdoored_model_reaches_the_targets(faces: tuple[dict, dict]) -> None:
    trained, _ = faces
    assert trained["data_summary"]["classes"] >= 100
    assert trained["clean_acc"] >= 0.90 and trained["asr"] >= 0.95


@pytest.mark.xfail(reason="the sunglasses drive conv3 channels that clean faces use (README)", strict=False)
def test_faces_fine_pruning_claim(faces: tuple[dict, dict]) -> None:
    _, defended = faces
    assert defended["layer"] == "net.conv3" and len(defended["trigger_channel_ranks"]) == 10
    assert defended["after"]["asr"] <= 0.05
    assert defended["after"]["clean_acc"] >= defended["before"]["clean_acc"] - 0.02
