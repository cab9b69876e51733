"""Mini world: procedural flat-shape scenes with GenEval-style captions, and a weight-free GenEval-style reward.

`scenes` makes the data (64x64 RGB uint8 images, captions, train / held-out prompt splits); `geneval` scores any
image against a caption by colour segmentation and shape templates.
"""
