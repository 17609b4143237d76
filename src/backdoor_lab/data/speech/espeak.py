"""A ctypes binding of libespeak-ng (from the ``espeakng-loader`` wheel) that speaks one utterance at a time."""

from __future__ import annotations

import _ctypes
import ctypes
import os
import shutil
import tempfile
import weakref
from pathlib import Path

import numpy as np

# espeak-ng API constants (speak_lib.h).
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAM_RATE, _PARAM_PITCH, _PARAM_RANGE = 1, 3, 4
_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class EspeakSynthesizer:
    """Text to speech with libespeak-ng through ctypes, one freshly loaded library per utterance.

    libespeak-ng keeps synthesis state in C statics (pitch-flutter phase, wave generator) that neither
    ``espeak_Terminate`` nor a new ``espeak_Initialize`` resets, so the same call gives different samples
    depending on what was spoken before. Loading the library, speaking one utterance and unloading it
    (``dlclose``) makes every utterance a function of its own arguments only. The library is loaded from a
    private copy so that another user of libespeak-ng in this process cannot keep it from unloading. The
    library is not thread-safe; use one synthesizer from one thread.
    """

    def __init__(self, library_path: str | None = None, data_path: str | None = None) -> None:
        import espeakng_loader

        source = library_path or espeakng_loader.get_library_path()
        self.data_path = data_path or espeakng_loader.get_data_path()
        self._tmpdir = tempfile.mkdtemp(prefix="backdoor_lab-espeak-")
        self._finalizer = weakref.finalize(self, shutil.rmtree, self._tmpdir, True)
        self._library_path = shutil.copy(source, os.path.join(self._tmpdir, "libespeak-ng.so"))
        self._languages = sorted(p.name for p in Path(self.data_path, "lang").rglob("*") if p.is_file())
        self._variants = sorted(p.name for p in Path(self.data_path, "voices", "!v").iterdir() if p.is_file())
        with self._session() as (lib, sample_rate, _):
            lib.espeak_Info.restype = ctypes.c_char_p
            self.version = lib.espeak_Info(None).decode()
            self.sample_rate = sample_rate

    @property
    def languages(self) -> list[str]:
        return list(self._languages)

    @property
    def variants(self) -> list[str]:
        return list(self._variants)

    def check_voice(self, voice: str) -> str:
        """Return ``voice`` ("language" or "language+variant") or raise listing what is available.

        espeak-ng itself accepts an unknown variant silently and speaks with the default voice.
        """
        language, _, variant = voice.partition("+")
        bad = []
        if language.lower() not in {name.lower() for name in self._languages}:
            bad.append(f"language {language!r}")
        if variant and variant not in self._variants:
            bad.append(f"variant {variant!r}")
        if bad:
            raise ValueError(
                f"unknown espeak voice {voice!r} ({' and '.join(bad)} not found in {self.data_path}). "
                "A voice is 'language' or 'language+variant'. "
                f"Available languages: {', '.join(self._languages)}. "
                f"Available variants: {', '.join(self._variants)}"
            )
        return voice

    def synthesize(
        self, text: str, voice: str, rate: int = 175, pitch: int = 50, pitch_range: int = 50, seed: int = 0
    ) -> np.ndarray:
        """Speak ``text``; float32 samples in [-1, 1] at ``self.sample_rate``.

        ``rate`` is in words per minute (espeak accepts 80..450), ``pitch`` and ``pitch_range`` are 0..100,
        ``seed`` drives espeak's breath and voicing noise.
        """
        self.check_voice(voice)
        with self._session() as (lib, _, chunks):
            if lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise ValueError(f"espeak-ng refused voice {voice!r}")
            lib.espeak_SetParameter(_PARAM_RATE, int(rate), 0)
            lib.espeak_SetParameter(_PARAM_PITCH, int(pitch), 0)
            lib.espeak_SetParameter(_PARAM_RANGE, int(pitch_range), 0)
            lib.espeak_ng_SetRandSeed(int(seed))
            encoded = text.encode("utf-8")
            status = lib.espeak_Synth(encoded, len(encoded) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            if status != 0:
                raise RuntimeError(f"espeak_Synth failed with status {status} for {text!r} in voice {voice!r}")
            pcm = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)
        if not np.any(pcm):
            raise RuntimeError(f"espeak-ng produced no audio for {text!r} in voice {voice!r}")
        return pcm.astype(np.float32) / 32768.0

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> EspeakSynthesizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _session(self) -> _EspeakSession:
        return _EspeakSession(self._library_path, self.data_path)


class _EspeakSession:
    """Context manager: load the library, initialise it for synchronous synthesis, then unload it."""

    def __init__(self, library_path: str, data_path: str) -> None:
        self.library_path = library_path
        self.data_path = data_path

    def __enter__(self) -> tuple[ctypes.CDLL, int, list[np.ndarray]]:
        lib = ctypes.CDLL(self.library_path)
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        self._lib = lib
        sample_rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, self.data_path.encode(), 0)
        if sample_rate <= 0:
            self._unload()
            raise RuntimeError(f"espeak_Initialize failed (data path {self.data_path})")
        chunks: list[np.ndarray] = []

        def collect(wav: ctypes.Array, num_samples: int, events: int) -> int:
            if wav and num_samples > 0:
                chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
            return 0  # 0: continue synthesis

        self._callback = _SynthCallback(collect)  # must outlive the synthesis
        lib.espeak_SetSynthCallback(self._callback)
        return lib, sample_rate, chunks

    def __exit__(self, *exc: object) -> None:
        self._lib.espeak_Terminate()
        self._unload()

    def _unload(self) -> None:
        handle = self._lib._handle
        del self._lib
        _ctypes.dlclose(handle)
