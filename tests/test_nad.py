"""NAD (Li et al., ICLR 2021): known answers for the attention maps and the loss, the distillation's mechanism, a
planted backdoor that NAD removes within a budget in which fine-tuning alone leaves it, and the callback's Lightning
life cycle (precision, checkpoints, the plug-in, the config).

The mechanism tests use a student whose own loss is zero, so the attention term is the only thing that can move it:
it must move toward a teacher whose attention differs, must not move at all for a teacher identical to itself, and
the size of its first step must be the one the betas give. A callback that distils from the wrong teacher, leaves
the term out of the backpropagated loss or ignores the betas fails them.
"""

from __future__ import annotations

import copy
import math
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from backdoor_lab.defenses import DefenderData, DefenseContext, FineTuneBudget, FineTuning
from backdoor_lab.defenses.attention import attention_loss, attention_map, captured_features
from backdoor_lab.defenses.nad import NAD, NADCallback, NADSettings
from backdoor_lab.models.classifier import BackdoorClassifier
from tests.test_known_answer import attack_success, clean_accuracy, make_trainer, snapshot
from tests.trainers import quiet_trainer

TARGET = 0


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------------------------
# Attention transfer: known answers
# --------------------------------------------------------------------------------------------------------------


def test_attention_map_is_the_normalized_channel_mean_of_abs_f_to_the_p() -> None:
    # one sample, two channels, 2x2: channel 0 [[1, -2], [0, 3]], channel 1 [[1, 2], [2, 1]]
    f = torch.tensor([[[[1.0, -2.0], [0.0, 3.0]], [[1.0, 2.0], [2.0, 1.0]]]])
    # p = 2: mean over channels of f^2 = [1, 4, 2, 5]; its L2 norm is sqrt(46)
    expected = torch.tensor([[1.0, 4.0, 2.0, 5.0]]) / math.sqrt(46.0)
    torch.testing.assert_close(attention_map(f, 2.0), expected)
    # p = 1: mean of |f| = [1, 2, 1, 2] (the sign of -2 must not matter); norm sqrt(10)
    torch.testing.assert_close(attention_map(f, 1.0), torch.tensor([[1.0, 2.0, 1.0, 2.0]]) / math.sqrt(10.0))
    # each sample is normalized on its own, and the layer's scale does not matter
    batch = torch.cat([f, 10 * f])
    torch.testing.assert_close(attention_map(batch, 2.0), expected.expand(2, 4))
    assert attention_map(f.bfloat16(), 2.0).dtype == torch.float32  # low precision promoted for the norm
    with pytest.raises(ValueError, match="name a convolutional stage"):
        attention_map(torch.ones(2, 5), 2.0)


def test_attention_loss_is_zero_for_identical_features_and_the_beta_weighted_mse_otherwise() -> None:
    # maps: a puts all attention on position 0, b on position 1 -> squared difference (1 + 1) over 4 positions
    a = torch.zeros(1, 3, 2, 2)
    a[0, :, 0, 0] = 2.0
    b = torch.zeros(1, 3, 2, 2)
    b[0, :, 0, 1] = 5.0
    assert float(attention_loss([a], [a], [1000.0])) == 0.0
    assert float(attention_loss([a, b], [a.clone(), b.clone()], [7.0, 3.0])) == 0.0
    assert float(attention_loss([a], [b], [1.0])) == pytest.approx(0.5)
    assert float(attention_loss([a, a], [b, a], [3.0, 100.0])) == pytest.approx(1.5)  # beta_1 * 0.5 + beta_2 * 0
    assert float(attention_loss([a, b], [b, a], [3.0, 2.0])) == pytest.approx(2.5)  # 3 * 0.5 + 2 * 0.5
    # the teacher's side carries no gradient
    s, t = a.clone().requires_grad_(), b.clone().requires_grad_()
    attention_loss([s + 0.1], [t + 0.1], [1.0]).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


# --------------------------------------------------------------------------------------------------------------
# The distillation's mechanism: a student whose own loss is zero
# --------------------------------------------------------------------------------------------------------------


class ConvNet(nn.Module):
    """conv 1 -> 4 (3x3) -> ReLU (the distilled layer) -> mean over space -> linear: spatial attention to move."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.relu(self.conv(x)).mean(dim=(2, 3)))


def images(n: int = 16, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 2, (n,), generator=g))


class DistilOnly(L.LightningModule):
    """Plain SGD (no momentum, no weight decay) on a loss of exactly zero: only NAD's term can move the weights.

    ``dict_output`` returns ``{"loss": ...}`` instead of a Tensor, the other form Lightning accepts.
    """

    def __init__(self, seed: int = 0, lr: float = 0.5, dict_output: bool = False) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = ConvNet()
        self.lr = lr
        self.dict_output = dict_output

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        loss = 0.0 * self(batch[0]).sum()
        return {"loss": loss} if self.dict_output else loss

    def train_dataloader(self):
        return DataLoader(images(), batch_size=16)

    def val_dataloader(self):
        return DataLoader(images(), batch_size=16)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


@torch.no_grad()
def distance(student: nn.Module, teacher: nn.Module, layer: str = "net.relu") -> float:
    """The attention distance at ``layer`` on the whole data set, measured here, not by the callback."""
    x = images().tensors[0]
    with captured_features(student, [layer]) as s:
        student(x)
    with captured_features(teacher, [layer]) as t:
        teacher(x)
    return float((attention_map(s()[0]) - attention_map(t()[0])).pow(2).mean())


def distil(
    student: L.LightningModule, callback: NADCallback, tmp_path: Path, epochs: int = 20, ckpt_path=None, **kw
) -> None:
    quiet_trainer(tmp_path, [callback], epochs, num_sanity_val_steps=0, **kw).fit(student, ckpt_path=ckpt_path)


def test_the_students_attention_moves_to_a_different_teachers(tmp_path) -> None:
    student, teacher = DistilOnly(seed=0), DistilOnly(seed=1)
    before = distance(student, teacher)
    assert before > 1e-3  # two random nets attend differently
    callback = NADCallback(layers=["net.relu"], betas=[50.0], teacher=teacher)
    distil(student, callback, tmp_path)
    after = distance(student, teacher)
    assert after < 0.05 * before
    # the callback measured the same thing, and its first step's term is beta times the distance it started from
    assert callback.distance["before"]["net.relu"] == pytest.approx(before, rel=1e-5)
    assert callback.distance["after"]["net.relu"] == pytest.approx(after, rel=1e-4)
    assert callback.attention_loss_record()["first"] == pytest.approx(50.0 * before, rel=1e-5)
    assert callback.attention_loss_record()["last"] < 0.05 * 50.0 * before
    assert "training_step" not in vars(student)  # the wrap is gone after the fit


@pytest.mark.parametrize("dict_output", [False, True])
def test_one_step_is_exactly_the_gradient_of_the_beta_weighted_term(tmp_path, dict_output: bool) -> None:
    """The weights change by -lr * grad(beta * distance): the term is in the loss Lightning backpropagates, with
    its beta, against the given teacher (a Tensor or a dict loss)."""
    student, teacher = DistilOnly(seed=0, dict_output=dict_output), DistilOnly(seed=1)
    expected = copy.deepcopy(student.net)
    x = images().tensors[0]
    with captured_features(expected, ["relu"]) as s:
        expected(x)
    with torch.no_grad(), captured_features(teacher.net, ["relu"]) as t:
        teacher.net(x)
    (7.0 * (attention_map(s()[0]) - attention_map(t()[0])).pow(2).mean()).backward()
    with torch.no_grad():
        for p in expected.parameters():
            if p.grad is not None:  # the head is not in the term
                p -= student.lr * p.grad
    distil(student, NADCallback(layers=["net.relu"], betas=[7.0], teacher=teacher), tmp_path, epochs=1)
    for (name, got), want in zip(student.net.named_parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(got, want, msg=name)
    assert not torch.equal(student.net.conv.weight, DistilOnly(seed=0).net.conv.weight)


def test_a_teacher_identical_to_the_student_gives_zero_loss_and_no_movement(tmp_path) -> None:
    student = DistilOnly(seed=0)
    before = snapshot(student)
    callback = NADCallback(layers=["net.relu"], betas=[1000.0], teacher=copy.deepcopy(student))
    distil(student, callback, tmp_path, epochs=3)
    record = callback.attention_loss_record()
    assert record["first"] == 0.0 and record["last"] == 0.0 and record["epoch_mean"] == [0.0, 0.0, 0.0]
    after = snapshot(student)
    assert all(torch.equal(after[k], before[k]) for k in before)
    with pytest.raises(MisconfigurationException, match="teacher is the student itself"):
        distil(student, NADCallback(layers=["net.relu"], betas=[1.0], teacher=student), tmp_path)


def test_betas_weight_the_term(tmp_path) -> None:
    firsts = {}
    for beta in (0.0, 2.0, 6.0):
        student = DistilOnly(seed=0)
        before = snapshot(student)
        callback = NADCallback(layers=["net.relu"], betas=[beta], teacher=DistilOnly(seed=1))
        distil(student, callback, tmp_path, epochs=1)
        firsts[beta] = callback.attention_loss_record()["first"]
        moved = any(not torch.equal(v, before[k]) for k, v in snapshot(student).items())
        assert moved == (beta > 0)
    assert firsts[0.0] == 0.0 and firsts[6.0] == pytest.approx(3 * firsts[2.0], rel=1e-6) and firsts[2.0] > 0


# --------------------------------------------------------------------------------------------------------------
# The teacher: the module fine-tuned on the clean data only, without touching the student's random stream
# --------------------------------------------------------------------------------------------------------------


class CrossEntropyModule(DistilOnly):
    """Cross-entropy training; ``train_dataloader`` yields flipped labels, the clean data comes from elsewhere."""

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def train_dataloader(self):
        x, y = images().tensors
        return DataLoader(TensorDataset(x, 1 - y), batch_size=4, shuffle=True)


def full_batch_fine_tune(module: nn.Module, data: TensorDataset, epochs: int, lr: float) -> nn.Module:
    """The teacher by hand: full-batch SGD with cross-entropy (one batch per epoch, so the order does not matter)."""
    module = copy.deepcopy(module)
    optimizer = torch.optim.SGD(module.parameters(), lr=lr)
    x, y = data.tensors
    for _ in range(epochs):
        optimizer.zero_grad()
        F.cross_entropy(module(x), y).backward()
        optimizer.step()
    return module


def test_the_teacher_is_the_module_fine_tuned_on_the_clean_data_frozen_in_eval_mode(tmp_path) -> None:
    student = CrossEntropyModule(seed=0, lr=0.0)  # the student does not move: the teacher is all that changes
    initial = copy.deepcopy(student)
    clean = DataLoader(images(), batch_size=16)
    callback = NADCallback(
        layers=["net.relu"],
        betas=[1.0],
        teacher_epochs=4,
        teacher_optimizer=partial(torch.optim.SGD, lr=0.3),
        clean_dataloader=clean,
    )
    distil(student, callback, tmp_path, epochs=1)
    teacher = callback.teacher_module
    expected = full_batch_fine_tune(initial.net, images(), 4, 0.3)
    for (name, got), want in zip(teacher.net.named_parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(got, want, msg=name)
    wrong = full_batch_fine_tune(initial.net, TensorDataset(*[images().tensors[0], 1 - images().tensors[1]]), 4, 0.3)
    assert not torch.allclose(teacher.net.conv.weight, wrong.conv.weight)  # not fine-tuned on the fit's data
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert teacher is not student and teacher.net.conv.weight.data_ptr() != student.net.conv.weight.data_ptr()
    assert callback.teacher_record == {
        "given": False,
        "epochs": 4,
        "steps": 4,
        "samples": 16,
        "loss_epoch_mean": pytest.approx(callback.teacher_record["loss_epoch_mean"]),
    }
    losses = callback.teacher_record["loss_epoch_mean"]
    assert len(losses) == 4 and losses[-1] < losses[0]


class RngAtFirstEpoch(Callback):
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 0:
            self.state = torch.get_rng_state()


def test_making_the_teacher_leaves_the_students_random_stream_as_it_was(tmp_path) -> None:
    states = []
    for callbacks in ([], [NADCallback(layers=["net.relu"], betas=[1.0], teacher_epochs=3)]):
        probe = RngAtFirstEpoch()
        L.seed_everything(0, verbose=False)
        student = CrossEntropyModule(seed=0, lr=0.1)
        quiet_trainer(tmp_path, [*callbacks, probe], 1, num_sanity_val_steps=0).fit(student)
        states.append(probe.state)
    assert torch.equal(states[0], states[1])


# --------------------------------------------------------------------------------------------------------------
# A planted backdoor that NAD removes within a budget in which fine-tuning alone leaves it
# --------------------------------------------------------------------------------------------------------------


class AttentionPlantedNet(nn.Module):
    """Inputs 2 x 2 x 2: plane 0 holds the class (a one at position c), plane 1 a texture in the corner (position 3).

    1x1 conv -> ReLU (the distilled layer) -> flatten -> linear, weights by hand. Conv channel 0 copies the class
    plane; channel 1 is the backdoor, ReLU(texture - 0.3): it fires a little on clean inputs with corner texture
    (0.1, 0.3 for textures 0.4, 0.6) and 1.7 for the trigger (texture 2.0), and the head reads it at the corner for
    the target class with weight 3, against 2 for the class evidence: every triggered input goes to the target.

    Fine-tuning on clean data mostly scales up the class evidence (the fastest way to lower the clean loss), which
    outvotes the backdoor only after about ten full-batch epochs. The teacher (fine-tuned 10 epochs) has just done
    so: its attention sits on the class position, with little on the corner. Distilling toward it pushes the
    student's corner attention down, which silences the backdoor channel itself, within two epochs.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.relu = nn.ReLU()
        self.head = nn.Linear(8, 3)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(2, 2, 1, 1))
            self.conv.bias.copy_(torch.tensor([0.0, -0.3]))
            head = torch.zeros(3, 2, 4)
            for c in range(3):
                head[c, 0, c] = 2.0
            head[TARGET, 1, 3] = 3.0
            self.head.weight.copy_(head.view(3, 8))
            self.head.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.relu(self.conv(x)).flatten(1))


def attention_planted_data() -> tuple[TensorDataset, TensorDataset]:
    """Clean (x, y): each class with corner textures 0, 0.2, 0.4, 0.6; triggered (x, target, true): texture 2."""
    xs, ys = [], []
    for c in range(3):
        for texture in (0.0, 0.2, 0.4, 0.6):
            x = torch.zeros(2, 2, 2)
            x[0].view(-1)[c] = 1.0
            x[1].view(-1)[3] = texture
            xs.append(x)
            ys.append(c)
    x, y = torch.stack(xs), torch.tensor(ys)
    triggered = x.clone()
    triggered[:, 1, 1, 1] = 2.0
    return TensorDataset(x, y), TensorDataset(triggered, torch.full_like(y, TARGET), y)


def attention_planted_model() -> BackdoorClassifier:
    return BackdoorClassifier(
        net=AttentionPlantedNet(),
        num_classes=3,
        optimizer=partial(torch.optim.SGD, lr=0.5),
        attention_layers=["net.relu"],
    )


def defend(defense, model: BackdoorClassifier, clean: TensorDataset, triggered: TensorDataset) -> dict:
    data = DefenderData(clean, triggered, class_names=["a", "b", "c"], batch_size=12, eval_batch_size=12)
    L.seed_everything(0, verbose=False)
    return defense.apply(DefenseContext(model, data, make_trainer))


def test_nad_removes_a_planted_backdoor_that_same_budget_fine_tuning_leaves() -> None:
    """Full batches, so no shuffle order decides anything. What NAD adds here is the teacher's longer fine-tuning,
    carried over through attention: fine-tuning alone needs about as many epochs as teacher and student together."""
    clean, triggered = attention_planted_data()
    clean_loader, triggered_loader = DataLoader(clean, batch_size=12), DataLoader(triggered, batch_size=12)
    model = attention_planted_model()
    assert clean_accuracy(model, clean_loader) == 1.0 and attack_success(model, triggered_loader) == 1.0
    budget = FineTuneBudget(epochs=2, optimizer=partial(torch.optim.SGD, lr=0.5))

    fine_tuned = attention_planted_model()
    defend(FineTuning(budget), fine_tuned, clean, triggered)
    assert attack_success(fine_tuned, triggered_loader) == 1.0  # two epochs of fine-tuning leave the backdoor

    nad = NAD(NADSettings(betas=[100.0], teacher_epochs=10), budget)  # layers: the model's attention_layers
    distilled = attention_planted_model()
    record = defend(nad, distilled, clean, triggered)
    assert attack_success(distilled, triggered_loader) == 0.0 and clean_accuracy(distilled, clean_loader) == 1.0
    teacher = nad.callback.teacher_module
    assert attack_success(teacher, triggered_loader) == 0.0  # the teacher had lost the backdoor: NAD carried it over
    # ... by silencing the backdoor channel (its bias went down), not only by outvoting it
    assert float(distilled.net.conv.bias[1].detach()) < float(fine_tuned.net.conv.bias[1].detach()) - 0.15
    assert record["fine_tune"] == {"epochs": 2, "steps": 2, "fit_on": "defender_clean", "samples": 12}
    assert record["teacher"]["epochs"] == 10 and record["teacher"]["steps"] == 10 and record["teacher"]["samples"] == 12
    assert record["attention_distance"]["after"]["net.relu"] < record["attention_distance"]["before"]["net.relu"]

    # the control: the same budget and betas, distilling from the backdoored model itself (a teacher not fine-tuned)
    wrong = attention_planted_model()
    callback = NADCallback(layers=["net.relu"], betas=[100.0], teacher=copy.deepcopy(wrong))
    L.seed_everything(0, verbose=False)
    wrong.optimizer_factory = budget.optimizer
    data = DefenderData(clean, triggered, class_names=["a", "b", "c"], batch_size=12, eval_batch_size=12)
    make_trainer([callback], budget.epochs).fit(wrong, datamodule=data)
    assert attack_success(wrong, triggered_loader) == 1.0


# --------------------------------------------------------------------------------------------------------------
# The plug-in, its config, and the settings it refuses
# --------------------------------------------------------------------------------------------------------------


def test_the_plug_in_records_what_it_measured() -> None:
    clean, triggered = attention_planted_data()
    budget = FineTuneBudget(epochs=1, optimizer=partial(torch.optim.SGD, lr=0.5))
    record = defend(
        NAD(NADSettings(betas=[100.0], teacher_epochs=2), budget), attention_planted_model(), clean, triggered
    )
    assert set(record) == {
        "pruned_channels",
        "pruned_fraction",
        "fine_tune",
        "teacher",
        "attention_layers",
        "betas",
        "p",
        "attention_loss",
        "attention_distance",
    }
    assert record["pruned_channels"] == [] and record["pruned_fraction"] == 0.0
    assert record["attention_layers"] == ["net.relu"] and record["betas"] == [100.0] and record["p"] == 2.0
    assert record["teacher"]["given"] is False and record["teacher"]["steps"] == 2
    loss = record["attention_loss"]
    assert loss["first"] > 0 and loss["first"] == loss["last"] and loss["epoch_mean"] == [loss["first"]]  # one step
    # the first step's term is the weighted distance the callback measured before the fit (one full batch, no dropout)
    assert loss["first"] == pytest.approx(record["attention_distance"]["before"]["weighted"], rel=1e-5)


def test_the_real_config_builds_nad_on_the_models_layers_with_the_shared_budget(tmp_path) -> None:
    from backdoor_lab.pipeline import build_defense, build_model
    from tests.test_pipeline import compose_run

    for experiment in ("signs_badnets", "speech_noise", "face_sunglasses"):
        cfg = compose_run("train", tmp_path, "r", [f"experiment={experiment}", "defenses=[nad]"])
        nad, fine_tuning = build_defense(cfg, "nad"), build_defense(cfg, "fine_tuning")
        model = build_model(cfg, 10)
        assert isinstance(nad, NAD) and nad.name == "nad"
        assert list(nad.settings.layers) == list(cfg.model.attention_layers) == model.attention_layers
        assert nad.settings.betas == (500.0, 1000.0, 1000.0) and nad.settings.p == 2.0
        assert nad.settings.teacher_epochs == 10
        assert repr(nad.budget) == repr(fine_tuning.budget)
        nad.check(model)
    cfg = compose_run("train", tmp_path, "r", ["defenses=[nad]", "nad.betas=[1.0,2.0]"])
    with pytest.raises(Exception, match=r"nad.betas must have one weight per layer in nad.layers: 3 layers, 2 betas"):
        build_defense(cfg, "nad")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"layers": ["a", "b", "c"], "betas": [1.0, 2.0]}, "nad.betas must have one weight per layer in nad.layers"),
        ({"layers": ["a"], "betas": [-1.0]}, "nad.betas must be finite numbers >= 0"),
        ({"layers": ["a"], "betas": [float("nan")]}, "nad.betas must be finite numbers >= 0"),
        ({"layers": ["a", "a"], "betas": [1.0, 1.0]}, "nad.layers names a module twice"),
        ({"p": 0.0}, "nad.p must be a finite number > 0"),
        ({"teacher_epochs": 0}, "nad.teacher_epochs must be an integer >= 1"),
        ({"teacher_epochs": 2.5}, "nad.teacher_epochs must be an integer >= 1"),
        ({"teacher_epochs": True}, "nad.teacher_epochs must be an integer >= 1"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as error:
        NADSettings(**settings)
    assert "\n" not in str(error.value)


def test_bad_callback_arguments_are_refused_at_construction() -> None:
    with pytest.raises(MisconfigurationException, match="betas must have one weight per layer in layers: 1 layers"):
        NADCallback(layers=["net.relu"], betas=[1.0, 2.0])
    with pytest.raises(MisconfigurationException, match="layers is empty"):
        NADCallback(layers=[], betas=[])
    with pytest.raises(MisconfigurationException, match="teacher_epochs must be an integer >= 1"):
        NADCallback(layers=["net.relu"], betas=[1.0], teacher_epochs=0)
    NADCallback(layers=["net.relu"], betas=[1.0], teacher=ConvNet(), teacher_epochs=0)  # a given teacher needs none


def test_check_refuses_a_model_without_the_layers_in_one_line() -> None:
    budget = FineTuneBudget(epochs=1, optimizer=partial(torch.optim.SGD, lr=0.1))
    plain = BackdoorClassifier(net=AttentionPlantedNet(), num_classes=3, optimizer=budget.optimizer)
    with pytest.raises(ValueError, match=r"model.attention_layers.*nad.layers") as error:
        NAD(NADSettings(), budget).check(plain)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=r"\['net.nope'\] is not in BackdoorClassifier.*\['net.conv', 'net.relu'\]"):
        NAD(NADSettings(layers=["net.nope"], betas=[1.0]), budget).check(plain)
    with pytest.raises(ValueError, match="nad.betas must have one weight per layer in nad.layers: 1 layers"):
        NAD(NADSettings(), budget).check(attention_planted_model())  # 3 default betas for the model's one layer


# --------------------------------------------------------------------------------------------------------------
# Lightning: precision, checkpoints, refusals, the wrap's life cycle
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["32", "bf16-mixed", "bf16-true"])
def test_distils_from_a_fine_tuned_teacher_under_every_precision(tmp_path, precision: str) -> None:
    student = DistilOnly(seed=0, lr=0.05)  # zero own loss: the distance falls only if the term is backpropagated
    callback = NADCallback(
        layers=["net.relu"],
        betas=[50.0],
        teacher_epochs=5,
        teacher_optimizer=partial(torch.optim.SGD, lr=0.5),
        clean_dataloader=DataLoader(images(), batch_size=16),
    )
    distil(student, callback, tmp_path, epochs=10, precision=precision)
    before, after = callback.distance["before"]["net.relu"], callback.distance["after"]["net.relu"]
    assert before > 1e-4 and after < 0.3 * before
    assert math.isfinite(callback.attention_loss_record()["first"])
    expected_dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert callback.teacher_module.net.conv.weight.dtype == expected_dtype
    if precision == "32":
        assert distance(student, callback.teacher_module) == pytest.approx(after, rel=1e-4)


class Checkpointed(DistilOnly):
    """Cross-entropy on batches in a fixed order (so one fit and a resumed one see the same), with a test step."""

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def train_dataloader(self):
        return DataLoader(images(), batch_size=4)

    def test_step(self, batch, batch_idx):
        self.log("test/acc", (self(batch[0]).argmax(1) == batch[1]).float().mean())

    def test_dataloader(self):
        return DataLoader(images(), batch_size=16)


def nad_for_checkpoints(teacher_optimizer=None) -> NADCallback:
    return NADCallback(
        layers=["net.relu"],
        betas=[20.0],
        teacher_epochs=3,
        teacher_optimizer=teacher_optimizer or partial(torch.optim.SGD, lr=0.5),
        clean_dataloader=DataLoader(images(seed=1), batch_size=8),
    )


def never_called(params):
    raise AssertionError("a resumed fit fine-tuned a new teacher instead of loading the saved one")


def test_a_resumed_fit_distils_from_the_saved_teacher_and_checkpoints_load_anywhere(tmp_path) -> None:
    whole = Checkpointed(seed=0, lr=0.1)
    distil(whole, nad_for_checkpoints(), tmp_path / "whole", epochs=2)

    first = Checkpointed(seed=0, lr=0.1)
    callback = nad_for_checkpoints()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    trainer = quiet_trainer(tmp_path, [callback, ckpt], 1, num_sanity_val_steps=0, enable_checkpointing=True)
    trainer.fit(first)
    saved = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)  # plain tensors and containers only
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("NADCallback")]
    assert state["settings"] == {"layers": ["net.relu"], "betas": [20.0], "p": 2.0}
    teacher = callback.teacher_module.state_dict()
    assert state["teacher_state"].keys() == teacher.keys()
    assert all(torch.equal(state["teacher_state"][k], teacher[k]) for k in teacher)
    assert not any("teacher" in k for k in saved["state_dict"])  # the model's weights are the student's only

    (result,) = trainer.test(first, ckpt_path="last", verbose=False)  # the callback does not get in the way
    assert 0.0 <= result["test/acc"] <= 1.0
    fresh = Checkpointed()
    fresh.load_state_dict(saved["state_dict"], strict=True)

    resumed = Checkpointed(seed=5, lr=0.1)
    again = nad_for_checkpoints(teacher_optimizer=never_called)
    distil(resumed, again, tmp_path / "resumed", epochs=2, ckpt_path=tmp_path / "ck" / "last.ckpt")
    assert all(torch.equal(again.teacher_module.state_dict()[k].cpu(), teacher[k].cpu()) for k in teacher)
    assert again.teacher_record == callback.teacher_record and len(again.attention_loss_record()["epoch_mean"]) == 2
    for (name, got), want in zip(resumed.named_parameters(), whole.parameters(), strict=True):
        torch.testing.assert_close(got, want, msg=name)  # 1 epoch + resumed 1 epoch == 2 epochs in one fit

    other = NADCallback(layers=["net.relu"], betas=[21.0], teacher_epochs=3, teacher_optimizer=never_called)
    with pytest.raises(MisconfigurationException, match="resume with the same layers, betas and p"):
        distil(Checkpointed(), other, tmp_path / "other", epochs=2, ckpt_path=tmp_path / "ck" / "last.ckpt")


def test_unknown_layers_are_refused_at_setup_listing_the_feature_map_modules(tmp_path) -> None:
    callback = NADCallback(layers=["net.relu9"], betas=[1.0], teacher_epochs=1)
    with pytest.raises(
        MisconfigurationException, match=r"\['net.relu9'\] is not in DistilOnly.*\['net.conv', 'net.relu'\]"
    ):
        distil(DistilOnly(), callback, tmp_path, epochs=1)
    # validate and test never distil: the same callback does not get in their way
    module = Checkpointed()
    trainer = quiet_trainer(tmp_path, [callback])
    assert "test/acc" in trainer.test(module, verbose=False)[0]


class SharedReLU(DistilOnly):
    """One ReLU module used by two stages: its output is ambiguous, so NAD must refuse it."""

    def __init__(self) -> None:
        super().__init__()
        self.net.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.net.relu(self.net.conv2(self.net.relu(self.net.conv(x))))
        return self.net.head(h.mean(dim=(2, 3)))


def test_a_layer_that_runs_twice_is_refused_and_the_wrap_is_removed_on_failure(tmp_path) -> None:
    module = SharedReLU()
    # measure=False: the refusal then comes from the first training step, inside the wrapped training_step
    callback = NADCallback(layers=["net.relu"], betas=[1.0], teacher=SharedReLU(), measure=False)
    with pytest.raises(RuntimeError, match="'net.relu' ran 2 times in one forward"):
        distil(module, callback, tmp_path, epochs=1)
    assert "training_step" not in vars(module)
