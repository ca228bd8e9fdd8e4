"""An alias: `--trainer diffprobe.trainers:digits` (the default before the built-in trainer moved
to `diffprobe_examples.trainers`) keeps working in scripts written against it."""
from diffprobe_examples.trainers import digits  # noqa: F401
