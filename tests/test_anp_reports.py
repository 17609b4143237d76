"""What ANP reports (``defenses/anp.py``): the mask search's progress log, window by window, and the callback's
logged result and metrics, against values computed independently of the search."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from backdoor_lab.defenses.anp import ANPCallback, ANPSettings, optimize_masks
from tests.test_anp import planted_model, planted_sets
from tests.test_callback_lightning import RecordingLogger
from tests.test_pruning import KnownNet, known_data
from tests.trainers import quiet_trainer


def anp_messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "backdoor_lab.defenses.anp"]


def test_the_search_reports_each_window_of_iterations_and_the_last(caplog) -> None:
    """Two alternating batches (all right, all wrong); masks that cannot move (``mask_lr`` tiny) and the natural
    loss alone (``alpha=1``): each window's mean loss and accuracy are known from the unmasked network."""
    caplog.set_level(logging.INFO, logger="backdoor_lab.defenses.anp")
    model = KnownNet()
    data = known_data(16)
    right, wrong = data.tensors[1].clone(), 1 - data.tensors[1]
    x = torch.cat([data.tensors[0], data.tensors[0]])
    loader = DataLoader(TensorDataset(x, torch.cat([right, wrong])), batch_size=16)  # batch A right, batch B wrong
    with torch.no_grad():
        logits = model(data.tensors[0])
    loss_a, loss_b = float(F.cross_entropy(logits, right)), float(F.cross_entropy(logits, wrong))
    settings = ANPSettings(iterations=9, alpha=1.0, mask_lr=1e-12, batch_size=None)
    optimize_masks(model, loader, settings, generator=torch.Generator().manual_seed(0))
    pair = f"{(loss_a + loss_b) / 2:.4f}"
    assert anp_messages(caplog) == [
        f"ANP: iteration 2/9, mask loss {pair}, clean batch accuracy (masks only) 0.5000",
        f"ANP: iteration 4/9, mask loss {pair}, clean batch accuracy (masks only) 0.5000",
        f"ANP: iteration 6/9, mask loss {pair}, clean batch accuracy (masks only) 0.5000",
        f"ANP: iteration 8/9, mask loss {pair}, clean batch accuracy (masks only) 0.5000",
        f"ANP: iteration 9/9, mask loss {loss_a:.4f}, clean batch accuracy (masks only) 1.0000",  # a window of one
    ]


def test_the_callback_logs_its_result_and_metrics(tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="backdoor_lab.defenses.anp")
    clean, triggered = planted_sets()
    settings = ANPSettings(iterations=40, batch_size=8, threshold=0.2)
    cb = ANPCallback(settings, DataLoader(clean, batch_size=8), triggered_dataloader=DataLoader(triggered, 8))
    assert cb.mask_values == {} and cb.val == {} and cb.progress is True
    logger = RecordingLogger()
    torch.manual_seed(0)
    quiet_trainer(tmp_path, [cb], 0, logger=logger).fit(planted_model(), train_dataloaders=DataLoader(clean, 8))
    record = cb.record()
    val = cb.val
    assert set(val) == {"clean_acc_before", "asr_before", "clean_acc_after", "asr_after"}
    result = [m for m in anp_messages(caplog) if m.startswith("ANP: pruned")]
    total = sum(cb.num_channels.values())
    assert result == [
        f"ANP: pruned {record['pruned_count']} of {total} conv channels ({100 * record['pruned_fraction']:.1f}%); "
        f"val clean accuracy {val['clean_acc_before']} -> {val['clean_acc_after']}, "
        f"val ASR {val['asr_before']} -> {val['asr_after']}"
    ]
    expected = {"anp/pruned_fraction": record["pruned_fraction"], **{f"anp/val_{k}": v for k, v in val.items()}}
    assert [(m, step) for m, step in logger.metrics if "anp/pruned_fraction" in m] == [(expected, 0)]
    # A resumed fit re-installs the masks and says so, without searching again.
    again = ANPCallback(settings, DataLoader(clean, batch_size=8))
    again.load_state_dict(cb.state_dict())
    caplog.clear()
    quiet_trainer(tmp_path, [again], 0).fit(planted_model(), train_dataloaders=DataLoader(clean, 8))
    assert anp_messages(caplog) == [f"ANP: resumed with {record['pruned_count']} units pruned"]
    assert again.mask_values == cb.mask_values and again.val == cb.val
