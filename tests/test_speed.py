"""``speed=fast`` (channels-last convs; bf16 autocast where the hardware runs it): the same model and results up to
rounding, one switch.

The speed itself is measured by ``bench/train_throughput.py`` (docs/benchmarks.md), never timed here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import TensorDataset

from backdoor_lab import build
from backdoor_lab.build import Evaluations, evaluation_key
from backdoor_lab.defenses import DefenderData, DefenseContext, FineTuneBudget
from backdoor_lab.defenses.methods import fine_tune
from backdoor_lab.defenses.network_split import split_network
from backdoor_lab.machine import cpu_identity, cpu_name, describe_device, fast_precision
from backdoor_lab.models.classifier import BackdoorClassifier
from backdoor_lab.pipeline import build_datamodule, build_model, defend, train
from backdoor_lab.runs import train_key, training_config

from .conftest import ROOT
from .test_pipeline import TINY_SIGNS, compose_run
from .trainers import quiet_trainer

pytestmark = pytest.mark.usefixtures("one_thread")

TASKS = {"signs_badnets": (18, (3, 32, 32)), "face_sunglasses": (100, (3, 55, 47)), "speech_noise": (10, (1, 40, 63))}


@pytest.mark.parametrize("experiment", list(TASKS))
def test_channels_last_is_the_same_network_in_another_memory_order(experiment: str, tmp_path: Path) -> None:
    classes, shape = TASKS[experiment]
    plain_cfg = compose_run("train", tmp_path, "a", [f"experiment={experiment}"])
    fast_cfg = compose_run("train", tmp_path, "b", [f"experiment={experiment}", "speed=fast"])
    assert fast_cfg.model.channels_last and fast_cfg.trainer.precision == fast_precision("cpu")
    assert not plain_cfg.model.channels_last and plain_cfg.trainer.get("precision") is None  # fp32
    torch.manual_seed(0)
    plain = build_model(plain_cfg, classes).eval()
    fast = build_model(fast_cfg, classes).eval()
    fast.load_state_dict(plain.state_dict())  # copy_ keeps the channels-last strides
    conv = next(m for m in fast.net.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    x = torch.randn(4, *shape)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-4, atol=1e-5)
    # torch.fx still traces the model: the prune curve keeps its cut (a re-evaluation per step otherwise)
    assert split_network(fast, fast.prune_layer).head is not None
    # and the memory order is not part of what defines the trained model (the precision is)
    assert train_key(training_config(plain_cfg)) != train_key(training_config(fast_cfg))
    same_precision = compose_run("train", tmp_path, "c", [f"experiment={experiment}", "model.channels_last=true"])
    assert train_key(training_config(plain_cfg)) == train_key(training_config(same_precision))


def test_speed_fast_trains_and_defends_and_saves_plain_weights(tmp_path: Path) -> None:
    overrides = [*TINY_SIGNS, "speed=fast", "defenses=[fine_pruning]", "fine_tune.epochs=2"]
    cfg = compose_run("train", tmp_path, "fast", overrides)
    result = train(cfg)
    job = Path(cfg.paths.run_dir)
    assert json.loads((job / "metrics.json").read_text())["config"]["trainer"]["precision"] == fast_precision("cpu")
    weights = load_file(str(job / "model.safetensors"))
    assert all(t.is_contiguous() for t in weights.values())
    stock = build_model(compose_run("train", tmp_path, "stock", TINY_SIGNS), 18)
    stock.load_state_dict(weights)  # plain weights: the stock fp32, contiguous model loads them
    record = result["defenses"]["fine_pruning"]
    assert record["pruned_channels"] and record["fine_tune"]["epochs"] == cfg.fine_tune.epochs


@pytest.mark.parametrize(
    ("flags", "overrides", "precision"),
    [
        ({"avx2", "amx_bf16", "avx512_bf16"}, [], "bf16-mixed"),
        ({"avx2", "avx512f", "avx512_bf16"}, [], "bf16-mixed"),
        ({"avx2", "avx512f"}, [], "32-true"),  # an AVX-512 CPU without bf16 instructions emulates it too
        ({"avx2"}, [], "32-true"),
        ({"avx2"}, ["trainer=gpu"], "bf16-mixed"),
        ({"avx2"}, ["trainer.precision=bf16-mixed"], "bf16-mixed"),  # what the user sets, stands
    ],
)
def test_speed_fast_takes_bf16_only_where_the_hardware_runs_it(
    flags: set[str], overrides: list[str], precision: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Emulated bf16 (no AMX / AVX-512 BF16) trained 7-13x slower than fp32 on an AVX2 CPU: speed=fast is fp32 there."""
    cpu_identity()  # cached from the real flags first: the evaluation keys of later tests must not see these
    monkeypatch.setattr("backdoor_lab.machine.cpu_flags", lambda: flags)
    cfg = compose_run("train", tmp_path, "fast", [*TINY_SIGNS, "speed=fast", *overrides])
    assert cfg.trainer.precision == precision and cfg.model.channels_last
    assert training_config(cfg)["trainer.precision"] == precision  # the run's key and record hold the choice


@pytest.mark.parametrize(("flags", "warned"), [({"avx2"}, True), ({"avx2", "amx_bf16"}, False)])
def test_bf16_on_a_cpu_that_emulates_it_warns_with_the_fix(
    flags: set[str], warned: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cpu_identity()  # cached from the real flags first: the evaluation keys of later tests must not see these
    monkeypatch.setattr("backdoor_lab.machine.cpu_flags", lambda: flags)
    for precision, asked in (("bf16-mixed", True), ("32-true", False)):
        cfg = compose_run("train", tmp_path, precision, [*TINY_SIGNS, f"+trainer.precision={precision}"])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            build.build_trainer(cfg, tmp_path / precision, [], 1)
        messages = [str(w.message) for w in caught if "bf16 instructions" in str(w.message)]
        assert len(messages) == (warned and asked), messages
        assert all("trains 7-13x slower than fp32" in m and "speed=fast picks fp32" in m for m in messages)


def test_the_benches_name_the_cpu_by_its_model_else_what_platform_knows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("backdoor_lab.machine.cpu_fields", lambda: {"model name": "Some Xeon"})
    assert cpu_name() == "Some Xeon"
    monkeypatch.setattr("backdoor_lab.machine.cpu_fields", dict)  # no /proc/cpuinfo (macOS, Windows)
    monkeypatch.setattr("platform.processor", lambda: "")
    monkeypatch.setattr("platform.machine", lambda: "arm64")
    assert cpu_name() == "arm64"


def test_every_timing_bench_prints_the_device_its_figures_were_taken_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """So that a figure can be re-taken on a GPU and told apart: the CPU's model, threads and bf16 units."""
    monkeypatch.setattr("backdoor_lab.machine.cpu_fields", lambda: {"model name": "Some Xeon", "flags": "avx2"})
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        line = describe_device("cpu")
    finally:
        torch.set_num_threads(threads)
    assert line.startswith("device: cpu (Some Xeon, 3 threads; bf16 instructions: none")
    monkeypatch.setattr("backdoor_lab.machine.cpu_fields", lambda: {"model name": "X", "flags": "avx2 amx_bf16"})
    assert "bf16 instructions: amx_bf16)" in describe_device()
    monkeypatch.setattr("torch.cuda.get_device_name", lambda device=None: "NVIDIA H100")
    assert describe_device("cuda").startswith("device: cuda (NVIDIA H100)")
    untimed = {"export_records.py", "precision_compare.py", "first_fit.py"}  # records read, a job_cost callback
    for script in sorted({p.name for p in (ROOT / "bench").glob("*.py")} - untimed):
        assert "describe_device(" in (ROOT / "bench" / script).read_text(), script


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here: bench/gpu_checks.sh would run")
def test_the_gpu_checks_script_refuses_a_machine_without_cuda_and_writes_nothing(tmp_path: Path) -> None:
    """bench/gpu_checks.sh (issue 18's GPU checks in one device run) says why it stops where no GPU is, before any
    step: a CPU machine's figures must not land in the folder meant for the GPU's."""
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(ROOT / "bench/gpu_checks.sh"), str(out)], capture_output=True, text=True)
    assert done.returncode == 1
    assert "no CUDA device here (torch.cuda.is_available() is False)" in done.stderr
    assert not out.exists()
    usage = subprocess.run(["bash", str(ROOT / "bench/gpu_checks.sh")], capture_output=True, text=True)
    assert usage.returncode != 0 and "usage: bash bench/gpu_checks.sh OUT_FOLDER" in usage.stderr


class CountValidation(Callback):
    def __init__(self) -> None:
        self.at_epochs: list[int] = []
        self.sanity = 0

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            self.sanity += 1
        else:
            self.at_epochs.append(trainer.current_epoch)


def _fine_tuned(every: int, counter: Callback | None = None) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """A tiny model fine-tuned 4 epochs through ``fine_tune``: its record, its final weights, and torch's generator
    state after the fit (what the test pass and the next defense start from)."""
    torch.manual_seed(0)
    model = BackdoorClassifier(
        nn.Sequential(nn.Conv2d(1, 4, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)),
        num_classes=2,
        optimizer=partial(torch.optim.SGD, lr=0.1),
    )
    g = torch.Generator().manual_seed(1)
    clean = TensorDataset(torch.randn(32, 1, 4, 4, generator=g), torch.randint(0, 2, (32,), generator=g))
    ones, zeros = torch.ones(8, dtype=torch.long), torch.zeros(8, dtype=torch.long)
    triggered = TensorDataset(torch.randn(8, 1, 4, 4, generator=g), ones, zeros)
    data = DefenderData(clean, triggered, class_names=["a", "b"], batch_size=8, eval_batch_size=8)
    budget = FineTuneBudget(epochs=4, optimizer=partial(torch.optim.SGD, lr=0.1), val_every_n_epochs=every)
    torch.manual_seed(5)
    context = DefenseContext(model, data, lambda cbs, n: quiet_trainer(None, cbs, n))
    record = fine_tune(context, budget, [counter] if counter else [])
    return record, torch.cat([p.detach().flatten() for p in model.parameters()]), torch.get_rng_state()


@pytest.mark.parametrize("every, expected", [(0, []), (1, [0, 1, 2, 3]), (2, [1, 3]), (4, [3])])
def test_the_fine_tuning_validates_as_often_as_its_budget_says(every: int, expected: list[int]) -> None:
    """Validation during the defense's fine-tuning is monitoring only (it trains on that split): by default never,
    and never a sanity pass, whatever Trainer the factory builds (one that would validate every epoch here)."""
    counter = CountValidation()
    record, _, _ = _fine_tuned(every, counter)
    assert record["steps"] == 16 and counter.at_epochs == expected and counter.sanity == 0
    with pytest.raises(ValueError, match="val_every_n_epochs"):
        FineTuneBudget(epochs=4, optimizer=partial(torch.optim.SGD, lr=0.1), val_every_n_epochs=-1)


def test_validating_less_often_ends_on_the_same_weights_and_generator() -> None:
    """A skipped validation still draws what it would have drawn from torch's generator (``SkippedValidationDraws``):
    without it the later epochs would shuffle differently and the weights would differ (checked: they do). Never
    validating also skips the last epoch's pass, and leaves the generator where validating after it did."""
    _, every_epoch, generator = _fine_tuned(1)
    for every in (0, 2, 3, 4):
        _, weights, after = _fine_tuned(every)
        assert torch.equal(weights, every_epoch) and torch.equal(after, generator), every


def test_compile_trains_through_the_compiled_network_and_keeps_the_weights_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``compile=true`` compiles the network in place for training only: the weights keep their names (defenses
    and defend.py load them), the training key is the uncompiled run's, and bad values are refused first.

    Dynamo's ``eager`` backend stands in for inductor (its C++ build takes a minute on this CPU): the graph
    capture is the same, so a network that cannot be compiled, or a name that changes, fails here.
    """
    compiled: list[nn.Module] = []
    frames: list[object] = []
    original = nn.Module.compile

    def compile_eagerly(self: nn.Module, *args, **kwargs) -> None:
        compiled.append(self)
        original(self, backend=lambda graph, inputs: frames.append(graph) or graph.forward)

    monkeypatch.setattr(nn.Module, "compile", compile_eagerly)
    torch._dynamo.reset()
    cfg = compose_run("train", tmp_path, "compiled", [*TINY_SIGNS, "compile=true"])
    result = train(cfg)
    plain_cfg = compose_run("train", tmp_path, "plain", TINY_SIGNS)
    stock = build_model(plain_cfg, 18)
    assert [type(m) for m in compiled] == [type(stock.net)] and frames  # the network, traced by dynamo
    assert train_key(training_config(cfg)) == train_key(training_config(plain_cfg))
    weights = load_file(str(Path(cfg.paths.run_dir) / "model.safetensors"))
    assert set(weights) == set(stock.state_dict())  # no "_orig_mod." prefix: defend.py loads them
    assert 0 <= result["train"]["clean_acc"] <= 1
    with pytest.raises(Exception, match="compile must be true or false"):
        train(compose_run("train", tmp_path, "bad", [*TINY_SIGNS, "compile=yes"]))


def test_speed_exact_validates_every_5th_epoch_and_trains_the_very_same_weights(tmp_path: Path) -> None:
    """``speed=exact``: training validates less often, its skipped passes still make their generator draws, and the
    weights are bit-identical to validation every epoch; without the draws (the bare switch) they are not."""
    weights, keys = {}, {}
    for name, overrides in {
        "every_epoch": [],
        "exact": ["speed=exact"],
        "bare": ["+trainer.check_val_every_n_epoch=5"],
    }.items():
        cfg = compose_run("train", tmp_path, name, [*TINY_SIGNS, "trainer.max_epochs=6", "reuse=false", *overrides])
        keys[name] = train_key(training_config(cfg))
        train(cfg)
        weights[name] = load_file(str(Path(cfg.paths.run_dir) / "model.safetensors"))
        logged = (Path(cfg.paths.run_dir) / "csv" / "metrics.csv").read_text().splitlines()
        header = logged[0].split(",")
        val_epochs = sorted(
            {
                row.split(",")[header.index("epoch")]
                for row in logged[1:]
                if row.split(",")[header.index("val/clean_acc")]
            }
        )
        assert val_epochs == (["0", "1", "2", "3", "4", "5"] if name == "every_epoch" else ["4"]), name
    assert weights["exact"].keys() == weights["every_epoch"].keys()
    assert all(torch.equal(weights["exact"][k], weights["every_epoch"][k]) for k in weights["exact"])
    assert not all(torch.equal(weights["bare"][k], weights["every_epoch"][k]) for k in weights["bare"])
    # so speed=exact reuses (and is reused by) training runs that validate every epoch; the bare switch is its own
    assert keys["exact"] == keys["every_epoch"] != keys["bare"]


@pytest.fixture
def passes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The test passes run from here on, each named by its job's folder."""
    names: list[str] = []
    real_evaluate = build.evaluate

    def counted(cfg, model, dm):
        names.append(Path(cfg.paths.run_dir).name)
        return real_evaluate(cfg, model, dm)

    monkeypatch.setattr(build, "evaluate", counted)
    return names


def test_a_job_tests_the_undefended_weights_once_and_defends_them_bit_for_bit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, passes: list[str]
) -> None:
    """``train.py`` tested its model when training ended; each defense then tests the same saved weights before
    it runs, and ``none`` after it: one pass serves them all (``Evaluations``). Each reuse replays the pass's
    generator draws, so the defenses end on the very weights and numbers of a job that tests every time."""
    overrides = [*TINY_SIGNS, "reuse=false", "defenses=[none,fine_tuning,fine_pruning]", "fine_tune.epochs=1"]
    jobs = {}
    for name in ("reused", "every_time"):
        if name == "every_time":
            monkeypatch.setattr(Evaluations, "remember", lambda self, weights: None)
        cfg = compose_run("train", tmp_path, name, overrides)
        train(cfg)
        jobs[name] = Path(cfg.paths.run_dir)
    # training's pass, then the passes after fine-tuning and after fine-pruning; testing every time adds 4
    assert passes.count("reused") == 3 and passes.count("every_time") == 7
    for defense in ("none", "fine_tuning", "fine_pruning"):
        reused, every_time = (json.loads((jobs[n] / "defense" / defense / "metrics.json").read_text()) for n in jobs)
        assert (reused["before"], reused["after"]) == (every_time["before"], every_time["after"]), defense
        weights = [load_file(str(jobs[n] / "defense" / defense / "defended.safetensors")) for n in jobs]
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[1]), defense
    trained = json.loads((jobs["reused"] / "metrics.json").read_text())
    assert reused["before"] == {"clean_acc": trained["clean_acc"], "asr": trained["asr"]}


def test_defend_takes_the_training_runs_test_pass_and_defends_bit_for_bit(tmp_path: Path, passes: list[str]) -> None:
    """``defend.py`` on a run trained on this machine reads the undefended score from the run's metrics.json
    (``test_pass``: its key and generator draws) instead of testing the same weights again, and replays the draws:
    the defense ends on the weights and numbers of ``reuse=false``, which tests them."""
    train_cfg = compose_run("train", tmp_path, "trained", [*TINY_SIGNS, "reuse=false"])
    train(train_cfg)
    model_file = Path(train_cfg.paths.run_dir) / "model.safetensors"
    trained = json.loads((model_file.parent / "metrics.json").read_text())
    assert trained["test_pass"]["draws"] == 2  # a clean and a triggered test loader, a base seed each
    jobs = {}
    for name, reuse in (("reused", True), ("tested", False)):
        overrides = [*TINY_SIGNS, f"ckpt_path={model_file}", "fine_tune.epochs=1", f"reuse={reuse}"]
        cfg = compose_run("defend", tmp_path, name, overrides)
        defend(cfg)
        jobs[name] = Path(cfg.paths.run_dir) / "defense" / "fine_pruning"
    assert (passes.count("reused"), passes.count("tested")) == (1, 2)  # after only; before and after
    reused, tested = (json.loads((jobs[n] / "metrics.json").read_text()) for n in jobs)
    assert reused["before"] == {"clean_acc": trained["clean_acc"], "asr": trained["asr"]} == tested["before"]
    assert reused["after"] == tested["after"] and reused["pruned_channels"] == tested["pruned_channels"]
    weights = [load_file(str(jobs[n] / "defended.safetensors")) for n in jobs]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[1])


def test_the_evaluation_key_moves_with_what_moves_a_test_pass_and_only_with_that(tmp_path: Path) -> None:
    """The key of a recorded test pass changes with the weights, the test data, the threads and the precision (any
    of which can change a score's last bits), not with settings a test pass never reads; off the CPU there is none."""
    cfg = compose_run("defend", tmp_path, "a", TINY_SIGNS)
    dm = build_datamodule(cfg, fit_on="defender_clean")
    weights = tmp_path / "model.safetensors"
    build.save_weights(build_model(cfg, dm.num_classes), weights)
    key = evaluation_key(cfg, dm, weights)
    assert key == evaluation_key(cfg, dm, weights)
    assert key == evaluation_key(
        compose_run("defend", tmp_path, "b", [*TINY_SIGNS, "trainer.max_epochs=7"]), dm, weights
    )
    assert key != evaluation_key(
        compose_run("defend", tmp_path, "c", [*TINY_SIGNS, "+trainer.precision=bf16-mixed"]), dm, weights
    )
    assert key != evaluation_key(
        compose_run("defend", tmp_path, "d", [*TINY_SIGNS, "data.eval_batch_size=7"]), dm, weights
    )
    assert evaluation_key(compose_run("defend", tmp_path, "e", [*TINY_SIGNS, "trainer=gpu"]), dm, weights) is None
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        assert key != evaluation_key(cfg, dm, weights)
    finally:
        torch.set_num_threads(threads)
    other = tmp_path / "other.safetensors"
    build.save_weights(build_model(cfg, dm.num_classes), other)  # the same net drawn from the generator again
    assert key != evaluation_key(cfg, dm, other)
    dm.dataset("test_triggered").tensors[0][0, 0, 0, 0] += 1
    assert key != evaluation_key(cfg, dm, weights)


def test_a_recorded_test_pass_is_taken_only_whole_and_under_this_jobs_key() -> None:
    """A record with another key, no key, a damaged draw count or score is not taken (the weights are tested);
    a taken one gives the recorded score and makes the pass's draws from torch's generator."""
    tests = Evaluations(OmegaConf.create({}))
    good = {"clean_acc": 0.9, "asr": 0.1, "test_pass": {"key": "k", "draws": 2}}
    assert not tests.recall("w", good, "another key")
    assert not tests.recall("w", good, None)
    assert not tests.recall("w", {**good, "test_pass": {"key": "k", "draws": -1}}, "k")
    assert not tests.recall("w", {**good, "test_pass": {"key": "k", "draws": "2"}}, "k")
    assert not tests.recall("w", {**good, "asr": None}, "k")
    assert not tests.recall("w", {"clean_acc": 0.9, "asr": 0.1}, "k")  # a run from before the record existed
    assert not tests.knows("w")
    assert tests.recall("w", good, "k") and tests.knows("w")
    torch.manual_seed(3)
    assert tests.score(None, None, weights="w") == {"clean_acc": 0.9, "asr": 0.1}
    after_reuse = torch.get_rng_state()
    torch.manual_seed(3)
    for _ in range(2):  # what starting two DataLoader iterators draws
        torch.empty((), dtype=torch.int64).random_()
    assert torch.equal(after_reuse, torch.get_rng_state())
    assert tests.passes == 0


STEP_FAULTS = """
import ctypes, resource, torch
from backdoor_lab import cli
def step():  # what a speech training step allocates and frees: 15 MB activations and gradients, smaller maps
    blocks = [torch.ones(64, 24, 40, 63), torch.ones(64, 64, 20, 31), torch.ones(64, 24, 20, 31)]
    blocks += [torch.ones_like(b) for b in blocks]
    del blocks
def faults_per_step():
    for _ in range(3):  # the heap grows to the step's peak
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
ctypes.CDLL(None).mallopt(cli.M_MMAP_THRESHOLD, 128 << 10)  # glibc's starting threshold, held (see the test)
print(faults_per_step())
jobs = (cli.train_job.__wrapped__, cli.defend_job.__wrapped__)  # in the job's process, a launcher's too
print(all(cli.keep_freed_memory.__name__ in f.__code__.co_names for f in jobs) and cli.keep_freed_memory())
print(faults_per_step())
"""


def test_a_script_keeps_freed_memory_for_the_next_step_instead_of_faulting_it_in_again() -> None:
    """glibc returns freed blocks of a step to the kernel and the next step faults the pages back in (zero-filled):
    up to 14,000 faults and 15-25 ms of system time in a 200 ms speech step. Each job keeps them
    (``cli.keep_freed_memory``). glibc's threshold adapts to the sizes freed, so how many faults a default process
    takes varies from run to run (0 to 13,660 a step over six runs here); the process starts from glibc's
    starting threshold, held, so that the comparison is the same every run."""
    if sys.platform != "linux":
        pytest.skip("glibc's malloc: other platforms keep their allocator")
    done = subprocess.run([sys.executable, "-c", STEP_FAULTS], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    default, applied, kept = done.stdout.split()
    assert float(default) > 10_000  # every block above 128 KiB mapped afresh: 40 MB of pages a step
    assert applied == "True" and float(kept) < float(default) / 10  # 0 in ten runs here: the heap keeps the pages


SCRIPT_START = """
import atexit, gc, sys
walked = []
gc.callbacks.append(lambda phase, info: phase == "start" and walked.append(info["generation"]))
atexit.register(lambda: print("frozen at the very end", gc.get_freeze_count() - after_start, flush=True))
from backdoor_lab.cli import start_script
walked.clear()
start_script()
after_start = gc.get_freeze_count()
print("collections during the import", len(walked), "lightning", "lightning.pytorch" in sys.modules)
print("frozen by the import", after_start, "collecting", gc.isenabled())
class Cycle:
    pass
for _ in range(3):
    a, b = Cycle(), Cycle()
    a.other, b.other = b, a
del a, b
print("the job's own cycles still collected", gc.collect())
kept = [Cycle() for _ in range(20000)]
"""


def test_a_script_imports_without_collecting_and_leaves_its_heap_frozen_for_the_exit() -> None:
    """``train.py``/``defend.py`` start: Lightning's import walks no collection (1,000 of them cost 0.5-1 s, and the
    full one after it 1 s), what it made is frozen out of later collections, the job's own garbage is still
    collected, and the heap is frozen again after every atexit handler (the teardown then walks nothing: 1.3 s)."""
    done = subprocess.run([sys.executable, "-c", SCRIPT_START], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    assert out[0] == "collections during the import 0 lightning True"
    frozen, collecting = out[1].removeprefix("frozen by the import ").split(" collecting ")
    assert int(frozen) > 200_000 and collecting == "True"
    assert int(out[2].removeprefix("the job's own cycles still collected ")) >= 6
    assert int(out[3].removeprefix("frozen at the very end ")) > 10_000  # the job's 20,000 too, at exit
