"""Layer 4, the app: the Hydra entry point, validation of the whole run, the device, the output
folder, tracking (W&B) and sweep bookkeeping. Nothing below imports it."""
