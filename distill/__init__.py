"""bastion.distill — make a model: teachers, pseudo-labels, students, quantization, evaluation.

Heavy libraries (torch, ultralytics) are imported inside functions only, behind
the ``[distill]`` extra; importing this package costs nothing.
"""
