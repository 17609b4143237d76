"""Recorded spoken digits on disk: Google Speech Commands and the Free Spoken Digit Dataset (FSDD)."""

from __future__ import annotations

import hashlib
import os
import re
from abc import abstractmethod
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
from rich.progress import track

from backdoor_lab.data.base import file_listing_digest
from backdoor_lab.data.speech.audio import fit_length, load_audio
from backdoor_lab.data.speech.digits import DIGIT_WORDS, SpokenDigitSource
from backdoor_lab.splits import RawSplit


class _RecordedDigits(SpokenDigitSource):
    """Shared reading of a folder of labelled WAV recordings into three splits."""

    name: str
    layout: str
    root: Path

    @abstractmethod
    def _index(self) -> list[tuple[Path, int, str, str]]:
        """(path, label, speaker, split) of every recording used."""

    @abstractmethod
    def _settings(self) -> dict:
        """Constructor settings that change which files land in which split."""

    @cached_property
    def _entries(self) -> list[tuple[Path, int, str, str]]:
        return self._index()

    def cache_key(self) -> dict:
        return {
            "root": str(self.root.resolve()),
            "files": file_listing_digest((path for path, *_ in self._entries), self.root),
            "sample_rate": self.sample_rate,
            "duration_s": self.duration_s,
            **self._settings(),
        }

    def build(self) -> dict[str, RawSplit]:
        entries = self._entries
        speakers = sorted({speaker for _, _, speaker, _ in entries})
        speaker_id = {speaker: i for i, speaker in enumerate(speakers)}
        waveforms = np.empty((len(entries), self.num_samples), dtype=np.float32)
        steps = track(entries, description=f"Reading {self.name}", disable=not self.progress or len(entries) < 500)
        for i, (path, *_) in enumerate(steps):
            waveforms[i] = fit_length(load_audio(path, self.sample_rate), self.num_samples)
        labels = np.array([label for _, label, _, _ in entries], dtype=np.int64)
        groups = np.array([speaker_id[speaker] for _, _, speaker, _ in entries], dtype=np.int64)
        split_of = np.array([split for *_, split in entries])
        out = {}
        for split in ("train", "val", "test"):
            idx = np.flatnonzero(split_of == split)
            if len(idx) == 0:
                raise ValueError(f"{self.name}: the {split} split of {self.root} is empty; check the split settings")
            out[split] = RawSplit(
                inputs=waveforms[idx], labels=labels[idx], sample_ids=idx.astype(np.int64), groups=groups[idx]
            )
        return out

    def _missing(self, what: str) -> FileNotFoundError:
        return FileNotFoundError(f"{self.name}: {what}. Expected layout: {self.layout}")


class SpeechCommandsDigits(_RecordedDigits):
    """The ten digit words of Google Speech Commands (v0.01 or v0.02), split by speaker.

    Layout: ``<root>/<word>/<speaker>_nohash_<n>.wav`` for word in zero..nine. With ``split_rule="auto"``
    the dataset's own ``validation_list.txt`` and ``testing_list.txt`` are used when both exist, else the
    dataset's hashing rule (SHA-1 of the speaker id, as in the reference ``which_set``) assigns each speaker
    to one split with ``validation_percentage`` / ``testing_percentage``. Either way no speaker appears in
    two splits; ``val`` is the defender's clean data. ``limit_per_class`` keeps a seeded subset of each
    class in each split for small runs.
    """

    name = "speech_commands_digits"
    layout = "<root>/<word>/<speaker>_nohash_<n>.wav with word in zero..nine (Speech Commands)"
    _FILE = re.compile(r"^(?P<speaker>[^_]+)_nohash_(?P<n>\d+)\.wav$")
    _MAX_WAVS_PER_CLASS = 2**27 - 1

    def __init__(
        self,
        root: str | os.PathLike,
        split_rule: str = "auto",
        validation_percentage: float = 10.0,
        testing_percentage: float = 10.0,
        limit_per_class: int | None = None,
        sample_rate: int = 16000,
        duration_s: float = 1.0,
        seed: int = 0,
        cache_dir: str | os.PathLike | None = None,
        n_mels: int = 40,
        n_fft: int = 512,
        hop_length: int = 256,
        progress: bool = True,
    ) -> None:
        if split_rule not in ("auto", "lists", "hash"):
            raise ValueError(f"split_rule must be 'auto', 'lists' or 'hash', got {split_rule!r}")
        super().__init__(sample_rate, duration_s, seed, cache_dir, n_mels, n_fft, hop_length, progress)
        self.root = Path(root).expanduser()
        self.split_rule = split_rule
        self.validation_percentage = float(validation_percentage)
        self.testing_percentage = float(testing_percentage)
        self.limit_per_class = limit_per_class

    def _settings(self) -> dict:
        return {
            "split_rule": self._resolved_rule(),
            "validation_percentage": self.validation_percentage,
            "testing_percentage": self.testing_percentage,
            "limit_per_class": self.limit_per_class,
            "seed": self.seed,
        }

    def _resolved_rule(self) -> str:
        lists_present = all((self.root / name).is_file() for name in ("validation_list.txt", "testing_list.txt"))
        if self.split_rule == "lists" and not lists_present:
            raise self._missing(f"split_rule='lists' needs validation_list.txt and testing_list.txt in {self.root}")
        if self.split_rule == "auto":
            return "lists" if lists_present else "hash"
        return self.split_rule

    def hash_split(self, speaker: str) -> str:
        """The Speech Commands reference rule: a stable split per speaker from the SHA-1 of its id."""
        digest = int(hashlib.sha1(speaker.encode()).hexdigest(), 16)
        percentage = (digest % (self._MAX_WAVS_PER_CLASS + 1)) * (100.0 / self._MAX_WAVS_PER_CLASS)
        if percentage < self.validation_percentage:
            return "val"
        if percentage < self.validation_percentage + self.testing_percentage:
            return "test"
        return "train"

    def _index(self) -> list[tuple[Path, int, str, str]]:
        if not self.root.is_dir():
            raise self._missing(f"dataset folder {self.root} does not exist")
        missing = [word for word in DIGIT_WORDS if not (self.root / word).is_dir()]
        if missing:
            raise self._missing(f"no folder for {', '.join(missing)} in {self.root}")
        rule = self._resolved_rule()
        listed: dict[str, str] = {}
        if rule == "lists":
            for split, name in (("val", "validation_list.txt"), ("test", "testing_list.txt")):
                for line in (self.root / name).read_text().splitlines():
                    if line.strip():
                        listed[line.strip()] = split
        entries = []
        for label, word in enumerate(DIGIT_WORDS):
            for path in sorted((self.root / word).glob("*.wav")):
                match = self._FILE.match(path.name)
                if match is None:
                    raise ValueError(f"{self.name}: unexpected file name {path}; expected layout: {self.layout}")
                speaker = match["speaker"]
                split = listed.get(f"{word}/{path.name}", "train") if rule == "lists" else self.hash_split(speaker)
                entries.append((path, label, speaker, split))
        if not entries:
            raise self._missing(f"no .wav files under the digit folders of {self.root}")
        return self._limit(entries)

    def _limit(self, entries: list[tuple[Path, int, str, str]]) -> list[tuple[Path, int, str, str]]:
        if self.limit_per_class is None:
            return entries
        rng = np.random.default_rng(self.seed)
        keep = []
        for split in ("train", "val", "test"):
            for label in range(len(DIGIT_WORDS)):
                idx = [i for i, e in enumerate(entries) if e[1] == label and e[3] == split]
                if len(idx) > self.limit_per_class:
                    idx = sorted(rng.choice(idx, size=self.limit_per_class, replace=False).tolist())
                keep.extend(idx)
        return [entries[i] for i in sorted(keep)]


class FreeSpokenDigits(_RecordedDigits):
    """The Free Spoken Digit Dataset (FSDD): 8 kHz recordings, resampled to ``sample_rate``.

    Layout: ``<root>/recordings/<digit>_<speaker>_<n>.wav``.

    ``split_by="index"`` (default) follows the dataset's documented rule, recordings 0-4 of every speaker and
    digit are the test split, and extends it: 5-9 are the val split, the rest train. All splits then share
    the speakers (FSDD has only six). ``split_by="speaker"`` holds out whole speakers instead:
    ``test_speakers`` and ``val_speakers`` when given, else one seeded speaker each.
    """

    name = "free_spoken_digits"
    layout = "<root>/recordings/<digit>_<speaker>_<n>.wav (Free Spoken Digit Dataset)"
    _FILE = re.compile(r"^(?P<digit>\d)_(?P<speaker>.+)_(?P<n>\d+)\.wav$")

    def __init__(
        self,
        root: str | os.PathLike,
        split_by: str = "index",
        test_speakers: Sequence[str] | None = None,
        val_speakers: Sequence[str] | None = None,
        sample_rate: int = 16000,
        duration_s: float = 1.0,
        seed: int = 0,
        cache_dir: str | os.PathLike | None = None,
        n_mels: int = 40,
        n_fft: int = 512,
        hop_length: int = 256,
        progress: bool = True,
    ) -> None:
        if split_by not in ("index", "speaker"):
            raise ValueError(f"split_by must be 'index' or 'speaker', got {split_by!r}")
        super().__init__(sample_rate, duration_s, seed, cache_dir, n_mels, n_fft, hop_length, progress)
        self.root = Path(root).expanduser()
        self.split_by = split_by
        self.test_speakers = None if test_speakers is None else [str(s) for s in test_speakers]
        self.val_speakers = None if val_speakers is None else [str(s) for s in val_speakers]

    def _settings(self) -> dict:
        return {
            "split_by": self.split_by,
            "test_speakers": self.test_speakers,
            "val_speakers": self.val_speakers,
            "seed": self.seed,
        }

    def _index(self) -> list[tuple[Path, int, str, str]]:
        folder = self.root / "recordings"
        if not folder.is_dir():
            raise self._missing(f"folder {folder} does not exist")
        files = []
        for path in sorted(folder.glob("*.wav")):
            match = self._FILE.match(path.name)
            if match is None:
                raise ValueError(f"{self.name}: unexpected file name {path}; expected layout: {self.layout}")
            files.append((path, int(match["digit"]), match["speaker"], int(match["n"])))
        if not files:
            raise self._missing(f"no .wav files in {folder}")
        if self.split_by == "index":
            return [(p, d, s, "test" if n < 5 else "val" if n < 10 else "train") for p, d, s, n in files]
        test, val = self._held_out_speakers(sorted({s for _, _, s, _ in files}))
        return [(p, d, s, "test" if s in test else "val" if s in val else "train") for p, d, s, _ in files]

    def _held_out_speakers(self, speakers: list[str]) -> tuple[set[str], set[str]]:
        named = (self.test_speakers or []) + (self.val_speakers or [])
        unknown = sorted(set(named) - set(speakers))
        if unknown:
            raise ValueError(f"{self.name}: unknown speakers {unknown}; found {speakers}")
        rng = np.random.default_rng(self.seed)
        free = [s for s in rng.permutation(speakers).tolist() if s not in named]
        needed = (self.test_speakers is None) + (self.val_speakers is None) + 1
        if len(free) < needed:
            raise ValueError(f"{self.name}: {len(speakers)} speakers {speakers} are too few to hold out whole speakers")
        test = set(self.test_speakers) if self.test_speakers is not None else {free.pop(0)}
        val = set(self.val_speakers) if self.val_speakers is not None else {free.pop(0)}
        if test & val:
            raise ValueError(f"{self.name}: speakers {sorted(test & val)} are in both test_speakers and val_speakers")
        return test, val  # `needed` kept at least one speaker free for training
