"""Bad inputs and faults, as a hostile or unlucky user meets them (docs/reliability.md lists each with its test).

Checkpoints that cannot be used get their own message and never torch's advice to load with weights_only=False;
bad settings fail before any work with one line naming the key, the value and what is allowed; a user error
is printed once, without a traceback (HYDRA_FULL_ERROR=1 shows it), a bug's traceback once; the data cache
heals and tolerates a read-only or full disk and concurrent runs; result files are written atomically, never
overwritten, with the user's umask.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pickle
import runpy
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from safetensors.torch import save_file
from torch import nn

from backdoor_lab import config_checks
from backdoor_lab.checkpoints import CheckpointError, load_weights, read_state_dict
from backdoor_lab.config_checks import ConfigError, user_error_line
from backdoor_lab.data import base as data_base
from backdoor_lab.data.base import cached_splits
from backdoor_lab.pipeline import build_model, defend, save_weights, train
from backdoor_lab.reporting import files
from backdoor_lab.reporting.files import write_new, write_replace
from backdoor_lab.splits import RawSplit

from .conftest import ROOT
from .test_pipeline import TINY_SIGNS, compose_run

UNSAFE_ADVICE = "weights_only=False"


# ----------------------------------------------------------------------------- checkpoints
class Payload:
    """Unpickling this would run ``os.system``: a booby-trapped checkpoint."""

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return (os.system, ("echo pwned",))


class Custom:
    """A class of the checkpoint writer's own (not importable from plain weights)."""


def _zip_checkpoint(path: Path) -> Path:
    torch.save({"state_dict": {"w": torch.ones(3)}}, path)
    return path


def _truncated(path: Path) -> Path:
    blob = _zip_checkpoint(path.with_suffix(".full")).read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    return path


def _truncated_legacy(path: Path) -> Path:
    torch.save({"w": torch.ones(3)}, path.with_suffix(".full"), _use_new_zipfile_serialization=False)
    blob = path.with_suffix(".full").read_bytes()
    path.write_bytes(blob[:-20])
    return path


def _bytes(data: bytes):  # noqa: ANN202
    def make(path: Path) -> Path:
        path.write_bytes(data)
        return path

    return make


def _saved(obj: object):  # noqa: ANN202
    def make(path: Path) -> Path:
        torch.save(obj, path)
        return path

    return make


def _safetensors_truncated(path: Path) -> Path:
    save_file({"w": torch.ones(100)}, str(path.with_suffix(".full")))
    path.write_bytes(path.with_suffix(".full").read_bytes()[:-60])
    return path


def _plain_pickle(path: Path) -> Path:
    path.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=4))
    return path


def _nan_safetensors(path: Path) -> Path:
    save_file({"net.conv1.weight": torch.full((2, 2), float("nan")), "net.fc.bias": torch.zeros(2)}, str(path))
    return path


CHECKPOINT_CASES = {
    # case: (file name, how to make it, error type, what the message must say)
    "missing": ("model.ckpt", None, FileNotFoundError, r"checkpoint not found: .*model\.ckpt"),
    "directory": ("run", "dir", IsADirectoryError, r"is a directory; give the model file"),
    "empty": ("model.ckpt", _bytes(b""), CheckpointError, r"is empty \(0 bytes\)"),
    "truncated": ("last.ckpt", _truncated, CheckpointError, r"truncated or damaged: a torch\.save archive without"),
    "truncated_legacy": ("old.pt", _truncated_legacy, CheckpointError,
                         r"old\.pt is truncated or damaged \((EOFError|RuntimeError): "),
    "random_bytes": ("model.pt", _bytes(bytes(range(7, 250))), CheckpointError, r"is not a checkpoint: neither"),
    "text_file": ("model.ckpt", _bytes(b"hello, not weights\n"), CheckpointError, r"starts with b'hello, n'"),
    "plain_pickle": ("model.pkl", _plain_pickle, CheckpointError, r"not a checkpoint or is damaged"),
    "payload": ("evil.ckpt", _saved({"state_dict": {"w": torch.ones(1)}, "x": Payload()}), CheckpointError,
                r"refused: loading it would import posix\.system"),
    "custom_class": ("obj.pt", _saved({"w": torch.ones(1), "o": Custom()}), CheckpointError,
                     r"refused: loading it would import tests\.test_reliability\.Custom"),
    "no_tensors": ("list.pt", _saved([1, 2, 3]), CheckpointError, r"holds no state_dict of tensors \(a list\)"),
    "non_tensor_entry": ("mixed.pt", _saved({"w": torch.ones(1), "step": 3}), CheckpointError,
                         r"step are not tensors"),
    "nan_weights": ("nan.safetensors", _nan_safetensors, CheckpointError,
                    r"non-finite weights \(NaN or inf\) in 1 tensor\(s\): net\.conv1\.weight;"),
    "inf_weights": ("inf.pt", _saved({"a": torch.ones(2), "b": torch.tensor([1.0, float("inf")])}), CheckpointError,
                    r"in 1 tensor\(s\): b;"),
    "garbage_safetensors": ("model.safetensors", _bytes(b"\xff" * 64), CheckpointError,
                            r"model\.safetensors is not a readable safetensors file"),
    "truncated_safetensors": ("model.safetensors", _safetensors_truncated, CheckpointError,
                              r"model\.safetensors is not a readable safetensors file \(.*incomplete"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_checkpoint_errors_say_what_is_wrong(case: str, tmp_path: Path) -> None:
    name, make, error, match = CHECKPOINT_CASES[case]
    path = tmp_path / name
    if make == "dir":
        path.mkdir()
    elif make is not None:
        make(path)
    with pytest.raises(error, match=match) as raised:
        read_state_dict(path)
    message = str(raised.value)
    assert str(path) in message  # every message names the file
    assert UNSAFE_ADVICE not in message and "add_safe_globals" not in message  # never unsafe advice
    assert raised.value.__cause__ is None or UNSAFE_ADVICE not in str(raised.value.__cause__)


def test_a_refused_payload_never_runs(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    path = _saved({"x": Payload()})(tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="posix.system"):
        read_state_dict(path)
    assert "pwned" not in capfd.readouterr().out


def test_torch_archive_named_safetensors_and_masked_weights_still_load(tmp_path: Path) -> None:
    path = tmp_path / "actually_torch.safetensors"
    torch.save({"w_orig": torch.ones(2), "w_mask": torch.tensor([1.0, 0.0])}, path)
    state = read_state_dict(path)
    assert torch.equal(state["w"], torch.tensor([1.0, 0.0]))  # the format is read from the content


def test_wrong_architecture_names_the_keys(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2))
    path = tmp_path / "other.pt"
    torch.save({"0.weight": torch.zeros(3, 4), "0.bias": torch.zeros(3), "2.weight": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError) as raised:
        load_weights(model, path)
    message = str(raised.value)
    assert "missing from the checkpoint: 1.weight, 1.bias" in message
    assert "not in the model: 2.weight" in message
    assert "0.weight (3, 4) vs (3, 2)" in message


def test_a_nan_checkpoint_is_refused_before_any_work(tmp_path: Path) -> None:
    cfg = compose_run("defend", tmp_path, "d", [*TINY_SIGNS, "defenses=[none]"])
    model = build_model(cfg, 18)
    for parameter in model.net.conv5.parameters():
        parameter.data.fill_(float("nan"))
    ckpt = tmp_path / "nan_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    cfg = compose_run("defend", tmp_path, "d", [*TINY_SIGNS, "defenses=[none]", f"ckpt_path={ckpt}"])
    with pytest.raises(
        CheckpointError, match=r"2 tensor\(s\): net\.conv5\.(weight|bias), net\.conv5\.(weight|bias); a diverged"
    ):
        defend(cfg)
    assert not Path(cfg.paths.run_dir).exists()  # no job.json, no metrics: nothing "defended"


# ----------------------------------------------------------------------------- config
BAD_SETTINGS = [
    ("prune.prune_ratio=abc", r"prune\.prune_ratio must be a number in \[0, 1\), or null \(the stop rule\), got 'abc'"),
    ("prune.prune_ratio=1.0", r"prune\.prune_ratio must be .*, got 1\.0"),
    ("prune.prune_ratio=-0.1", r"prune\.prune_ratio must be .*, got -0\.1"),
    ("prune.prune_ratio=true", r"prune\.prune_ratio must be .*, got True"),
    ("prune.max_accuracy_drop=2", r"prune\.max_accuracy_drop must be a number in \[0, 1\] .*, got 2"),
    ("prune.step=0", r"prune\.step must be an integer >= 1 .*, got 0"),
    ("fine_tune.epochs=1.5", r"fine_tune\.epochs must be an integer >= 0, got 1\.5"),
    ("attack.poison_rate=1.5", r"attack\.poison_rate must be in \(0, 1\] .*, got 1\.5"),
    ("data.batch_size=0", r"data\.batch_size must be a positive integer, got 0"),
    ("seed=-1", r"seed must be an integer in \[0, 4294967295\], got -1"),
    ("seed=abc", r"seed must be an integer .*, got 'abc'"),
    ("threads=0", r"threads must be an integer >= 1, or null .*, got 0"),
    ("threads=-1", r"threads must be an integer >= 1, or null .*, got -1"),
    ("trainer.max_epochs=0", r"trainer\.max_epochs must be an integer >= 1, got 0"),
    ("reuse=maybe", r"reuse must be true or false, got 'maybe'"),
    ("data.source.scale=0", r"data\.source\.scale must be a positive number .*, got 0"),
    ("+foo=1", r"foo=1 is not a setting: the top-level keys are \['anp', 'attack'"),
    ("+model.net.widht=3", r"model\.net\.widht=3 is not a setting of backdoor_lab\.models\.traffic_cnn\.TrafficSign"),
    ("+prune.ratio=0.5", r"prune\.ratio=0\.5 is not a setting of backdoor_lab\.defenses\.PruneSettings"),
]  # fmt: skip


@pytest.mark.parametrize("override, match", BAD_SETTINGS, ids=[override for override, _ in BAD_SETTINGS])
def test_bad_settings_fail_before_any_work_in_one_line(override: str, match: str, tmp_path: Path) -> None:
    cfg = compose_run("train", tmp_path, "bad", ["debug=tiny", override])
    with pytest.raises(ConfigError, match=match) as raised:
        train(cfg)
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "outputs").exists()  # nothing written, no data built


def test_speech_val_fraction_names_the_key(tmp_path: Path) -> None:
    cfg = compose_run("defend", tmp_path, "bad", ["experiment=speech_noise", "data.source.val_fraction=0"])
    with pytest.raises(ConfigError, match=r"data\.source\.val_fraction must be a number in \(0, 1\), got 0"):
        defend(cfg)


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")))
@pytest.mark.parametrize("script", ["train", "defend"])
def test_every_shipped_config_passes_the_checks(experiment: str, script: str, tmp_path: Path) -> None:
    """No false alarm, for train.py and defend.py, with every defense asked for."""
    overrides = [
        f"experiment={experiment}",
        "logger=many",
        "defenses=[none,fine_tuning,pruning,fine_pruning,anp,nad,clp]",
    ]
    config_checks.check(compose_run(script, tmp_path, "r", overrides))


# ----------------------------------------------------------------------------- one line per user error
def test_user_errors_and_bugs_are_told_apart() -> None:
    def raised(make):  # noqa: ANN001, ANN202
        try:
            make()
        except Exception as err:  # noqa: BLE001 - the error under test
            return err
        raise AssertionError("nothing raised")

    ours = raised(lambda: data_base.check_scale(0))  # a check of backdoor_lab's: the user's to fix
    expected = "ValueError: data.source.scale must be a positive number (1.0 = the documented size), got 0"
    assert user_error_line(ours) == expected
    wrapped = InstantiationException("Error in call to target 'x'")  # Hydra's wrapper around a constructor's error
    wrapped.__cause__ = ours
    assert user_error_line(wrapped) == expected
    assert user_error_line(raised(lambda: np.zeros(2).reshape(3))) is None  # a ValueError from a library: a bug
    assert user_error_line(raised(lambda: torch.zeros(2).view(3))) is None
    assert user_error_line(raised(lambda: [][1])) is None
    full = OSError(errno.ENOSPC, "No space left on device")
    assert user_error_line(full) == "OSError: [Errno 28] No space left on device"
    assert user_error_line(ConfigError("seed must be an integer, got 'x'")) == "seed must be an integer, got 'x'"


def test_missing_trigger_patch_is_one_line_naming_the_file(tmp_path: Path) -> None:
    cfg = compose_run("train", tmp_path, "r", ["debug=tiny", "attack.trigger.patch=/nonexistent/patch.png"])
    with pytest.raises(InstantiationException) as raised:
        train(cfg)
    line = user_error_line(raised.value)  # what the command line prints after "train failed: "
    assert line == "FileNotFoundError: [Errno 2] No such file or directory: '/nonexistent/patch.png'"
    assert not (Path(cfg.paths.run_dir) / "metrics.json").exists()


@contextlib.contextmanager
def hydra_app(script: str, args: list[str], root: Path) -> Iterator[list[int]]:
    """Run ``train.py``/``defend.py`` as the command line does, in this process (Hydra's own error printing)."""
    handlers, level = list(logging.root.handlers), logging.root.level
    argv = sys.argv
    exit_code: list[int] = []
    sys.argv = [str(ROOT / script), *args, f"hydra.run.dir={root / 'run'}", f"paths.root_dir={root}"]
    try:
        try:
            runpy.run_path(str(ROOT / script), run_name="__main__")
            exit_code.append(0)
        except SystemExit as stop:
            exit_code.append(int(stop.code or 0))
        yield exit_code
    finally:
        sys.argv = argv
        for handler in logging.root.handlers:
            if handler not in handlers:
                handler.close()
        logging.root.handlers[:] = handlers
        logging.root.setLevel(level)
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None


def test_cli_user_error_is_one_line_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _nan_safetensors(tmp_path / "nan.safetensors")
    with hydra_app("defend.py", ["debug=tiny", f"ckpt_path={ckpt}"], tmp_path) as exit_code:
        pass
    out, err = capsys.readouterr()
    assert exit_code == [1]
    line = f"defend failed: {ckpt} holds non-finite weights (NaN or inf) in 1 tensor(s): net.conv1.weight;"
    assert (out + err).count(line) == 1
    assert "Traceback" not in out + err
    assert not (tmp_path / "run" / "job.json").exists()


def test_cli_full_error_shows_the_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with (
        pytest.raises(ConfigError, match="prune.prune_ratio must be"),  # re-raised whole, with its traceback
        hydra_app("train.py", ["debug=tiny", "prune.prune_ratio=abc"], tmp_path),
    ):
        pass


def test_cli_bug_prints_its_traceback_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(cfg: object) -> Path:
        raise RuntimeError("an internal bug")

    monkeypatch.setattr("backdoor_lab.pipeline.output_dir", broken)
    with hydra_app("train.py", ["debug=tiny"], tmp_path) as exit_code:
        pass
    out, err = capsys.readouterr()
    assert exit_code == [1]
    assert (out + err).count("Traceback (most recent call last)") == 1
    assert (out + err).count("RuntimeError: an internal bug") == 1


def test_train_py_user_error_in_a_real_process(tmp_path: Path) -> None:
    """The command line end to end: exit status 1, the one line on stderr, no traceback anywhere."""
    env = {**os.environ, "WANDB_MODE": "disabled", "BACKDOOR_LAB_ROOT": str(tmp_path)}
    env.pop("HYDRA_FULL_ERROR", None)
    done = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "debug=tiny", "prune.prune_ratio=abc"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    line = "train failed: prune.prune_ratio must be a number in [0, 1), or null (the stop rule), got 'abc'"
    assert line in done.stderr.splitlines()
    assert (done.stdout + done.stderr).count("prune_ratio") == 2  # the line, and Hydra's list of the overrides
    assert "Traceback" not in done.stdout + done.stderr


BUG_IN_A_LIBRARY = """
import sys
import numpy as np
import backdoor_lab.pipeline as pipeline

def train_model(cfg, run_dir, tests=None):
    np.zeros(2).reshape(3)  # a ValueError raised inside numpy: a bug, not the user's to fix

pipeline.train_model = train_model
from backdoor_lab.cli import train_main
sys.argv = ["train.py", "debug=tiny", "defenses=[]", "reuse=false"]
train_main()
"""


def test_a_bug_in_a_real_process_prints_its_traceback_once(tmp_path: Path) -> None:
    """Row 49 end to end: a library's ValueError deep in the job is a bug: exit 1, its traceback exactly once."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("HYDRA_FULL_ERROR", None)
    done = subprocess.run(
        [sys.executable, "-c", BUG_IN_A_LIBRARY], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    printed = done.stdout + done.stderr
    assert done.returncode == 1
    assert printed.count("Traceback (most recent call last)") == 1
    assert printed.count("ValueError: cannot reshape array of size 2 into shape (3,)") == 1
    assert "train failed:" not in printed  # not reported as the user's mistake


# ----------------------------------------------------------------------------- data cache
def _splits() -> dict[str, RawSplit]:
    rng = np.random.default_rng(0)
    out = {}
    for i, name in enumerate(("train", "val", "test")):
        out[name] = RawSplit(
            inputs=rng.integers(0, 255, (6, 4, 4, 3), dtype=np.uint8),
            labels=np.arange(6, dtype=np.int64) % 3,
            sample_ids=np.arange(6, dtype=np.int64) + 10 * i,
        )
    return out


class CountingBuild:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> dict[str, RawSplit]:
        self.calls += 1
        return _splits()


def _same(a: dict[str, RawSplit], b: dict[str, RawSplit]) -> bool:
    return all(np.array_equal(a[s].inputs, b[s].inputs) and np.array_equal(a[s].sample_ids, b[s].sample_ids) for s in a)


@pytest.fixture
def cache_file(tmp_path: Path) -> tuple[Path, CountingBuild]:
    build = CountingBuild()
    cached_splits(tmp_path, "toy", {"k": 1}, build)
    (path,) = tmp_path.glob("toy-*.npz")
    return path, build


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _change_content_keep_checksum(path: Path) -> None:
    """A valid zip (its CRCs fit) whose content no longer matches the checksum it carries."""
    arrays = dict(np.load(path))
    arrays["train/inputs"].flat[5] ^= 0xFF
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def _without_checksum(path: Path) -> None:
    arrays = {k: v for k, v in np.load(path).items() if k != data_base.CHECKSUM_KEY}
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


@pytest.mark.parametrize(
    "damage, reason",
    [
        (_truncate, "unreadable: BadZipFile"),
        (_change_content_keep_checksum, "its checksum does not match its content"),
        (_without_checksum, "it holds no checksum"),
        (lambda p: p.write_bytes(b"\x00" * 100), "unreadable"),
        (lambda p: p.write_bytes(b""), "unreadable"),
    ],
    ids=["truncated", "bit_flip", "no_checksum", "zeros", "empty"],
)
def test_damaged_cache_is_named_once_and_rebuilt(
    damage, reason: str, cache_file: tuple[Path, CountingBuild], caplog: pytest.LogCaptureFixture
) -> None:  # noqa: ANN001
    path, build = cache_file
    damage(path)
    with caplog.at_level(logging.WARNING, logger="backdoor_lab.data.base"):
        splits = cached_splits(path.parent, "toy", {"k": 1}, build)
    assert build.calls == 2 and _same(splits, _splits())
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and str(path) in warnings[0] and reason in warnings[0]
    caplog.clear()
    again = cached_splits(path.parent, "toy", {"k": 1}, build)  # healed: read back, not built a third time
    assert build.calls == 2 and _same(again, splits) and not caplog.records


def test_cache_survives_a_read_only_or_full_cache_dir(
    cache_file: tuple[Path, CountingBuild], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path, build = cache_file
    for code in (errno.EROFS, errno.ENOSPC):
        path.unlink(missing_ok=True)

        def refuse(*args: object, code: int = code, **kwargs: object) -> None:
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(files.tempfile, "mkstemp", refuse)
        with caplog.at_level(logging.WARNING, logger="backdoor_lab.data.base"):
            splits = cached_splits(path.parent, "toy", {"k": 1}, build)
        assert _same(splits, _splits())  # the run goes on with the data in memory
        assert f"Cannot write the data cache {path}" in caplog.text and os.strerror(code) in caplog.text
        assert sorted(p.name for p in path.parent.iterdir()) == []
        monkeypatch.undo()
        caplog.clear()


def test_cache_full_disk_mid_write_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(data_base.np, "savez", full)
    splits = cached_splits(tmp_path, "toy", {"k": 1}, CountingBuild())
    assert _same(splits, _splits()) and list(tmp_path.iterdir()) == []
    assert "No space left on device" in caplog.text


# Real mounts, not simulated calls: a tmpfs in a private mount namespace (``unshare -r -m``, no privilege needed
# where user namespaces are allowed) that is read-only, or too small for the cache file, so the kernel itself
# refuses the write: at the first byte (read-only) or after the first 64 KiB of a 1.8 MB file (full disk).
_MOUNTED_CHILD = r"""
import json, logging, sys
from pathlib import Path
import numpy as np
from backdoor_lab.data.base import cached_splits
from backdoor_lab.splits import RawSplit

def build():
    rng = np.random.default_rng(0)
    return {name: RawSplit(inputs=rng.integers(0, 255, (200, 32, 32, 3), dtype=np.uint8),
                           labels=np.arange(200) % 3, sample_ids=np.arange(200) + 1000 * i)
            for i, name in enumerate(("train", "val", "test"))}

def refuse():
    raise SystemExit("built although a valid cache file was there to read")

folder, mode = Path(sys.argv[1]), sys.argv[2]
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
splits = cached_splits(folder, "toy", {"k": 1}, build if mode == "build" else refuse)
same = all(np.array_equal(splits[s].inputs, build()[s].inputs) for s in splits)
print(json.dumps({"same": same, "files": sorted(p.name for p in folder.iterdir())}))
"""


def _can_mount_privately() -> bool:
    try:
        return subprocess.run(["unshare", "-r", "-m", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


needs_mount_namespace = pytest.mark.skipif(
    not _can_mount_privately(), reason="needs `unshare -r -m` (user + mount namespaces) to mount a real tmpfs"
)


def _in_mount(folder: Path, mount: str, mode: str = "build") -> tuple[dict, str]:
    """Run the cache in a child whose ``folder`` is the given mount; its JSON result and its stderr."""
    folder.mkdir(exist_ok=True)
    script = f'{mount} && exec "$0" -c "$1" "$2" "$3"'
    cmd = ["unshare", "-r", "-m", "sh", "-c", script, sys.executable, _MOUNTED_CHILD, str(folder), mode]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": ""})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@needs_mount_namespace
def test_cache_on_a_real_read_only_mount_warns_and_the_run_goes_on(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    result, stderr = _in_mount(folder, f"mount -t tmpfs -o ro,size=1m tmpfs {folder}")
    assert result == {"same": True, "files": []}
    assert stderr.count("Cannot write the data cache") == 1 and "Read-only file system" in stderr


@needs_mount_namespace
def test_cache_files_in_a_real_read_only_folder_are_read(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    written, _ = _in_mount(folder, "true")  # written on the real disk first ...
    bind_ro = f"mount --bind {folder} {folder} && mount -o remount,bind,ro {folder}"
    result, stderr = _in_mount(folder, bind_ro, mode="read")  # ... then read through a read-only view of it
    assert result == {"same": True, "files": written["files"]} and len(written["files"]) == 1
    assert "Cannot write" not in stderr and "damaged" not in stderr


@needs_mount_namespace
def test_cache_on_a_real_full_disk_mid_write_leaves_no_file(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    result, stderr = _in_mount(folder, f"mount -t tmpfs -o size=64k tmpfs {folder}")
    assert result == {"same": True, "files": []}  # the partial temp file is gone too
    assert stderr.count("Cannot write the data cache") == 1 and "No space left on device" in stderr


def test_concurrent_cache_writers_never_expose_a_partial_file(tmp_path: Path) -> None:
    arrays = data_base._pack(_splits())
    path = tmp_path / "toy-race.npz"
    data_base.write_cache_file(path, arrays)
    stop, failures, reads = threading.Event(), [], [0]

    def write() -> None:
        while not stop.is_set():
            data_base.write_cache_file(path, arrays)

    def read() -> None:
        for _ in range(150):
            if data_base.read_cache_file(path) is None:
                failures.append("a partial or damaged file was seen")
            reads[0] += 1
        stop.set()

    threads = [threading.Thread(target=write), threading.Thread(target=write), threading.Thread(target=read)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == [] and reads[0] == 150
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_cache_and_result_files_get_the_users_umask(umask: int, mode: int, tmp_path: Path) -> None:
    old = os.umask(umask)
    try:
        cached_splits(tmp_path, "toy", {"k": 1}, CountingBuild())
        result = write_new(tmp_path / "metrics.json", "{}\n")
        summary = write_replace(tmp_path / "summary.csv", "a\n")
        weights = tmp_path / "defended.safetensors"
        with files.atomic_path(weights, overwrite=False) as tmp:  # a writer that replaces the temp file (0600)
            save_file({"w": torch.zeros(2)}, str(tmp))
    finally:
        os.umask(old)
    (cache,) = tmp_path.glob("toy-*.npz")
    for path in (cache, result, summary, weights):
        assert path.stat().st_mode & 0o777 == mode, path


def test_weights_files_get_the_users_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        save_weights(nn.Linear(2, 2), tmp_path / "model.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o644


# ----------------------------------------------------------------------------- results
def test_full_disk_while_writing_a_result_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(self: Path, *args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError, match="No space left on device") as raised:
        write_new(tmp_path / "metrics.json", json.dumps({"asr": 0.1}))
    assert user_error_line(raised.value) == "OSError: [Errno 28] No space left on device"
    assert list(tmp_path.iterdir()) == []  # neither metrics.json nor a temp file


def test_results_are_never_overwritten_even_in_a_race(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    write_new(path, "first\n")
    with pytest.raises(FileExistsError, match="never overwritten"):
        write_new(path, "second\n")
    assert path.read_text() == "first\n"
    outcomes: list[str] = []
    barrier = threading.Barrier(4)

    def writer(text: str) -> None:
        barrier.wait()
        try:
            write_new(tmp_path / "raced.json", text * 10_000)
            outcomes.append("written")
        except FileExistsError:
            outcomes.append("refused")

    threads = [threading.Thread(target=writer, args=(f"{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    text = (tmp_path / "raced.json").read_text()
    assert len(text) == 10_000 and len(set(text)) == 1  # one writer's whole file, never a mix
    assert sorted(outcomes) == ["refused", "refused", "refused", "written"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "raced.json"]


# ----------------------------------------------------------------------------- pruning every channel (forwarded)
def _conv_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 256, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 2))


def _loader() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 1, 4, 4, generator=generator), torch.arange(8) % 2) for _ in range(2)]


def test_no_prune_ratio_prunes_every_channel() -> None:
    from backdoor_lab.defenses.pruner import FinePruner

    torch.manual_seed(0)
    pruner = FinePruner(_conv_model(), prune_ratio=0.999, step=64)
    pruned = pruner.run(_loader())
    assert len(pruned) < 256


def test_no_stop_rule_prunes_every_channel() -> None:
    """Even a stop rule that accepts any accuracy (max_accuracy_drop=1.0) keeps one channel."""
    from backdoor_lab.defenses.pruner import FinePruner

    torch.manual_seed(0)
    pruner = FinePruner(_conv_model(), max_accuracy_drop=1.0, step=64, full_curve=True)
    pruned = pruner.run(_loader())
    assert len(pruned) == 255 and pruner.prune_curve[-1]["pruned"] == 255
