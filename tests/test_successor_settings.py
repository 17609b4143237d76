"""The successors' settings (``defenses/successor_settings.py``): every bound accepted at its edge and refused past
it, with the one-line error that names the key, the rule and the value."""

from __future__ import annotations

import math

import pytest
from omegaconf import OmegaConf

from backdoor_lab.defenses.successor_settings import ANPSettings, CLPSettings, NADSettings, check_nad_settings

ANP_EDGES = [
    {"eps": 1.0},
    {"eps": 1e-9},
    {"alpha": 0.0},
    {"alpha": 1.0},
    {"iterations": 1},
    {"mask_lr": 1e-9},
    {"noise_steps": 1},
    {"batch_size": 1},
    {"batch_size": None},
    {"threshold": 0.0},
    {"threshold": 1.0},
    {"prune_fraction": 0.0},
    {"prune_fraction": None},
]


@pytest.mark.parametrize("edge", ANP_EDGES, ids=[f"{k}={v}" for e in ANP_EDGES for k, v in e.items()])
def test_anp_accepts_each_bound_at_its_edge(edge: dict) -> None:
    settings = ANPSettings(**edge)
    assert all(getattr(settings, key) == value for key, value in edge.items())


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"eps": 0.0}, "anp.eps must be a number in (0, 1], got 0.0"),
        ({"eps": 1.5}, "anp.eps must be a number in (0, 1], got 1.5"),
        ({"alpha": -0.1}, "anp.alpha must be a number in [0, 1], got -0.1"),
        ({"alpha": math.nan}, "anp.alpha must be a number in [0, 1], got nan"),
        ({"iterations": 0}, "anp.iterations must be an integer >= 1, got 0"),
        ({"iterations": True}, "anp.iterations must be an integer >= 1, got True"),
        ({"mask_lr": 0.0}, "anp.mask_lr must be a number > 0, got 0.0"),
        ({"noise_steps": 0}, "anp.noise_steps must be an integer >= 1, got 0"),
        ({"batch_size": 0}, "anp.batch_size must be an integer >= 1 or null, got 0"),
        ({"threshold": 1.5}, "anp.threshold must be a number in [0, 1], got 1.5"),
        ({"prune_fraction": 1.0}, "anp.prune_fraction must be a number in [0, 1) or null, got 1.0"),
    ],
)
def test_anp_refuses_past_each_bound_with_the_rule(bad: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        ANPSettings(**bad)
    assert str(err.value) == message


def test_nad_settings_keep_plain_tuples_and_floats() -> None:
    settings = NADSettings(layers=OmegaConf.create(["a", "b"]), betas=OmegaConf.create([1, 2]), p=2, teacher_epochs=1)
    assert settings.layers == ("a", "b") and settings.betas == (1.0, 2.0) and isinstance(settings.p, float)
    assert all(isinstance(b, float) for b in settings.betas)
    assert NADSettings(p=1).p == 1.0 and NADSettings(p=0.5).p == 0.5  # any p > 0
    assert NADSettings().layers == () and NADSettings().betas == (500.0, 1000.0, 1000.0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"layers": [""]}, "layers must be module names (strings), got ['']"),
        ({"layers": [3]}, "layers must be module names (strings), got [3]"),
        ({"layers": ["a", "a"], "betas": [1, 1]}, "layers names a module twice: ['a', 'a']"),
        ({"betas": [math.inf]}, "betas must be finite numbers >= 0, got [inf]"),
        ({"betas": [True]}, "betas must be finite numbers >= 0, got [True]"),
        ({"betas": [-1.0]}, "betas must be finite numbers >= 0, got [-1.0]"),
        ({"betas": [1.0, 2.0]}, "betas must have one weight per layer in layers: 1 layers, 2 betas"),
        ({"p": 0}, "p must be a finite number > 0, got 0"),
        ({"p": math.inf}, "p must be a finite number > 0, got inf"),
        ({"p": True}, "p must be a finite number > 0, got True"),
        ({"p": "2"}, "p must be a finite number > 0, got '2'"),
        (
            {"teacher_epochs": 0},
            "teacher_epochs must be an integer >= 1, got 0: a teacher that is not fine-tuned is the backdoored "
            "model itself",
        ),
    ],
)
def test_nad_checks_name_the_key_and_the_value(args: dict, message: str) -> None:
    kwargs = {"layers": ["a"], "betas": [1.0], "p": 2.0, "teacher_epochs": 1, **args}
    with pytest.raises(ValueError) as err:
        check_nad_settings(kwargs["layers"], kwargs["betas"], kwargs["p"], kwargs["teacher_epochs"])
    assert str(err.value) == message
    with pytest.raises(KeyError):  # the error type is the caller's; the config prefixes the key
        check_nad_settings(kwargs["layers"], kwargs["betas"], kwargs["p"], kwargs["teacher_epochs"], "nad.", KeyError)
    with pytest.raises(ValueError, match="^layers is empty: name the modules whose attention maps NAD distils$"):
        check_nad_settings([], [], 2.0, 1)
    check_nad_settings([], [], 2.0, None, allow_no_layers=True)  # the model's own attention layers


def test_clp_settings_edges_and_refusals() -> None:
    assert CLPSettings(u=0).u == 0.0 and CLPSettings(layers=OmegaConf.create(["c"])).layers == ("c",)
    for bad, message in [
        ({"u": -0.1}, "clp.u must be a finite number >= 0, got -0.1"),
        ({"u": math.inf}, "clp.u must be a finite number >= 0, got inf"),
        ({"layers": "conv"}, "clp.layers must be null or a list of conv layer names, got 'conv'"),
        ({"layers": []}, "clp.layers must be null or a non-empty list of conv layer names, got ()"),
        ({"layers": ["a", "a"]}, "clp.layers names a layer twice: ['a', 'a']"),
    ]:
        with pytest.raises(ValueError) as err:
            CLPSettings(**bad)
        assert str(err.value) == message
