"""Spoken digits "zero" .. "nine": the speech task of Fine-Pruning (Liu et al., RAID 2018).

Three sources give the same ten classes, the same waveform format (float32, mono, ``sample_rate`` Hz, padded
or cropped to ``duration_s`` seconds) and the same log-mel features (``digits.SpokenDigitSource``):

* :class:`SpokenDigits` (built in, ``synthetic``): synthesised with espeak-ng (``espeak``), many voices,
  random speaking rate and pitch per utterance; whole voices are held out for the test split.
* :class:`SpeechCommandsDigits` (``recorded``): the digit words of Google Speech Commands, split by speaker.
* :class:`FreeSpokenDigits` (``recorded``): the Free Spoken Digit Dataset (FSDD) recordings.

WAV reading and resampling live in ``audio``, the log-mel spectrogram in ``features``.
"""

from backdoor_lab.data.speech.digits import DIGIT_WORDS, SpokenDigitSource
from backdoor_lab.data.speech.espeak import EspeakSynthesizer
from backdoor_lab.data.speech.recorded import FreeSpokenDigits, SpeechCommandsDigits
from backdoor_lab.data.speech.synthetic import SpokenDigits

__all__ = [
    "DIGIT_WORDS",
    "EspeakSynthesizer",
    "FreeSpokenDigits",
    "SpeechCommandsDigits",
    "SpokenDigitSource",
    "SpokenDigits",
]
