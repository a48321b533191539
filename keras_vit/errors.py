"""The model library's errors that carry their facts as fields (a caller reads the fields, not the message)."""

_LISTED = 5  # names shown per kind in a mismatch message


class CheckpointMismatchError(ValueError):
    """A checkpoint's arrays do not match the model's weights one to one.

    Fields: ``source`` (the file or label), ``missing``, ``unexpected`` and ``mis_shaped`` (the full lists,
    sorted; ``mis_shaped`` holds ``(name, checkpoint shape, model shape)``), ``summary`` (what the file and the
    model are, when known) and ``advice`` (what to do; by default: build the model with the checkpoint's
    architecture). The message says them in that order, with the counts and a few names of each kind.
    """

    def __init__(self, source, missing=(), unexpected=(), mis_shaped=(), summary=None, advice=None):
        self.source, self.summary = source, summary
        self.advice = advice or ("Build the model with the checkpoint's architecture and resolution "
                                 "(keras_vit.from_official_checkpoint infers it from the file).")
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.mis_shaped = sorted(mis_shaped)
        lines = [f"Checkpoint {source} does not match the model" + (f": {summary}." if summary else ".")]

        def some(items):
            return ", ".join(items[:_LISTED]) + (f", ... ({len(items) - _LISTED} more)" if len(items) > _LISTED else "")

        if self.missing:
            lines.append(f"Missing from the checkpoint ({len(self.missing)}): {some(self.missing)}")
        if self.unexpected:
            lines.append(f"Not used by the model ({len(self.unexpected)}): {some(self.unexpected)}")
        if self.mis_shaped:
            shapes = [f"{name}: {ckpt} vs {model}" for name, ckpt, model in self.mis_shaped]
            lines.append(f"Shape mismatch ({len(shapes)}), name: checkpoint vs model: {some(shapes)}")
        lines.append(self.advice)
        super().__init__("\n".join(lines))
