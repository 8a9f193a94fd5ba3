"""bastion.runtime — run a model: backends, detection pre/post-processing, (later) LM generation.

Field-node path: imports only numpy, onnxruntime, OpenCV and the standard library.
"""

from bastion.runtime.detect import DetectOptions, Detector
from bastion.runtime.detections import Detections

__all__ = ["Detector", "DetectOptions", "Detections"]
