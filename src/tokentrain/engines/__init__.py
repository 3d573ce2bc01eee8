"""Engines: how one optimizer step's gradients are produced, reduced and applied, and how the
model/optimizer state goes to disk and back. `registry.build_engine` makes one; the trainer
only sees the `base.Engine` protocol. Nothing heavy is imported here."""
