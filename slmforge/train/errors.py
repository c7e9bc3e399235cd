"""The trainer's own error: training cannot go on, or cannot start as asked, for a reason the user can fix."""


class TrainingError(RuntimeError):
    """Training cannot go on (repeated non-finite steps) or start as asked (an occupied or foreign run
    folder, changed settings on resume)."""
