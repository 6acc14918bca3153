"""Layer 1, primitives: data, networks, augmentation, seeding, the training loop, the compute
plan and the synthetic-set file. They import only the schema and each other."""
