"""One exception type for every bad input: its message is one line naming the thing at fault."""


class LemmaError(ValueError):
    """Bad input to lemma (a model file, a tensor, a prompt, a parameter). The message says which."""
