"""The one exception type that reaches the user as a message, not a traceback."""


class UserError(Exception):
    """Bad input from the user: the CLI prints it on one line and exits with code 2.

    Raise it wherever the cause is something the user gave (a path, a config value, a file's
    contents) and the message can say what is wrong and what to do about it.
    """
