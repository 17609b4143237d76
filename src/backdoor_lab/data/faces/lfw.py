"""Labeled Faces in the Wild (LFW) through ``torchvision.datasets.LFWPeople``, cut to aligned 55x47 crops."""

from __future__ import annotations

import os
from pathlib import Path

from backdoor_lab.data.faces.crop import FACE_HEIGHT, FACE_WIDTH, eye_band
from backdoor_lab.data.faces.folders import FaceListSource

# LFW images are 250x250 with the face centred by the funneling; this window (x0, y0, x1, y1, pixels) has
# DeepID's 47:55 aspect and spans brow-to-chin like an aligned crop. The eyes of funneled LFW faces sit
# near (104, 114) and (146, 114) in the 250x250 frame (approximate: read off the funneled images, not a
# published landmark set), which map to the eye band below.
LFW_FACE_BOX = (78.0, 72.0, 172.0, 182.0)
LFW_EYES = ((104.0, 114.0), (146.0, 114.0))


def _lfw_eye_band() -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = LFW_FACE_BOX
    sx, sy = FACE_WIDTH / (x1 - x0), FACE_HEIGHT / (y1 - y0)
    left, right = (((x - x0) * sx, (y - y0) * sy) for x, y in LFW_EYES)
    return tuple(float(v) for v in eye_band(left, right))


LFW_EYE_BAND = _lfw_eye_band()


def _lfw_people(root: Path, image_set: str, verify_checksums: bool):
    """torchvision's ``LFWPeople`` over an already extracted copy.

    torchvision's integrity check wants the downloaded archive (``lfw-py/lfw-funneled.tgz``) next to the
    extracted images and md5-checks it; a manual install (the Kaggle mirror, an extracted tarball) often
    lacks it, and torchvision can no longer download LFW. With ``verify_checksums=False`` the check only
    requires the extracted image folder and the people/names files; with ``True`` torchvision's own check
    runs unchanged.
    """
    from torchvision.datasets import LFWPeople

    class ExtractedLFWPeople(LFWPeople):
        def _check_integrity(self) -> bool:
            if verify_checksums:
                return super()._check_integrity()
            images_dir = self.file_dict[self.image_set][0]
            return all(
                os.path.exists(os.path.join(self.root, name)) for name in (images_dir, self.labels_file, self.names)
            )

    return ExtractedLFWPeople(str(root), split="10fold", image_set=image_set, download=False)


class LFWFaces(FaceListSource):
    """Labeled Faces in the Wild, people with >= ``min_images`` photographs, as 55x47 crops.

    Read with ``torchvision.datasets.LFWPeople`` from ``<root>/lfw-py/`` (``lfw_funneled/<Name>/
    <Name>_0001.jpg``, ``people.txt``, ``lfw-names.txt``); nothing is downloaded. Each 250x250 image is cut
    to ``crop_box`` (default ``LFW_FACE_BOX``) and resized; ``eye_band`` defaults to ``LFW_EYE_BAND``.
    """

    name = "lfw_faces"

    def __init__(
        self,
        root: str | os.PathLike,
        min_images: int = 20,
        image_set: str = "funneled",
        max_identities: int | None = None,
        max_images_per_identity: int | None = None,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        crop_box: tuple[float, float, float, float] = LFW_FACE_BOX,
        eye_band: tuple[float, float, float, float] = LFW_EYE_BAND,
        verify_checksums: bool = False,
        cache_dir: str | os.PathLike | None = None,
        progress: bool = True,
    ) -> None:
        # LFW's crop box is in pixels of the 250x250 frame; the reader takes fractions
        x0, y0, x1, y1 = (float(v) for v in crop_box)
        relative_box = (x0 / 250.0, y0 / 250.0, x1 / 250.0, y1 / 250.0)
        super().__init__(
            root,
            min_images,
            max_identities,
            max_images_per_identity,
            val_fraction,
            test_fraction,
            seed,
            relative_box,
            eye_band,
            cache_dir,
            progress,
        )
        self.image_set = image_set
        self.verify_checksums = verify_checksums

    def _find(self) -> dict[str, list[Path]]:
        base = self.root / "lfw-py"
        try:
            people = _lfw_people(self.root, self.image_set, self.verify_checksums)
        except RuntimeError as err:
            raise FileNotFoundError(
                f"LFW not found under {base}: expected the extracted images in {base}/"
                f"{_lfw_folder(self.image_set)}/<Name>/<Name>_0001.jpg plus {base}/people.txt and "
                f"{base}/lfw-names.txt (download them by hand; nothing is fetched)"
                + (" and, with verify_checksums=True, the original archive" if self.verify_checksums else "")
            ) from err
        names = {idx: name for name, idx in people.class_to_idx.items()}
        found: dict[str, list[Path]] = {}
        for path, target in zip(people.data, people.targets, strict=True):
            found.setdefault(names[target], []).append(Path(path))
        return {name: sorted(set(files)) for name, files in found.items()}

    def _settings(self) -> dict:
        return {"image_set": self.image_set}


def _lfw_folder(image_set: str) -> str:
    from torchvision.datasets import LFWPeople

    return LFWPeople.file_dict.get(image_set, ("lfw_funneled",))[0]
