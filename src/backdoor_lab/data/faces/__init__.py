"""Aligned face crops for the face backdoor of Fine-Pruning (Liu et al., RAID 2018).

The paper's face task is identity classification on YouTube Aligned Faces with DeepID, whose input is a
3x55x47 aligned crop (``crop``); the attacker pastes sunglasses over the eyes. Every source returns such
crops as uint8 (N, 55, 47, 3) images together with the per-image *eye band* (the box the trigger covers):

- ``SyntheticFaces`` (``synthetic``): procedural identities (built in, no download): who a person is and how
  a photograph is taken (``identity``), the face's parts (``parts``, drawn on a ``canvas``), and the camera
  (``render``).
- ``AlignedFaceFolder`` (``folders``): any folder of aligned crops, one sub-folder per identity.
- ``LFWFaces`` (``lfw``): Labeled Faces in the Wild through ``torchvision.datasets.LFWPeople``.
"""

from backdoor_lab.data.faces.crop import ALIGNED_EYE_BAND, FACE_HEIGHT, FACE_WIDTH, eye_band
from backdoor_lab.data.faces.folders import AlignedFaceFolder, FaceListSource
from backdoor_lab.data.faces.identity import FaceIdentity, ImageConditions, sample_conditions, sample_identity
from backdoor_lab.data.faces.lfw import LFW_EYE_BAND, LFW_FACE_BOX, LFWFaces
from backdoor_lab.data.faces.render import FaceRenderer
from backdoor_lab.data.faces.synthetic import SyntheticFaces

__all__ = [
    "ALIGNED_EYE_BAND",
    "FACE_HEIGHT",
    "FACE_WIDTH",
    "LFW_EYE_BAND",
    "LFW_FACE_BOX",
    "AlignedFaceFolder",
    "FaceIdentity",
    "FaceListSource",
    "FaceRenderer",
    "ImageConditions",
    "LFWFaces",
    "SyntheticFaces",
    "eye_band",
    "sample_conditions",
    "sample_identity",
]
