"""The steering kernels' mode ids: the number the Triton kernel's MODE constexpr, the C
kernel's `steer_mode` (cpu_block.c) and the torch reference switch on. Each id names a
formula (kernels/reference.py says which); what a mode is called, and what it is for,
is the steering registry's business (steering/modes.py).

No torch here, so a mode can be named (the CLI's choices) without loading it.
"""

ADD, NORM, CLAMP, ABLATE = 0, 1, 2, 3
KERNEL_IDS = (ADD, NORM, CLAMP, ABLATE)  # every id all three kernels implement
