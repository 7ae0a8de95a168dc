"""rre_jax's console commands. Each module here is a thin command: parse arguments, load the config with the one
loader, call one library function, print a summary. Library modules never parse arguments or exit the process."""

import os

from rre_jax import platform

# transformers advises at import that PyTorch is missing; rre_jax uses only its tokenizers and never needs torch,
# so a command's console does not show that line (set the variable to '' to see it again).
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

# No command starts a backend that cannot run here: JAX_PLATFORMS=cpu on a machine without a TPU or GPU, unless the
# user chose (rre_jax/platform.py), so libtpu, when installed, prints none of its start-up errors.
platform.choose()
