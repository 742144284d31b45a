class ImagegenError(Exception):
    """An expected failure: bad input, bad config, a source that cannot be reached.

    The CLI prints its message as one line and exits non-zero, without a traceback.
    The message says what went wrong, where (file, field, stage) and what was expected.
    """
