"""Numbers the kernels share (the layout's own, ``BLOCK`` and ``SENTINEL``, live in ``sgl_minference.layout``)."""

LOG2E = 1.4426950408889634  # softmax scores are kept in base 2 (scale by LOG2E) so the kernels can use exp2
