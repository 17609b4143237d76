"""``FinePruner``: Fine-Pruning (Liu, Dolan-Gavitt, Garg, RAID 2018) on any PyTorch classifier, no trainer needed.

rank -> curve -> choose -> mask -> export. One pass over the clean (and triggered) data ranks the channels of
one conv layer by mean activation and caches the tensors that the layers after it read; the prune curve then
re-runs only those later layers for each mask, at every channel count. The cut is found with ``torch.fx`` and
moved down past channel-wise layers (ReLU, pooling) so that masking the cached tensor equals masking the conv;
skip connections that cross the cut are cached too. Samples whose cached map is zero in the newly pruned
channels keep their previous answer (same input, same answer). Before the curve, the cut is checked against the
whole network with half the channels masked; where tracing fails or the answers differ, the curve falls back to
full re-evaluation with one warning.

Where the layers reading the cut are linear in it (a conv, or a linear layer over the flattened map, as in every
built-in network), their outputs are kept as float64 running sums: pruning a channel subtracts that channel's
term, and only the layers after them run per mask; near ties are decided exactly (``curve_cache``).

This module holds the protocol; how the curve is evaluated through the cut (the cached pass, its check, the
fallback) lives in ``cut_evaluation``. Lightning users get the same through ``FinePruningCallback``; the hooks
``transfer``, ``forward_context``, ``reduce`` and ``broadcast`` are where a trainer plugs in its device transfer,
precision and processes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DistributedSampler

from backdoor_lab.defenses.curve_cache import CachedBatch, CurveCache
from backdoor_lab.defenses.cut_evaluation import CutEvaluation, LoaderPass
from backdoor_lab.defenses.network_split import CannotCutError, NetworkSplit, split_network
from backdoor_lab.defenses.pruning import (
    ChannelActivation,
    count_correct,
    fold_prune_masks,
    hit_mask,
    kept_channels,
    masked_modules,
    model_device,
    move_to_device,
    prune_schedule,
    resolve_layer,
    set_channel_mask,
    split_batch,
)
from backdoor_lab.defenses.ranking import (
    check_prune_settings,
    progress_bar,
    pruning_order,
    ratio_count,
    trigger_channel_ranks,
)

BatchToXY = Callable[[Any], tuple[Tensor, Tensor | None, Tensor | None]]


class FinePruner(CutEvaluation):
    """Fine-Pruning of one conv layer of ``model`` (any ``nn.Module`` whose forward returns logits).

    Example (plain PyTorch; ``clean_loader`` yields ``(inputs, labels)``)::

        from backdoor_lab.defenses.pruner import FinePruner
        pruner = FinePruner(model, layer="conv5", max_accuracy_drop=0.04)
        pruner.rank(clean_loader, triggered_loader)  # mean clean activation per channel: one pass
        pruner.measure_curve()  # clean accuracy (and ASR) at every pruned-channel count
        pruner.apply(pruner.choose())  # mask the most channels that kept clean accuracy
        torch.save(pruner.export(), "defended.pt")  # plain weights, pruned channels zero

    Args:
        model: the network; its forward maps inputs to logits (N, classes).
        layer: the ``nn.Conv2d`` to prune (``named_modules`` name); None = the last Conv2d.
        activation_layer: module whose output ranks the channels (None: ``layer``).
        rectify: rank on ReLU of that output (the paper ranks post-activation values).
        prune_ratio: prune exactly this fraction (in [0, 1)); None = stop rule.
        max_accuracy_drop: stop rule: the most channels whose clean accuracy stays >= baseline - this.
        step: channels masked between two measurements; None = 1 (every count), or about 64 measurements
            when the curve falls back to full re-evaluation.
        full_curve: measure past the stop point (the chosen count is unchanged).
        max_batches: cap on batches per pass.
        batch_to_xy: ``batch -> (inputs, targets, true_labels or None)``; default reads tuples and dicts.
        transfer: ``(batch, dataloader_idx) -> batch`` on the model's device (default: every tensor moved).
        forward_context: context for each forward (a trainer's precision); default none.
        reduce: sums a tensor over processes (default: one process).
        broadcast: the chosen count from process 0 (default: one process).
        world_size, process_index: the processes that share the work (a trainer's world size and global rank):
            each evaluates batches ``i % world_size == process_index`` of every loader (give each process the
            same, unsharded loader) and ``reduce`` sums the activation sums and correct counts, so that every
            process computes the same means, curve and mask.
        fast: cache at the layer and re-run only the later layers (falls back by itself when it cannot).
        progress: a rich progress bar on a terminal.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str | None = None,
        *,
        activation_layer: str | None = None,
        rectify: bool = True,
        prune_ratio: float | None = None,
        max_accuracy_drop: float = 0.04,
        step: int | None = None,
        full_curve: bool = False,
        max_batches: int | None = None,
        batch_to_xy: BatchToXY = split_batch,
        transfer: Callable[[Any, int], Any] | None = None,
        forward_context: Callable[[], AbstractContextManager] = nullcontext,
        reduce: Callable[[Tensor], Tensor] | None = None,
        broadcast: Callable[[int], int] | None = None,
        world_size: int = 1,
        process_index: int = 0,
        fast: bool = True,
        progress: bool = False,
    ) -> None:
        check_prune_settings(prune_ratio, max_accuracy_drop, step, max_batches)
        if not 0 <= process_index < world_size:
            raise ValueError(f"process_index must be in [0, world_size={world_size}), got {process_index}")
        self.model = model
        self.layer_name, self.conv = resolve_layer(model, layer)
        named = dict(model.named_modules())
        if activation_layer is not None and activation_layer not in named:
            raise ValueError(f"activation_layer {activation_layer!r} is not in {type(model).__name__}")
        self.stat_module = named[activation_layer] if activation_layer else self.conv
        self.activation_layer = activation_layer
        self.rectify = rectify
        self.prune_ratio = prune_ratio
        self.max_accuracy_drop = max_accuracy_drop
        self.step = step
        self.full_curve = full_curve
        self.max_batches = max_batches
        self.batch_to_xy = batch_to_xy
        self.transfer = transfer
        self.forward_context = forward_context
        self.reduce = reduce or (lambda t: t)
        self.broadcast = broadcast or (lambda v: v)
        self.world_size = world_size
        self.process_index = process_index
        self.fast = fast
        self.progress = progress
        self.num_channels = self.conv.out_channels
        self.modules = [m for _, m in masked_modules(model, self.layer_name)]
        self.channel_activation: list[float] = []
        self.triggered_activation: list[float] = []
        self.prune_curve: list[dict[str, float | None]] = []
        self.pruned_channels: list[int] = []
        self.split: NetworkSplit | None = None
        self.incremental = False  # the curve keeps running sums of the split's linear readers
        self.exact_tail_runs = 0  # batches the curve re-ran through the cached layers (no sums, or a near tie)
        self._clean: LoaderPass | None = None
        self._cache: CurveCache | None = None
        self._triggered: LoaderPass | None = None

    # ----------------------------------------------------------------- rank
    @torch.no_grad()
    def rank(
        self, clean: Iterable, triggered: Iterable | None = None, clean_idx: int = 0, triggered_idx: int = 0
    ) -> list[float]:
        """One pass over ``clean`` (and ``triggered``): channel means, baseline counts and the cache at the cut.

        Returns ``channel_activation``. Every check of the input happens here, before anything is pruned.
        """
        if self.fast and self.split is None:
            try:
                masked = [name for name, _ in masked_modules(self.model, self.layer_name)]
                observed = [self.activation_layer or self.layer_name]  # the ranking statistic's hook reads it
                self.split = split_network(self.model, self.layer_name, masked, observed)
            except CannotCutError as err:
                self._fall_back(str(err))
        self.incremental = self.split is not None and self.split.readers is not None
        if any(hasattr(m, "weight_mask") for m in self.modules):  # rank the unpruned network
            set_channel_mask(self.modules, torch.ones(self.num_channels, dtype=torch.bool))
        self._clean, clean_mean = self._first_pass(clean, clean_idx, "clean")
        self.channel_activation = [float(v) for v in clean_mean]
        self._triggered = None
        if triggered is not None:  # for the report only: where does the trigger drive the layer?
            self._triggered, trig_mean = self._first_pass(triggered, triggered_idx, "triggered")
            self.triggered_activation = [float(v) for v in trig_mean]
        if self.split is not None:
            self._cache = self._gather([p for p in (self._clean, self._triggered) if p is not None and p.batches])
            self._verify_split()
        # Every process must measure the curve the same way (same schedule, same collectives): if any one
        # of them fell back to full re-evaluation, all do.
        cut_everywhere = self.reduce(torch.tensor(float(self.split is not None), device=self._device()))
        if self.split is not None and float(cut_everywhere) < self.world_size:
            self._drop_cache()
            self._fall_back("another process cannot use the cut")
        return self.channel_activation

    def _device(self) -> torch.device:
        return model_device(self.model)

    def _move(self, batch: Any, dataloader_idx: int) -> Any:
        if self.transfer is not None:
            return self.transfer(batch, dataloader_idx)
        return move_to_device(batch, self._device())

    def _first_pass(self, loader: Iterable, dataloader_idx: int, what: str) -> tuple[LoaderPass, Tensor]:
        data = LoaderPass(loader, dataloader_idx)
        recorder = ChannelActivation(self.stat_module, rectify=self.rectify)
        calls: list[int] = []
        reached = self.conv.register_forward_hook(lambda *_: calls.append(1))
        was_training = self.model.training
        self.model.eval()
        try:
            for i, batch in enumerate(self._shard(loader)):
                x, y, true = self.batch_to_xy(self._move(batch, dataloader_idx))
                outputs = None
                with self.forward_context():
                    if self.split is not None:
                        crossing = self.split.head(x)
                        if i == 0 and self.incremental:
                            self.incremental = self._exact_enough(crossing)
                        logits, outputs = self._tail_and_readers(crossing)
                    else:
                        crossing, logits = None, self.model(x)
                if i == 0:
                    self._check_first_batch(x, y, logits, calls, recorder, what)
                    data.first_inputs = x
                correct, total = count_correct(logits, y, true)
                hits = active = None
                if crossing is not None:
                    cut = crossing[self.split.cut]
                    if cut.dim() < 2 or cut.shape[1] != self.num_channels:
                        self._fall_back(f"the value at the cut ({self.split.cut_name}) has shape {tuple(cut.shape)}")
                        crossing = None
                    else:
                        hits, active = hit_mask(logits, y, true), cut.ne(0).flatten(2).any(dim=2)
                data.batches.append(CachedBatch(crossing, y, true, correct, total, hits, active, outputs))
        finally:
            reached.remove()
            recorder.close()
            self.model.train(was_training)
        if self.split is None:  # the fallback re-reads the loader for every mask; keep no tensors
            for b in data.batches:
                b.crossing = b.hits = b.active = b.outputs = None
        # One reduce for the sums, one for the counts, on every process (a process with no batch of its own
        # adds zeros): the same collectives in the same order everywhere.
        local_sum = recorder.sum if recorder.sum is not None else torch.zeros(self.num_channels, dtype=torch.float64)
        total = self.reduce(local_sum.to(self._device()))
        counts = self.reduce(
            torch.tensor([float(recorder.count), float(len(data.batches))], dtype=torch.float64, device=total.device)
        )
        if not float(counts[1]):
            raise ValueError(f"the {what} dataloader yielded no batches: FinePruner needs {what} data to prune on")
        return data, (total / counts[0]).cpu()

    def _shard(self, loader: Iterable) -> Iterator[Any]:
        """This process's batches: ``i % world_size == process_index`` of the first ``max_batches``.

        A loader whose sampler is a ``DistributedSampler`` is already split across processes; it is read whole.
        """
        sharded = isinstance(getattr(loader, "sampler", None), DistributedSampler)
        world, index = (1, 0) if sharded else (self.world_size, self.process_index)
        for i, batch in enumerate(loader):
            if self.max_batches is not None and i >= self.max_batches:
                return
            if i % world == index:
                yield batch

    def _check_first_batch(
        self, x: Any, y: Tensor | None, logits: Any, calls: list, recorder: ChannelActivation, what: str
    ) -> None:
        name = type(self.model).__name__
        if not calls:
            raise ValueError(f"layer {self.layer_name!r} is not reached by {name}.forward: prune a layer it uses")
        if recorder.sum is None:
            raise ValueError(f"activation_layer {self.activation_layer!r} is not reached by {name}.forward")
        if recorder.sum.numel() != self.num_channels:
            raise ValueError(
                f"the ranking statistic of {self.activation_layer or self.layer_name} has {recorder.sum.numel()} "
                f"channels, the pruned layer {self.num_channels}"
            )
        batch_size = x.shape[0] if isinstance(x, Tensor) else None
        if not (isinstance(logits, Tensor) and logits.dim() == 2 and logits.shape[0] == batch_size):
            got = f"shape {tuple(logits.shape)}" if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(
                f"{name}.forward must return logits of shape (batch={batch_size}, classes); it returned {got}. "
                f"Wrap the model so that forward(inputs) returns the class scores."
            )
        if y is None:
            raise ValueError(f"the {what} batches carry no targets: FinePruner counts argmax == target")

    # ----------------------------------------------------------------- curve
    @torch.no_grad()
    def measure_curve(self) -> list[dict[str, float | None]]:
        """Clean accuracy (and ASR) after masking the 0, step, 2*step, ... least active channels."""
        if self._clean is None:
            raise RuntimeError("call rank(clean_loader) before measure_curve()")
        n, order = self.num_channels, self.pruning_order()
        step = self.step or (1 if self.split is not None else max(1, n // 64))
        limit = None if self.prune_ratio is None else ratio_count(self.prune_ratio, n)
        schedule = prune_schedule(n, step, None if (self.full_curve or limit is None) else limit)
        if limit is not None and limit not in schedule:
            schedule = sorted({*schedule, limit})
        self.prune_curve, baseline, previous = [], None, 0
        bar = progress_bar(self.progress)
        was_training = self.model.training
        self.model.eval()
        try:
            with bar:
                task = bar.add_task(f"Pruning {self.layer_name}", total=len(schedule))
                for k in schedule:
                    newly = order[previous:k]
                    if self.split is None and k > 0:
                        set_channel_mask(self.modules, kept_channels(n, order[:k]))
                    elif self.split is not None and newly and self._cache is not None:
                        with self.forward_context():
                            self.exact_tail_runs += self._cache.advance(
                                newly,
                                self.split.rest,
                                lambda b, k=k: hit_mask(
                                    self._tail(b, kept_channels(n, order[:k])), b.targets, b.true_labels
                                ),
                            )
                    acc, asr = self._rates(bool(newly))
                    baseline = acc if baseline is None else baseline
                    self.prune_curve.append({"pruned": k, "fraction": k / n, "clean_acc": acc, "asr": asr})
                    bar.update(task, advance=1)
                    previous = k
                    if limit is None and not self.full_curve and acc < baseline - self.max_accuracy_drop:
                        break
        finally:
            self.model.train(was_training)
            if self.split is None and any(hasattr(m, "weight_mask") for m in self.modules):
                set_channel_mask(self.modules, torch.ones(n, dtype=torch.bool))
        return self.prune_curve

    def _rates(self, moved: bool) -> tuple[float, float | None]:
        """Clean accuracy and ASR under the current mask, summed over processes in one reduce."""
        passes = [data for data in (self._clean, self._triggered) if data is not None]
        if moved and self.split is None:  # full re-evaluation; the cached path was advanced for both passes
            for data in passes:
                for b, batch in zip(data.batches, self._shard(data.loader), strict=False):
                    x, y, true = self.batch_to_xy(self._move(batch, data.dataloader_idx))
                    with self.forward_context():
                        b.correct, b.total = count_correct(self.model(x), y, true)
        counts = [v for data in passes for v in (data.correct, data.total)]
        counts = self.reduce(torch.tensor(counts, dtype=torch.float64, device=self._device())).tolist()
        rates = [c / t if t else float("nan") for c, t in zip(counts[::2], counts[1::2], strict=True)]
        return rates[0], rates[1] if len(rates) > 1 else None

    # ----------------------------------------------------------------- choose, mask, export
    def choose(self) -> int:
        """How many channels to prune: ``prune_ratio`` of them, or the last count that passed the stop rule."""
        if self.prune_ratio is not None:
            count = ratio_count(self.prune_ratio, self.num_channels)
        else:
            if not self.prune_curve:
                raise RuntimeError("the stop rule needs the curve: call measure_curve() first")
            baseline, count = self.prune_curve[0]["clean_acc"], 0
            for point in self.prune_curve:
                if point["clean_acc"] < baseline - self.max_accuracy_drop:
                    break
                count = int(point["pruned"])
        return int(self.broadcast(count))  # every process ends on the same mask

    def apply(self, count: int | None = None) -> list[int]:
        """Mask the ``count`` least active channels (default: ``choose()``); frees the cached pass."""
        count = self.choose() if count is None else count
        self.pruned_channels = [int(c) for c in self.pruning_order()[:count]]
        set_channel_mask(self.modules, self.keep_mask())
        self._clean = self._triggered = self._cache = None
        return self.pruned_channels

    def run(self, clean: Iterable, triggered: Iterable | None = None, **rank_kwargs: int) -> list[int]:
        """rank -> measure_curve -> apply(choose()): the whole defense before fine-tuning."""
        self.rank(clean, triggered, **rank_kwargs)
        self.measure_curve()
        return self.apply()

    def keep_mask(self) -> Tensor:
        return kept_channels(self.num_channels, self.pruned_channels)

    def export(self) -> dict[str, Tensor]:
        """The model's state dict with plain weights (pruned channels zero): loads into an unpruned copy."""
        return fold_prune_masks(self.model.state_dict())

    # ----------------------------------------------------------------- reading the ranking
    def pruning_order(self) -> list[int]:
        """Channels by increasing mean clean activation; ties (e.g. dead channels) broken by index."""
        return pruning_order(self.channel_activation)

    def trigger_channel_ranks(self, top: int = 10) -> list[int]:
        return trigger_channel_ranks(self.channel_activation, self.triggered_activation, top)
