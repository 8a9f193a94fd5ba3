"""bastion.runtime — run a model: backends, detection pre/post-processing, LM generation (``runtime.lm``).

Field-node path: imports only numpy, onnxruntime, OpenCV, tokenizers and the standard library.
"""

from bastion.runtime.detect import DetectOptions, Detector
from bastion.runtime.detections import Detections

__all__ = ["Detector", "DetectOptions", "Detections"]
