"""Layer 2, the method's parts: distance, matching level, step policy, real batch, initialisation
and coresets. Each config group's module, registry and validation; they import primitives."""
