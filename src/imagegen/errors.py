import re

# scheme://user:password@  (in a URI anywhere in a text): the password is replaced
CREDENTIALS = re.compile(r"(?P<head>[A-Za-z][\w+.-]*://[^:/@\s]*):[^@/\s]*@")


def redact(text: str) -> str:
    """`text` with the password of every `scheme://user:password@host` in it replaced by ***.
    Every message the project prints that may hold a URI goes through here."""
    return CREDENTIALS.sub(r"\g<head>:***@", text)


class ImagegenError(Exception):
    """An expected failure: bad input, bad config, a source that cannot be reached.

    The CLI prints its message as one line and exits non-zero, without a traceback.
    The message says what went wrong, where (file, field, stage) and what was expected.
    A password in a URI in the message is redacted here, whoever builds the message.
    """

    def __init__(self, *args):
        super().__init__(*(redact(arg) if isinstance(arg, str) else arg for arg in args))
