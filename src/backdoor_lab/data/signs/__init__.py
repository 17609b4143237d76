"""Traffic signs: the built-in GTSRB-like renderer and the real GTSRB (see ``render``, ``synthetic``, ``gtsrb``)."""

from backdoor_lab.data.signs.gtsrb import GTSRB_CLASSES, GTSRBSigns
from backdoor_lab.data.signs.render import SIGN_CLASSES, SignRenderer, render_template
from backdoor_lab.data.signs.synthetic import SyntheticTrafficSigns

__all__ = ["GTSRB_CLASSES", "SIGN_CLASSES", "GTSRBSigns", "SignRenderer", "SyntheticTrafficSigns", "render_template"]
